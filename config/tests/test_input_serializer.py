from __future__ import annotations

import threading

from generation.serializers import ChatCompletionInputSerializer, GenerateInputSerializer


def test_input_serializer_reused_fields_validate_each_body_on_its_own():
    bad = GenerateInputSerializer(data={"messages": [{"role": "robot", "content": "x"}]})
    assert not bad.is_valid()
    good = GenerateInputSerializer(data={"prompt": "hi", "model": "m", "max_tokens": 5})

    assert good.is_valid(), good.errors
    assert good.validated_data == {
        "messages": [{"role": "user", "content": "hi"}],
        "prompt_field": "prompt",
        "model": "m",
        "max_tokens": 5,
        "priority": "high",
        "cache": "use",
    }
    assert "messages" in bad.errors  # the first instance kept its own errors
    assert good.fields["model"].parent is good
    assert good.fields["messages"].root is good


def test_input_serializer_fields_are_built_once_per_thread_and_class():
    first = GenerateInputSerializer(data={}).fields["model"]
    again = GenerateInputSerializer(data={}).fields["model"]
    other_class = ChatCompletionInputSerializer(data={}).fields["model"]
    in_thread = []
    thread = threading.Thread(
        target=lambda: in_thread.append(GenerateInputSerializer(data={}).fields["model"])
    )
    thread.start()
    thread.join()

    assert first is again
    assert other_class is not first
    assert in_thread[0] is not first


def test_input_serializer_threads_validating_at_once_get_their_own_results():
    results: dict[int, object] = {}
    start = threading.Barrier(8)

    def validate(i: int) -> None:
        start.wait()
        for n in range(200):
            body = {"prompt": f"{i}-{n}"} if n % 2 else {"prompt": "x", "max_tokens": 0}
            serializer = GenerateInputSerializer(data=body)
            ok = serializer.is_valid()
            if n % 2 and (
                not ok or serializer.validated_data["messages"][0]["content"] != f"{i}-{n}"
            ):
                results[i] = serializer.errors or serializer.validated_data
                return
            if not n % 2 and (ok or "max_tokens" not in serializer.errors):
                results[i] = "a bad body passed"
                return
        results[i] = True

    threads = [threading.Thread(target=validate, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results == dict.fromkeys(range(8), True)
