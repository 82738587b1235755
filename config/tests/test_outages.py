"""config.outages: the back-off after a failure, the one probe after it (or the check's
thread), one Outage per Redis server shared by every part of the process."""

from __future__ import annotations

import logging
import threading
import time

import redis

from config.outages import Outage, OutageNotice, redis_outage
from config.tests.waiting import wait_until

logger = logging.getLogger("tollgate.tests")


def _outage(retry_seconds: float = 60.0) -> Outage:
    return Outage(logger, began="away: %s", ended="back after %.1f s", retry_seconds=retry_seconds)


def test_outage_healthy_is_never_away():
    outage = _outage()

    assert not outage.away()
    outage.answered()
    assert outage.failures == 0


def test_outage_after_its_back_off_one_thread_probes_and_the_others_wait_for_it():
    outage = _outage()
    outage.failed("refused")
    assert outage.away()
    outage.retry_at = 0.0  # the back-off is over
    start = threading.Barrier(8)
    probes: list[bool] = []

    def ask() -> None:
        start.wait()
        probes.append(not outage.away())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(probes) == [False] * 7 + [True]


def test_outage_probe_thread_may_call_again_until_it_reports():
    outage = _outage()
    outage.failed("refused")
    outage.retry_at = 0.0

    assert not outage.away()  # this thread probes
    assert not outage.away()  # ... with as many calls as it needs
    outage.failed("timed out")  # Redis did not answer the probe: a new back-off
    assert outage.away()
    assert outage.failures == 2
    outage.retry_at = 0.0
    assert not outage.away()
    outage.answered()  # back, for every caller
    assert (outage.since, outage.retry_at) == (None, 0.0)


def test_outage_probes_a_back_off_apart_counted_from_the_start_of_the_last_probe():
    outage = _outage(retry_seconds=0.2)
    outage.failed("refused")
    outage.retry_at = 0.0
    assert not outage.away()  # the probe begins
    time.sleep(0.1)  # ... and waits out its timeout
    outage.failed("timed out")
    assert outage.away()
    time.sleep(0.12)

    assert not outage.away()  # 0.2 s after the last probe began, not after it failed


def test_outage_probe_that_never_reports_gives_way_after_another_back_off():
    outage = _outage(retry_seconds=0.05)
    outage.failed("refused")
    outage.retry_at = 0.0
    assert not outage.away()  # taken, and never told how it went
    elsewhere: list[bool] = []

    def ask() -> None:
        elsewhere.append(outage.away())
        time.sleep(0.06)
        elsewhere.append(outage.away())

    thread = threading.Thread(target=ask)
    thread.start()
    thread.join()

    assert elsewhere == [True, False]  # another thread probes in turn


def test_outage_answer_to_a_call_sent_before_the_failure_does_not_end_it():
    outage = _outage()
    outage.failed("refused")  # another connection of a server shutting down
    outage.answered()  # a call that went out before that failure, answered now
    assert outage.since is not None
    assert outage.away()

    outage.retry_at = 0.0
    assert not outage.away()  # the probe
    outage.answered()
    assert outage.since is None


def test_outage_with_a_check_no_caller_probes_its_thread_does_until_answered(caplog):
    """A hung service past its back-off: every caller still leaves it alone, and the
    check, from a thread of its own, asks it once per back-off until it answers."""
    answers = ["timed out", "timed out", None]
    asked: list[str] = []

    def check() -> None:
        asked.append(threading.current_thread().name)
        answer = answers.pop(0)
        if answer:
            raise TimeoutError(answer)

    outage = Outage(logger, began="away: %s", ended="back after %.1f s", check=check)
    outage.retry_seconds = 60.0
    with caplog.at_level(logging.WARNING, logger="tollgate.tests"):
        outage.failed("refused")
        outage.retry_at = 0.0  # the back-off is over
        assert outage.away()
        wait_until(lambda: outage.failures == 2, timeout=10, step=0.01)
        assert outage.away()  # the check found it away: a new back-off
        assert len(asked) == 1

        outage.retry_at = 0.0
        wait_until(lambda: outage.failures == 3, timeout=10, step=0.01)
        outage.retry_at = 0.0
        wait_until(lambda: outage.since is None, timeout=10, step=0.01)

    assert not outage.away()
    assert asked == ["outage-check"] * 3
    said = [r.getMessage().split(" after")[0] for r in caplog.records]
    assert said == ["away: refused", "back"]


def test_outage_notice_says_began_and_ended_once_each(caplog):
    outage = _outage()
    notice = OutageNotice(logger, began="part away", ended="part back after %.1f s")

    with caplog.at_level(logging.WARNING, logger="tollgate.tests"):
        assert not notice.away(outage)
        outage.failed("refused")  # another part found the service away
        assert notice.away(outage)
        notice.failed(outage, "refused")
        assert notice.away(outage)
        outage.retry_at = 0.0
        assert not notice.away(outage)  # the probe
        notice.answered(outage)
        notice.answered(outage)

    said = [r.getMessage().split(" after")[0] for r in caplog.records]
    assert said == ["away: refused", "part away", "back", "part back"]


def test_redis_outage_is_one_per_server_whatever_the_database_or_client():
    zero = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    other_db = redis.Redis.from_url("redis://127.0.0.1:6379/7")
    other_server = redis.Redis.from_url("redis://127.0.0.1:6380/0")

    assert redis_outage(zero) is redis_outage(other_db)
    assert redis_outage(zero) is not redis_outage(other_server)
    assert redis_outage(zero).check is not None  # a PING, from the check's thread
