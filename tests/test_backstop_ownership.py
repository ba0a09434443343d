"""Celery's backstop time limits fail only the jobs their own task claimed.

A message's jobs are not all its task's: a copy of a message whose jobs a split
spread over workers reaches a worker while one of them runs elsewhere, and the claim
leaves that job to the live process running it (``worker.control.live_state``).
When Celery's soft or hard limit then ends the message, the job running elsewhere
must go on and store its own outcome, a job the task never claimed must be
delivered again, and only the job the task claimed is failed (``TimeLimitExceeded``).

With real processes: a ``logprobe worker`` runs a long generation (X); another gets
a message of X and a job (Y) that gets stuck, with Celery limits of seconds. Plus the
rule itself (``worker.runner.fail_unfinished``) on job rows and heartbeats of each
kind, in real SQL and Redis.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from api_client import Client, JobStatus
from api_client.constants import model_queue, progress_key
from tests.conftest import make_database
from tests.faults import progress_of, slow_loading_model, wait_until
from tests.helpers import WorkerProcess
from tests.test_long_jobs import PROMPT

pytestmark = pytest.mark.postgres

#: Long enough to run through the other worker's whole backstop; the test cancels it.
LONG_TOKENS = 10_000


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    yield from make_database("postgres", tmp_path)


def _queue() -> str:
    return model_queue(f"test-backstop-{uuid.uuid4().hex[:8]}")


def _worker(queue: str, redis_url: str, database_url: str, log_dir: Path, name: str,
            env: dict[str, str] | None = None) -> WorkerProcess:
    # OMP_NUM_THREADS=1: see test_long_jobs (OpenMP threads on a small shared machine).
    return WorkerProcess(backend="hf", queue=queue, redis_url=redis_url,
                         database_url=database_url, log_dir=log_dir / name,
                         env={"OMP_NUM_THREADS": "1", "LOGPROBE_PROGRESS_SECONDS": "0.1",
                              **(env or {})})


def _running_elsewhere(client: Client, long_gpt2: str, queue: str) -> tuple[object, int]:
    """Job X: a long generation another worker (on ``queue``) runs; returns its handle
    and the pid of the process running it, once it has generated a few tokens."""
    job = client.generate(PROMPT, model=long_gpt2, max_new_tokens=LONG_TOKENS, queue=queue,
                          time_limit=600)
    beat = wait_until(lambda: (lambda p: p if p and p.get("final") == "0"
                               and int(p.get("done", 0)) >= 10 else None)(
                          progress_of(client.redis, job.id)), 120, "job X to be running")
    return job, int(beat["pid"])


def _without_its_message(client: Client, queue: str, make_job: object) -> object:
    """Submit a job to ``queue`` (no worker consumes it yet) and drop its own message
    from the broker: the message the test sends next is its only delivery."""
    job = make_job()  # type: ignore[operator]
    assert client.redis.llen(queue) == 1
    client.redis.delete(queue)
    return job


def _send_together(client: Client, queue: str, job_ids: list[str]) -> None:
    """One message of these jobs to ``queue``, each with a 1 s limit: Celery's backstop
    on it (LOGPROBE_MODEL_LOAD_SECONDS=0) is a 5 s soft and an 8 s hard limit."""
    from api_client.schema import Job

    with client.session() as session:
        rows = [session.get(Job, job_id) for job_id in job_ids]
        items = [{"id": row.id, "spec": row.spec, "queue": queue, "model": row.model,
                  "time_limit": 1} for row in rows if row is not None]
    with client.celery.producer_or_acquire() as producer:  # (not grouped by model)
        client._send(producer, queue, items)


def _end_x(client: Client, x: object, pid: int) -> None:
    """X ran through the other worker's backstop untouched: still running in its own
    process; cancelled now, it is stored cancelled by that process."""
    assert x.status() is JobStatus.RUNNING  # type: ignore[attr-defined]
    beat = progress_of(client.redis, x.id)  # type: ignore[attr-defined]
    assert int(beat["pid"]) == pid and beat["final"] == "0"
    x.cancel()  # type: ignore[attr-defined]
    assert x.wait(timeout=60) is JobStatus.CANCELLED  # type: ignore[attr-defined]
    info = x.info()  # type: ignore[attr-defined]
    assert (info["error_type"], info["attempts"], info["partial"]) == ("Cancelled", 1, True)


def test_the_soft_limit_fails_only_the_job_its_task_claimed(
        pg_url: str, redis_url: str, tiny_gpt2: str, long_gpt2: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A message of X (running on another worker) and Y (whose model takes a minute to
    load): the task claims Y only; Celery's soft limit strikes during Y's load. The
    message ends there, Y failed by the backstop, instead of the load going on until
    the hard limit kills the pool process; a fresh pool process serves on (the limit
    may strike mid-import, and the old process would fail every job after). X goes on
    and ends as its own worker stores it."""
    monkeypatch.setenv("LOGPROBE_MODEL_LOAD_SECONDS", "0")  # (the client's limits)
    model = slow_loading_model(tiny_gpt2, tmp_path / "slow-model", gib=64)
    queue, other_queue = _queue(), _queue()
    other = _worker(other_queue, redis_url, pg_url, tmp_path, "other").start()
    worker = None
    try:
        with Client(redis_url=redis_url, database_url=pg_url) as client:
            x, x_pid = _running_elsewhere(client, long_gpt2, other_queue)
            y = _without_its_message(client, queue, lambda: client.score(
                "a text its model never scores", model=model, queue=queue, time_limit=1))
            worker = _worker(queue, redis_url, pg_url, tmp_path, "w").start()
            _send_together(client, queue, [x.id, y.id])
            y_pid = int(wait_until(lambda: progress_of(client.redis, y.id), 60,
                                   "Y's claim")["pid"])
            assert y.wait(timeout=60) is JobStatus.FAILED
            info = y.info()
            assert (info["error_type"], info["attempts"]) == ("TimeLimitExceeded", 1)
            assert "Celery's time limit" in info["error"]
            assert (info["finished_at"] - info["started_at"]).total_seconds() < 7.5
            assert "Soft time limit (5s) exceeded" in worker.log_text()
            wait_until(lambda: "replacing this pool process" in worker.log_text(), 30,
                       "the pool process to be replaced")
            next_job = client.score("still serving", model=tiny_gpt2, queue=queue)
            assert next_job.result(timeout=120).loss > 0
            assert int(progress_of(client.redis, next_job.id)["pid"]) != y_pid
            time.sleep(max(0.0, 10 - (time.time() - info["started_at"].timestamp())))
            assert "Hard time limit" not in worker.log_text()
            _end_x(client, x, x_pid)
            assert f"run elsewhere ({x.id})" in worker.log_text()
    finally:
        other.stop()
        if worker is not None:
            worker.stop()


