"""Crash recovery with real processes and real outages (PostgreSQL, Redis).

- kill -9 of the worker's child mid-job: the job runs again and its rows are stored once;
- kill -9 of the main worker process: the job is redelivered after the (shortened)
  visibility timeout and completes on another worker;
- a job whose worker dies every time it runs: given up after --max-attempts, and its
  message mates, which never ran, are not (its message is split after the first loss);
- a copy of a message delivered while its job runs (another thread of the same
  process, or another worker while the result waits for the database): not run twice;
  a claimed job has a heartbeat while its model loads;
- PostgreSQL unreachable for a few seconds when the job ends: the write is retried;
- Redis killed and restarted mid-run (with its append-only file, then without any
  data): every job completes once, after ``logprobe requeue`` where the data was lost;
- Celery's soft and hard limits (the backstop) and which jobs of a message they fail:
  ``tests/test_backstop_ownership.py``.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from api_client import Client, JobStatus
from api_client.constants import model_queue
from api_client.specs import make_spec
from tests.conftest import make_database
from tests.faults import (
    RedisServer,
    TcpProxy,
    kill9,
    progress_of,
    slow_loading_model,
    wait_until,
)
from tests.helpers import WorkerProcess, logprobe_command, subprocess_env
from tests.test_long_jobs import PROMPT, reference_greedy_logprobs

pytestmark = pytest.mark.postgres

N_TOKENS = 800  # a few seconds of generation on the tiny model


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    yield from make_database("postgres", tmp_path)


def _queue() -> str:
    return model_queue(f"test-crash-{uuid.uuid4().hex[:8]}")


def _worker(queue: str, redis_url: str, database_url: str, log_dir: Path,
            *extra: str, env: dict[str, str] | None = None, name: str = "") -> WorkerProcess:
    # OMP_NUM_THREADS=1: see test_long_jobs (OpenMP threads on a small shared machine).
    return WorkerProcess(backend="hf", queue=queue, redis_url=redis_url,
                         database_url=database_url, log_dir=log_dir / (name or "w"),
                         extra_args=list(extra),
                         env={"OMP_NUM_THREADS": "1", "LOGPROBE_PROGRESS_SECONDS": "0.1",
                              **(env or {})})


def _running(client: Client, job_id: str, min_done: int = 10,
             not_pid: int | None = None) -> dict[str, str]:
    """Wait until the job reports ``min_done`` tokens (from a process other than not_pid)."""

    def check() -> dict[str, str] | None:
        p = progress_of(client.redis, job_id)
        ok = p and p.get("final") == "0" and int(p.get("done", 0)) >= min_done
        return p if ok and (not_pid is None or int(p["pid"]) != not_pid) else None

    return wait_until(check, 120, f"job {job_id} to be running")


def _assert_stored_once(client: Client, job_id: str, model: str,
                        n_tokens: int = N_TOKENS) -> None:
    """The job's token rows are exactly one copy of Hugging Face's greedy generation
    of ``n_tokens``."""
    rows = client.sql(
        "SELECT COUNT(*) AS n, COUNT(DISTINCT position) AS positions, "
        "SUM(CASE WHEN generated THEN 1 ELSE 0 END) AS generated FROM tokens "
        "WHERE job_id = :id", {"id": job_id}).iloc[0]
    result = client.job(job_id).result(timeout=1)
    n_prompt = len(result.sequences[0].prompt_tokens)
    assert int(rows["n"]) == int(rows["positions"]) == n_prompt + n_tokens
    assert int(rows["generated"]) == n_tokens
    ref_ids, ref_logprobs = reference_greedy_logprobs(model, PROMPT, n_tokens)
    assert [t.token_id for t in result.tokens] == ref_ids
    assert [t.logprob for t in result.tokens] == pytest.approx(ref_logprobs, abs=1e-4)


def test_kill_9_of_the_worker_child_runs_the_job_again_once(
        pg_url: str, redis_url: str, long_gpt2: str, tmp_path: Path) -> None:
    queue = _queue()
    workers = [_worker(queue, redis_url, pg_url, tmp_path, name=f"w{i}").start()
               for i in (1, 2)]
    try:
        with Client(redis_url=redis_url, database_url=pg_url, queue=queue) as client:
            job = client.generate(PROMPT, model=long_gpt2, max_new_tokens=N_TOKENS)
            victim = int(_running(client, job.id)["pid"])
            kill9(victim)
            assert job.wait(timeout=180) is JobStatus.SUCCEEDED
            info = job.info()
            assert info["attempts"] == 2 and not info["partial"]
            assert int(progress_of(client.redis, job.id)["pid"]) != victim
            _assert_stored_once(client, job.id, long_gpt2)
            assert any("WorkerLostError" in w.log_text() for w in workers)
    finally:
        for w in workers:
            w.stop()


def test_kill_9_of_the_main_worker_process_recovers_after_visibility_timeout(
        pg_url: str, redis_url: str, long_gpt2: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    visibility = 20
    monkeypatch.setenv("LOGPROBE_VISIBILITY_TIMEOUT", str(visibility))
    env = {"LOGPROBE_VISIBILITY_TIMEOUT": str(visibility)}
    queue = _queue()
    # --pool solo: the main process runs the job itself, so kill -9 takes both.
    first = _worker(queue, redis_url, pg_url, tmp_path, "--pool", "solo", env=env,
                    name="main").start()
    second = None
    try:
        with Client(redis_url=redis_url, database_url=pg_url, queue=queue) as client:
            # Half the usual generation: its second attempt must finish within the
            # 13 s time limit this visibility timeout allows (800 tokens took 13.4 s
            # on the development machine in a slow hour, and the job failed).
            job = client.generate(PROMPT, model=long_gpt2, max_new_tokens=N_TOKENS // 2,
                                  time_limit=13)
            _running(client, job.id)
            assert first.process is not None
            kill9(first.process.pid)
            killed_at = time.monotonic()
            first.process.wait()
            second = _worker(queue, redis_url, pg_url, tmp_path, env=env, name="second").start()
            assert job.wait(timeout=120) is JobStatus.SUCCEEDED
            recovered_after = time.monotonic() - killed_at
            print(f"recovered {recovered_after:.1f}s after the kill "
                  f"(visibility timeout {visibility}s)")
            assert job.info()["attempts"] == 2
            assert job.info()["worker"].startswith("hf-") and second.alive()
            _assert_stored_once(client, job.id, long_gpt2, N_TOKENS // 2)
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_a_job_that_kills_its_worker_fails_alone_not_its_message_mates(
        pg_url: str, redis_url: str, long_gpt2: str, tmp_path: Path) -> None:
    """One message: a long generation that "kills" its worker each time it runs, and
    three short ones queued behind it. After the first loss the message is sent
    again one message per job, so only the long one uses up its attempts: it is given
    up after ``--max-attempts`` (no rows), and the worker goes on serving the others."""
    queue = _queue()
    worker = _worker(queue, redis_url, pg_url, tmp_path, "--max-attempts", "2").start()
    try:
        with Client(redis_url=redis_url, database_url=pg_url, queue=queue) as client:
            poison, *mates = client.submit_many(
                [make_spec("generate", prompt=PROMPT, model=long_gpt2,
                           max_new_tokens=N_TOKENS),
                 *(make_spec("generate", prompt=f"{PROMPT} {i}", model=long_gpt2,
                             max_new_tokens=5) for i in range(3))], chunk_size=4)
            victim = None
            for _ in range(2):
                victim = int(_running(client, poison.id, min_done=5, not_pid=victim)["pid"])
                kill9(victim)
            assert poison.wait(timeout=120) is JobStatus.FAILED
            info = poison.info()
            assert (info["error_type"], info["attempts"]) == ("WorkerLost", 2)
            assert "stopped 2 times" in info["error"]
            for job in mates:
                assert job.wait(timeout=120) is JobStatus.SUCCEEDED
                # claimed with the message, then once in a message of its own
                assert job.info()["attempts"] == 2 and not job.info()["partial"]
            counts = client.sql("SELECT job_id, COUNT(*) AS n FROM tokens WHERE generated "
                                "GROUP BY job_id")
            assert dict(zip(counts["job_id"], counts["n"], strict=True)) == {
                job.id: 5 for job in mates}
            assert int(client.sql("SELECT COUNT(*) AS n FROM tokens WHERE job_id = :id",
                                  {"id": poison.id}).iloc[0]["n"]) == 0
            assert "sending them again one a message" in worker.log_text()
    finally:
        worker.stop()


def test_a_message_restored_to_another_thread_does_not_run_its_job_twice(
        pg_url: str, redis_url: str, long_gpt2: str, tmp_path: Path) -> None:
    """``--pool threads``: a copy of a running job's message (as Celery restores an
    unacknowledged one after a broker reconnect) goes to the process's other thread,
    which sees that the job runs here and leaves it alone."""
    queue = _queue()
    worker = _worker(queue, redis_url, pg_url, tmp_path, "--pool", "threads",
                     "--concurrency", "2").start()
    try:
        with Client(redis_url=redis_url, database_url=pg_url, queue=queue) as client:
            job = client.generate(PROMPT, model=long_gpt2, max_new_tokens=N_TOKENS)
            _running(client, job.id)
            _send_copy(client, job.id)
            wait_until(lambda: worker.log_text().count("succeeded in") >= 2, 120,
                       "both messages to be done")
            assert job.wait(timeout=10) is JobStatus.SUCCEEDED
            assert job.info()["attempts"] == 1
            _assert_stored_once(client, job.id, long_gpt2)
            assert "another thread); not running it twice" in worker.log_text()
    finally:
        worker.stop()


def _send_copy(client: Client, job_id: str) -> None:
    """Send the job's message again, as a broker that restores it would."""
    from api_client.schema import Job

    with client.session() as session:
        row = session.get(Job, job_id)
        assert row is not None
        client._enqueue([{"id": row.id, "spec": row.spec, "queue": row.queue,
                          "model": row.model, "time_limit": row.time_limit}])


