from __future__ import annotations

from generation.tokens import tokens_count, tokens_count_messages


def test_tokens_count_empty_text_is_zero():
    assert tokens_count("") == 0


def test_tokens_count_common_words_are_one_token_each():
    assert tokens_count("The quick brown fox jumps over the lazy dog.") == 10


def test_tokens_count_is_deterministic_and_grows_with_text():
    text = " ".join(["Tollgate governs access to language models."] * 20)
    assert tokens_count(text) == tokens_count(text)
    assert tokens_count(text + " " + text) == 2 * tokens_count(text)


def test_tokens_count_messages_adds_chat_overhead():
    messages = [{"role": "user", "content": "Hello there"}]
    assert tokens_count_messages(messages) == tokens_count("Hello there") + 3 + 3 + 1
