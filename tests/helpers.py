"""Test helpers: real worker processes, throwaway PostgreSQL databases, job rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from api_client import Client
    from api_client.schema import JobStatus

REPO_ROOT = Path(__file__).resolve().parent.parent


def logprobe_command(*args: str) -> list[str]:
    """``logprobe ARGS`` through this interpreter (works without the console script)."""
    return [sys.executable, "-m", "api_client.cli", *args]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env.update(extra)
    return env


@dataclass
class WorkerProcess:
    """A real ``logprobe worker`` process, logging to a file."""

    backend: str
    queue: str
    redis_url: str
    database_url: str
    log_dir: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"worker-{self.queue}.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            logprobe_command("--redis-url", self.redis_url, "--database-url", self.database_url,
                             "worker", "--backend", self.backend, "--queues", self.queue,
                             "--loglevel", "info", *self.extra_args),
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            env=subprocess_env(**self.env), start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while " ready." not in self.log_text():
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"worker not ready after {timeout}s:\n{self.log_text()}")
            time.sleep(0.1)
        return self

    def client(self, **options: object) -> Client:
        """A client on this worker's Redis and database, submitting to its queue
        (``options`` override, e.g. ``queue=`` or ``artifacts_url=``)."""
        from api_client import Client

        settings = {"redis_url": self.redis_url, "database_url": self.database_url,
                    "queue": self.queue, **options}
        return Client(**settings)  # type: ignore[arg-type]

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pool_pids(self) -> set[int]:
        """The worker's pool processes: its main process's children (Linux ``/proc``)."""
        assert self.process is not None
        pids: set[int] = set()
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            try:
                pids.update(int(pid) for pid in (task / "children").read_text().split())
            except OSError:  # a thread that just ended
                continue
        return pids

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _admin_connection(server_url: str):
    import psycopg

    return psycopg.connect(server_url, autocommit=True)


def create_postgres_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``server_url``; return its URL."""
    with _admin_connection(server_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}"


def drop_postgres_database(server_url: str, name: str) -> None:
    with _admin_connection(server_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def max_in_rolling_window(times: list[float], window: float) -> int:
    """The most events in any window of ``window`` seconds (a rate limit's bound)."""
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


def add_jobs(sessions: sessionmaker[Session], n: int,
             status: JobStatus | None = None) -> list[str]:
    """``n`` bare score jobs (``queued`` unless ``status`` says), in one transaction;
    their ids."""
    import uuid

    from sqlalchemy import insert

    from api_client.schema import Job, JobStatus

    ids = [uuid.uuid4().hex for _ in range(n)]
    with sessions() as session, session.begin():
        session.execute(insert(Job), [
            {"id": i, "kind": "score", "backend": "hf", "model": "m",
             "status": status or JobStatus.QUEUED, "spec": {}, "queue": "q"} for i in ids])
    return ids