def test_a_claimed_job_has_a_heartbeat_while_its_model_loads(
        pg_url: str, redis_url: str, tiny_gpt2: str, tmp_path: Path) -> None:
    """From its claim on (here: a model that takes seconds to load), a job's heartbeat
    tells another worker that it runs; it is marked final once the result is stored."""
    from worker.control import live_state

    model = slow_loading_model(tiny_gpt2, tmp_path / "slow-model", gib=3)
    queue = _queue()
    worker = _worker(queue, redis_url, pg_url, tmp_path).start()
    try:
        with Client(redis_url=redis_url, database_url=pg_url, queue=queue) as client:
            job = client.score("a text scored by a model that loads slowly", model=model)
            wait_until(lambda: job.status() is JobStatus.RUNNING, 60, "the claim")
            beat = wait_until(lambda: progress_of(client.redis, job.id), 1,
                              "the claimed job's heartbeat")
            assert beat["final"] == "0" and "total" not in beat  # nothing computed yet
            assert job.id in live_state(client.redis, [job.id]).running_elsewhere
            assert job.status() is JobStatus.RUNNING  # (still loading)
            assert job.wait(timeout=120) is JobStatus.SUCCEEDED
            assert progress_of(client.redis, job.id)["final"] == "1"
            assert job.info()["attempts"] == 1
    finally:
        worker.stop()