def test_the_hard_limit_leaves_other_jobs_and_sends_an_unclaimed_one_again(
        pg_url: str, redis_url: str, tiny_gpt2: str, long_gpt2: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A message of X (running on another worker) and Y, whose claim waits on a row lock
    the test holds past Celery's soft and hard limits. The hard limit's handler in the
    worker's main process (``worker.tasks.ProbesRequest``) fails neither: X goes on in
    its own process, and Y, which the task never claimed, is sent again in a message of
    its own, which a new pool process runs once the row is free."""
    from sqlalchemy import text

    from api_client.database import make_engine

    monkeypatch.setenv("LOGPROBE_MODEL_LOAD_SECONDS", "0")  # (the client's limits)
    queue, other_queue = _queue(), _queue()
    engine = make_engine(pg_url)
    other = _worker(other_queue, redis_url, pg_url, tmp_path, "other").start()
    worker = None
    try:
        with Client(redis_url=redis_url, database_url=pg_url) as client:
            x, x_pid = _running_elsewhere(client, long_gpt2, other_queue)
            y = _without_its_message(client, queue, lambda: client.score(
                "a text that waits on a lock", model=tiny_gpt2, queue=queue, time_limit=1))
            # (the message it is sent again in gets the default allowance to load)
            worker = _worker(queue, redis_url, pg_url, tmp_path, "w",
                             env={"LOGPROBE_MODEL_LOAD_SECONDS": "600"}).start()
            first_pool = worker.pool_pids()
            assert len(first_pool) == 1
            with engine.connect() as holder:
                holder.execute(text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"),
                               {"id": y.id})
                _send_together(client, queue, [x.id, y.id])
                # (soft limit 5 s: swallowed by the claim's retry loop; hard limit 8 s)
                wait_until(lambda: x.status() is not JobStatus.RUNNING
                           or "to be delivered again" in worker.log_text(), 60,
                           "the hard limit's handler")
                assert x.status() is JobStatus.RUNNING
                assert y.status() is JobStatus.QUEUED
                assert "Hard time limit (8s) exceeded" in worker.log_text()
                assert (f"1 run elsewhere ({x.id}), 1 to be delivered again ({y.id})"
                        in worker.log_text())
                # Celery kills the pool process right after the handler: freed before
                # that, the row would let the doomed process's claim through (a second
                # attempt, rightly counted). Once it is gone, nothing claimed Y.
                wait_until(lambda: not first_pool & worker.pool_pids(), 30,
                           "the timed-out pool process to be gone")
                assert y.status() is JobStatus.QUEUED
                holder.rollback()  # free the row: Y's new message claims and runs it
            assert y.wait(timeout=120) is JobStatus.SUCCEEDED
            assert y.info()["attempts"] == 1
            assert y.result(timeout=1).loss > 0
            _end_x(client, x, x_pid)
            assert int(client.sql("SELECT COUNT(*) AS n FROM jobs WHERE status IN "
                                  "('queued', 'running')").iloc[0]["n"]) == 0
    finally:
        other.stop()
        if worker is not None:
            worker.stop()
        engine.dispose()


def test_which_jobs_of_a_timed_out_message_are_its_tasks(
        pg_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fail_unfinished``'s rule on rows and heartbeats of every kind, in real SQL and
    Redis: only jobs the task claimed (this worker, claimed after the task began, a
    heartbeat of the task's process or none) are failed; jobs another live process runs
    are left alone; the rest, which no one runs, are returned to be sent again."""
    import redis as redis_py
    from sqlalchemy import update

    from api_client.database import make_engine, make_sessionmaker
    from api_client.schema import Job
    from tests.helpers import add_jobs
    from worker import runner

    monkeypatch.setenv("LOGPROBE_DATABASE_URL", pg_url)
    monkeypatch.setenv("LOGPROBE_REDIS_URL", redis_url)
    monkeypatch.setattr(runner, "_state", None)
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    broker = redis_py.Redis.from_url(redis_url)
    host = socket.gethostname()
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        me, task_pid, began = "hf-1@host", 4242, time.time()
        before = datetime.fromtimestamp(began, timezone.utc) - timedelta(seconds=30)
        after = datetime.fromtimestamp(began, timezone.utc) + timedelta(seconds=1)
        (claimed, claimed_no_beat, sibling_job, other_worker, queued, earlier_task,
         dead_runner, finished) = ids = add_jobs(sessions, 8)
        claims = {claimed: (me, after, task_pid), claimed_no_beat: (me, after, None),
                  sibling_job: (me, after, sibling.pid),
                  other_worker: ("hf-2@elsewhere", after, sibling.pid),
                  earlier_task: (me, before, task_pid), dead_runner: (me, after, dead.pid)}
        with sessions() as session, session.begin():
            for job_id, (worker, started_at, _) in claims.items():
                session.execute(update(Job).where(Job.id == job_id).values(
                    status=JobStatus.RUNNING, worker=worker, attempts=1,
                    started_at=started_at))
            session.execute(update(Job).where(Job.id == finished).values(
                status=JobStatus.SUCCEEDED, worker=me, attempts=1, started_at=after))
        for job_id, (worker, _, pid) in claims.items():
            if pid is not None:
                broker.hset(progress_key(job_id), mapping={
                    "done": 0, "updated": time.time(), "worker": worker, "pid": pid,
                    "host": host, "final": int(job_id == earlier_task)})

        items = [{"id": job_id, "spec": {}, "time_limit": 2} for job_id in ids]
        orphans = runner.fail_unfinished(items, runner.TaskProcess(me, task_pid, began))

        with sessions() as session:
            rows = {job.id: job for job in session.query(Job).filter(Job.id.in_(ids))}
        assert {job_id for job_id, row in rows.items() if row.status is JobStatus.FAILED} == {
            claimed, claimed_no_beat}
        for job_id in (claimed, claimed_no_beat):
            assert rows[job_id].error_type == "TimeLimitExceeded"
            assert "Celery's time limit" in (rows[job_id].error or "")
        for job_id in (sibling_job, other_worker, earlier_task, dead_runner):
            assert (rows[job_id].status, rows[job_id].error_type) == (JobStatus.RUNNING, None)
        assert rows[queued].status is JobStatus.QUEUED
        assert rows[finished].status is JobStatus.SUCCEEDED
        assert sorted(item["id"] for _, item in orphans) == sorted(
            [queued, earlier_task, dead_runner])
        assert {queue for queue, _ in orphans} == {"q"}
    finally:
        sibling.kill()
        sibling.wait()
        broker.close()
        engine.dispose()
