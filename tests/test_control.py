"""A message's live state in a real Redis: heartbeats and cancel flags read in one round
trip, and progress written only for messages that run past the first report."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from api_client.constants import LIVE_KEY_TTL, cancel_key, progress_key
from worker.control import JobControl, LiveState, Monitor, live_state


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[object]:
    import redis

    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def _ids(n: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(n)]


def test_live_state_reads_heartbeats_and_cancel_flags(redis_client) -> None:
    fresh, final, stale, flagged, idle = _ids(5)
    now = time.time()
    parent = os.getppid()  # a live process on this host, not this one
    heartbeat = {"worker": "w@elsewhere", "pid": parent, "host": socket.gethostname(),
                 "final": 0, "updated": now}
    redis_client.hset(progress_key(fresh), mapping=heartbeat)
    redis_client.hset(progress_key(final), mapping={**heartbeat, "final": 1})
    redis_client.hset(progress_key(stale), mapping={**heartbeat, "updated": now - 60})
    redis_client.set(cancel_key(flagged), 1)
    try:
        state = live_state(redis_client, [fresh, final, stale, flagged, idle])
        assert list(state.running_elsewhere) == [fresh]
        assert f"pid {parent}" in state.running_elsewhere[fresh]
        assert state.cancelled == {flagged}
        # Each read only where something exists: a flag and no heartbeat, and back.
        only_flag = live_state(redis_client, [idle, flagged])
        assert (only_flag.running_elsewhere, only_flag.cancelled) == ({}, {flagged})
        only_heartbeat = live_state(redis_client, [idle, stale, fresh])
        assert (list(only_heartbeat.running_elsewhere), only_heartbeat.cancelled) == (
            [fresh], set())
        assert live_state(redis_client, [idle]) == LiveState({}, set())
        assert live_state(redis_client, []).running_elsewhere == {}
    finally:
        redis_client.delete(*(progress_key(i) for i in (fresh, final, stale)),
                            cancel_key(flagged))


def _controls(redis_client, n: int) -> list[JobControl]:
    controls = [JobControl(job_id, time_limit=60, redis=redis_client, worker="w")
                for job_id in _ids(n)]
    for control in controls:
        control.begin(10)
    return controls


def test_a_message_done_before_the_first_report_writes_no_progress(redis_client) -> None:
    controls = _controls(redis_client, 64)
    monitor = Monitor(controls, first_report_delay=10)
    monitor.start()
    time.sleep(0.2)  # cancel flags are polled meanwhile, nothing is written
    for control in controls:
        control.advance(10)
    monitor.stop()
    assert redis_client.exists(*(progress_key(c.job_id) for c in controls)) == 0


def test_a_longer_message_reports_progress_and_then_final(redis_client) -> None:
    controls = _controls(redis_client, 3)
    monitor = Monitor(controls, first_report_delay=0.05)
    monitor.start()
    try:
        deadline = time.monotonic() + 5
        key = progress_key(controls[0].job_id)
        while not redis_client.exists(key):
            assert time.monotonic() < deadline, "no progress report"
            time.sleep(0.01)
        running = redis_client.hgetall(key)
        assert running[b"final"] == b"0" and running[b"total"] == b"10"
        for control in controls:
            control.advance(10)
    finally:
        monitor.stop()
    for control in controls:
        key = progress_key(control.job_id)
        report = redis_client.hgetall(key)
        assert (report[b"final"], report[b"done"], report[b"total"]) == (b"1", b"10", b"10")
        assert (report[b"worker"], report[b"pid"], report[b"unit"]) == (
            b"w", str(os.getpid()).encode(), b"tokens")
        assert float(report[b"started"]) == control.begun_at
        assert time.time() - 5 < float(report[b"updated"]) <= time.time()
        assert 0 < redis_client.ttl(key) <= LIVE_KEY_TTL
    redis_client.delete(*(progress_key(c.job_id) for c in controls))


def test_one_report_writes_each_jobs_own_fields(redis_client) -> None:
    """A report sends the fields all jobs share once and each job's own (done, unit,
    total, started, attempt) apart: a job sets only the fields it has, and keeps what
    an earlier report wrote of the others."""
    begun, waiting, retried = _ids(3)
    first = JobControl(begun, time_limit=60, redis=redis_client, worker="w")
    first.begin(40, "tokens")
    first.advance(17)
    second = JobControl(waiting, time_limit=60, redis=redis_client, worker="w")
    third = JobControl(retried, time_limit=60, redis=redis_client, worker="w", attempt=2)
    third.begin(5, "steps")
    redis_client.hset(progress_key(waiting), mapping={"total": 99})  # an earlier report
    keys = [progress_key(job_id) for job_id in (begun, waiting, retried)]
    try:
        Monitor([first, second, third])._report(final=True)
        reports = [{k.decode(): v.decode() for k, v in redis_client.hgetall(key).items()}
                   for key in keys]
        shared = {"worker": "w", "pid": str(os.getpid()), "host": socket.gethostname(),
                  "final": "1"}
        assert all(report.items() >= shared.items() for report in reports)
        assert len({report["updated"] for report in reports}) == 1
        assert {k: reports[0][k] for k in ("done", "unit", "total")} == {
            "done": "17", "unit": "tokens", "total": "40"}
        assert float(reports[0]["started"]) == first.begun_at
        assert "attempt" not in reports[0]
        assert (reports[1]["done"], reports[1]["total"]) == ("0", "99")
        assert "started" not in reports[1]
        assert {k: reports[2][k] for k in ("done", "unit", "total", "attempt")} == {
            "done": "0", "unit": "steps", "total": "5", "attempt": "2"}
        assert all(0 < redis_client.ttl(key) <= LIVE_KEY_TTL for key in keys)
    finally:
        redis_client.delete(*keys)


def test_a_job_another_thread_of_this_process_runs_is_running_here(redis_client) -> None:
    """A heartbeat names a process, not a thread: a job whose heartbeat is this
    process's counts as running only while a thread here has it (``running_here``)."""
    from worker.control import running_here

    mine, leftover = _ids(2)
    heartbeat = {"worker": "w@here", "pid": os.getpid(), "host": socket.gethostname(),
                 "final": 0, "updated": time.time()}
    for job_id in (mine, leftover):
        redis_client.hset(progress_key(job_id), mapping=heartbeat)
    try:
        assert running_here.reserve([mine]) == {mine}
        assert running_here.reserve([mine, leftover]) == {leftover}  # one owner each
        running_here.release({leftover})
        state = live_state(redis_client, [mine, leftover])
        assert list(state.running_elsewhere) == [mine]
        assert "another thread" in state.running_elsewhere[mine]
        # Even when Redis cannot tell (here: no heartbeat at all).
        redis_client.delete(progress_key(mine))
        assert list(live_state(redis_client, [mine]).running_elsewhere) == [mine]
    finally:
        running_here.release({mine, leftover})
        redis_client.delete(*(progress_key(i) for i in (mine, leftover)))
    assert live_state(redis_client, [mine]).running_elsewhere == {}


def test_claimed_jobs_have_a_heartbeat_until_the_monitor_stops(redis_client) -> None:
    """``announce`` writes every claimed job's heartbeat at once, before any progress
    (a model loading); ``stop`` marks them final, even for a message done before the
    first report."""
    controls = _controls(redis_client, 64)
    redis_client.hset(progress_key(controls[0].job_id), mapping={"total": 99})  # an old try
    monitor = Monitor(controls, first_report_delay=10)
    monitor.announce()
    monitor.start()
    keys = [progress_key(c.job_id) for c in controls]
    try:
        reports = [redis_client.hgetall(key) for key in keys]
        assert all(r[b"final"] == b"0" and r[b"pid"] == str(os.getpid()).encode()
                   and r[b"worker"] == b"w" and b"total" not in r for r in reports)
        assert all(0 < redis_client.ttl(key) <= LIVE_KEY_TTL for key in keys)
    finally:
        monitor.stop()
    assert all(redis_client.hget(key, "final") == b"1" for key in keys)
    redis_client.delete(*keys)