def test_database_outage_at_write_time_is_retried(pg_url: str, redis_url: str, long_gpt2: str,
                                                  tmp_path: Path) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    queue = _queue()
    worker = _worker(queue, redis_url, proxied, tmp_path).start()
    other = None
    try:
        with Client(redis_url=redis_url, database_url=pg_url, queue=queue) as client:
            job = client.generate(PROMPT, model=long_gpt2, max_new_tokens=N_TOKENS)
            _running(client, job.id)
            proxy.stop()  # PostgreSQL unreachable for the worker from now on
            # A second worker, on the database itself, gets a copy of the message while
            # the result waits: the job's heartbeat is not final until it is stored.
            other = _worker(queue, redis_url, pg_url, tmp_path, name="other").start()
            wait_until(lambda: progress_of(client.redis, job.id).get("done") == str(N_TOKENS),
                       120, "the generation to finish")
            time.sleep(1.5)
            assert job.status() is JobStatus.RUNNING  # its result is waiting to be written
            assert progress_of(client.redis, job.id)["final"] == "0"
            _send_copy(client, job.id)
            wait_until(lambda: "not running it twice" in other.log_text(), 60,
                       "the other worker to leave the job alone")
            proxy.start()
            assert job.wait(timeout=60) is JobStatus.SUCCEEDED
            assert job.info()["attempts"] == 1
            _assert_stored_once(client, job.id, long_gpt2)
            assert progress_of(client.redis, job.id)["final"] == "1"
            assert "database unreachable" in worker.log_text()
    finally:
        proxy.stop()
        worker.stop()
        if other is not None:
            other.stop()


def _requeue(redis_url: str, database_url: str) -> str:
    return subprocess.run(
        logprobe_command("--redis-url", redis_url, "--database-url", database_url,
                         "requeue", "--older-than", "0"),
        capture_output=True, text=True, check=True, env=subprocess_env(), timeout=60,
    ).stdout


