"""Several services' script calls in one round trip (config.redis_calls), on real Redis."""

from __future__ import annotations

import pytest
import redis

from config.redis_calls import ScriptCall, run_calls
from config.tests.redis_server import PrivateRedis

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
GET = "return redis.call('GET', KEYS[1])"


def test_calls_of_two_scripts_go_in_one_round_trip_each_with_its_reply(
    redis_conn, redis_round_trips
):
    incr, get = redis_conn.register_script(INCR), redis_conn.register_script(GET)
    redis_conn.script_load(INCR), redis_conn.script_load(GET)
    calls = [ScriptCall(incr, keys=["rc:n"], args=[5]), ScriptCall(get, keys=["rc:n"], args=[])]
    redis_round_trips.count = 0

    run_calls(calls)

    assert redis_round_trips.count == 1
    assert [c.reply for c in calls] == [5, b"5"]
    assert all(c.ran and c.error is None for c in calls)


def test_a_call_already_sent_is_not_sent_again(redis_conn):
    call = ScriptCall(redis_conn.register_script(INCR), keys=["rc:once"], args=[1])

    run_calls([call])
    run_calls([call])

    assert call.reply == 1
    assert redis_conn.get("rc:once") == b"1"


def test_scripts_redis_forgot_are_loaded_and_sent_again(redis_conn):
    incr = redis_conn.register_script(INCR)
    redis_conn.script_load(INCR)
    redis_conn.script_flush()  # as after a restart of Redis
    call = ScriptCall(incr, keys=["rc:flushed"], args=[2])

    run_calls([call])

    assert call.error is None
    assert call.reply == 2
    assert redis_conn.get("rc:flushed") == b"2"  # run once, not twice


def test_a_pooled_connection_the_server_closed_is_replaced_before_the_calls_go(redis_conn):
    """Redis closed the idle connection (its `timeout`, CLIENT KILL, a proxy in between): the
    calls go on a new one, and run once. A settlement lost this way would leave its
    reservation to be refunded by the sweep, and the counters short of what was spent."""
    incr = redis_conn.register_script(INCR)
    redis_conn.script_load(INCR)
    run_calls([ScriptCall(incr, keys=["rc:killed"], args=[1])])  # the connection is pooled
    killer = redis.Redis(host=redis_conn.connection_pool.connection_kwargs["host"])
    assert killer.client_kill_filter(_type="normal", skipme=True) >= 1
    call = ScriptCall(incr, keys=["rc:killed"], args=[1])

    run_calls([call])

    assert call.error is None
    assert call.reply == 2
    assert redis_conn.get("rc:killed") == b"2"


def test_one_failing_script_does_not_hide_the_others_reply(redis_conn):
    redis_conn.hset("rc:hash", "f", "v")
    get, incr = redis_conn.register_script(GET), redis_conn.register_script(INCR)
    wrong = ScriptCall(get, keys=["rc:hash"], args=[])  # GET of a hash: WRONGTYPE
    right = ScriptCall(incr, keys=["rc:ok"], args=[3])

    run_calls([wrong, right])

    assert isinstance(wrong.error, redis.ResponseError)
    assert "WRONGTYPE" in str(wrong.error)
    assert right.reply == 3
    assert right.error is None


def test_redis_gone_is_every_calls_error_not_an_exception():
    server = PrivateRedis()
    server.start()
    client = redis.Redis.from_url(server.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    calls = [
        ScriptCall(client.register_script(INCR), keys=["n"], args=[1]),
        ScriptCall(client.register_script(GET), keys=["n"], args=[]),
    ]
    server.stop()

    run_calls(calls)

    assert all(c.ran for c in calls)
    assert all(isinstance(c.error, redis.ConnectionError) for c in calls)


def test_meanwhile_runs_once_between_sending_the_calls_and_reading_their_replies(
    redis_conn, redis_round_trips
):
    incr = redis_conn.register_script(INCR)
    redis_conn.script_load(INCR)
    call = ScriptCall(incr, keys=["rc:overlap"], args=[4])
    seen = []
    redis_round_trips.count = 0

    run_calls([call], meanwhile=lambda: seen.append((redis_round_trips.count, call.ran)))

    assert seen == [(1, False)]  # sent, its reply not read yet
    assert call.reply == 4
    assert redis_round_trips.count == 1


def test_an_error_in_meanwhile_propagates_after_the_replies_are_read(redis_conn):
    incr = redis_conn.register_script(INCR)
    redis_conn.script_load(INCR)
    call = ScriptCall(incr, keys=["rc:raise"], args=[1])

    def failing() -> None:
        raise RuntimeError("ledger down")

    with pytest.raises(RuntimeError, match="ledger down"):
        run_calls([call], meanwhile=failing)

    assert call.reply == 1
    assert call.error is None
    # The pooled connection was not left with a reply unread: the next command gets its own.
    assert redis_conn.get("rc:raise") == b"1"
    again = ScriptCall(incr, keys=["rc:raise"], args=[1])
    run_calls([again])
    assert again.reply == 2


def test_meanwhile_runs_once_when_scripts_are_loaded_again(redis_conn):
    incr = redis_conn.register_script(INCR)
    redis_conn.script_load(INCR)
    redis_conn.script_flush()
    call = ScriptCall(incr, keys=["rc:flushed-meanwhile"], args=[2])
    runs = []

    run_calls([call], meanwhile=lambda: runs.append(1))

    assert runs == [1]
    assert call.reply == 2


def test_meanwhile_runs_with_nothing_to_send_and_with_redis_gone():
    runs = []
    run_calls([], meanwhile=lambda: runs.append("none"))

    server = PrivateRedis()
    server.start()
    client = redis.Redis.from_url(server.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    call = ScriptCall(client.register_script(INCR), keys=["n"], args=[1])
    server.stop()
    run_calls([call], meanwhile=lambda: runs.append("gone"))

    assert runs == ["none", "gone"]
    assert isinstance(call.error, redis.ConnectionError)


def test_redis_gone_while_meanwhile_runs_is_every_calls_error_not_an_exception():
    server = PrivateRedis()
    server.start()
    client = redis.Redis.from_url(server.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    # A script that takes 100 ms, so that Redis dies before it answers.
    slow = client.register_script(
        "local t = redis.call('TIME'); local stop = t[1] * 1e6 + t[2] + 100000; "
        "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] >= stop; return 1"
    )
    client.script_load(slow.script)
    call = ScriptCall(slow, keys=[], args=[])

    def redis_dies() -> None:  # while the script runs: it never answers
        server.proc.kill()
        server.proc.wait(10)

    try:
        run_calls([call], meanwhile=redis_dies)
    finally:
        server.stop()

    assert call.ran
    assert isinstance(call.error, redis.ConnectionError)