def test_redis_restart_mid_run_loses_and_duplicates_nothing(pg_url: str, long_gpt2: str,
                                                            tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    queue = _queue()
    worker = _worker(queue, server.url, pg_url, tmp_path).start()
    try:
        with Client(redis_url=server.url, database_url=pg_url, queue=queue) as client:
            texts = [f"text number {i} to score" for i in range(3)]

            # 1. Redis crashes and restarts with its append-only file: nothing is lost.
            long_job = client.generate(PROMPT, model=long_gpt2, max_new_tokens=N_TOKENS)
            short = client.score_many(texts, model=long_gpt2)
            _running(client, long_job.id)
            server.kill()
            server.start()
            for job in [long_job, *short]:
                assert job.wait(timeout=120) is JobStatus.SUCCEEDED

            # 2. Redis comes back empty: the queued jobs' messages are gone.
            # The same probes again, computed again (not answered from the first run's rows).
            long_job2 = client.generate(PROMPT, model=long_gpt2, max_new_tokens=N_TOKENS,
                                        reuse=False)
            short2 = client.score_many(texts, model=long_gpt2, reuse=False)
            _running(client, long_job2.id)
            server.kill(lose_data=True)
            server.start()
            # The queued messages and the unacked one are gone (the worker may already have
            # reconnected and written its heartbeat and queue bindings again).
            assert client.redis.llen(queue) == 0
            assert not client.redis.exists("unacked")
            wait_until(lambda: progress_of(client.redis, long_job2.id), 60,
                       "the running job's heartbeat to come back")
            out = _requeue(server.url, pg_url)
            # The running job is alive (heartbeat) and left alone; the queued ones return.
            assert out.splitlines()[0] == "resubmitted 3 job(s)"
            assert set(out.split()[3:]) == {j.id for j in short2}
            for job in [long_job2, *short2]:
                assert job.wait(timeout=120) is JobStatus.SUCCEEDED

            all_jobs = [long_job, *short, long_job2, *short2]
            assert all(j.info()["attempts"] == 1 for j in all_jobs)
            for job in (long_job, long_job2):
                _assert_stored_once(client, job.id, long_gpt2)
            counts = client.sql("SELECT job_id, COUNT(*) AS n FROM tokens GROUP BY job_id")
            n_short = dict(zip(counts["job_id"], counts["n"], strict=True))
            losses = {j.id: j.result(timeout=1).loss for j in [*short, *short2]}
            for first, second in zip(short, short2, strict=True):
                assert n_short[first.id] == n_short[second.id]
                assert losses[first.id] == pytest.approx(losses[second.id], abs=1e-6)
            assert _requeue(server.url, pg_url).startswith("resubmitted 0 job(s)")
    finally:
        worker.stop()
        server.stop()


def test_a_connection_lost_during_copy_is_a_retried_database_error(pg_url: str) -> None:
    """Rows go into PostgreSQL by ``COPY`` on the driver's connection; losing that
    connection mid-write is an ``OperationalError`` like any other statement's, so the
    worker's retry loop waits for the database instead of failing the job."""
    import threading

    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    from api_client.bulk_insert import insert_rows
    from api_client.database import make_engine, make_sessionmaker
    from api_client.schema import Job
    from worker.db_retry import with_db_retry

    url = make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
    engine = make_engine(url.set(port=proxy.port).render_as_string(hide_password=False))
    sessions = make_sessionmaker(engine)
    columns = ("id", "kind", "backend", "model", "status", "spec", "queue", "created_at")

    def row(n: int) -> tuple:
        return (f"{n:032x}", "score", "hf", "m", JobStatus.QUEUED, {"kind": "score"}, "q",
                datetime.now(timezone.utc))

    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
            proxy.stop()  # the session's connection is gone before its COPY
            with pytest.raises(OperationalError) as info:
                insert_rows(session, Job, columns, [row(1)])
            assert info.value.connection_invalidated

        restarted = threading.Timer(1.0, proxy.start)
        restarted.start()

        def write() -> None:
            with sessions() as session, session.begin():
                insert_rows(session, Job, columns, [row(2), row(3)])

        with_db_retry(write, "write two job rows", window=30)
        restarted.join()
        with engine.connect() as connection:
            assert connection.execute(text("SELECT COUNT(*) FROM jobs")).scalar_one() == 2
    finally:
        proxy.stop()
        engine.dispose()
