"""Start a worker in the background from Python (a notebook, a Colab session) and stop it.

The worker is a real ``python -m worker`` process, exactly what ``logprobe worker``
runs, so the notebook's own process never imports torch or touches CUDA::

    from worker.background import start_worker

    w = start_worker(backend="hf", gpu=0,
                     redis_url="rediss://:PASSWORD@redis.example.org:6380/0",
                     database_url="postgresql://user:PASSWORD@db.example.org/logprobe")
    ...                       # jobs submitted anywhere are now served here
    print(w.log_tail())
    w.stop()                  # warm shutdown: the running job finishes first

The process runs in its own session, so stopping it stops its pool children too;
it is also stopped when the Python process that started it exits.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from api_client.constants import ENV_DATABASE_URL, ENV_REDIS_URL

#: What Celery logs once the worker consumes from its queues.
_READY_MARK = " ready."


class WorkerHandle:
    """A background worker process: ``alive``, ``log_tail()``, ``stop()``."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, argv: list[str],
                 log_offset: int = 0) -> None:
        self.process = process
        self.log_path = log_path
        self.argv = argv
        #: Where this worker's output starts in ``log_path`` (a log appended to keeps
        #: the lines of earlier runs before it).
        self.log_offset = log_offset

    def __repr__(self) -> str:
        state = "running" if self.alive else f"exited ({self.process.returncode})"
        return f"<WorkerHandle pid={self.pid} {state} log={self.log_path}>"

    def __enter__(self) -> WorkerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        """What this worker wrote to its log (earlier runs' lines left out)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                # A log truncated since the start (rotated) is read from its beginning.
                log.seek(self.log_offset if log.tell() >= self.log_offset else 0)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_ready(self, timeout: float = 120.0) -> WorkerHandle:
        """Block until the worker consumes from its queues (or raise with its log)."""
        deadline = time.monotonic() + timeout
        while _READY_MARK not in self.log_text():
            if not self.alive:
                raise RuntimeError(f"the worker exited with code {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker was not ready after {timeout:g}s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop the worker: SIGTERM (warm shutdown), then SIGKILL after ``timeout`` s.

        Returns the exit code (None if it was never started). Safe to call twice.
        """
        if self.alive:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.process.wait()
            _signal_group(self.pid, signal.SIGKILL)  # pool children left behind, if any
        return self.process.returncode


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def start_worker(
    backend: str = "hf",
    *,
    redis_url: str | None = None,
    database_url: str | None = None,
    gpu: int | None = None,
    queues: str | list[str] | None = None,
    concurrency: int | None = None,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    log_path: str | Path | None = None,
    wait: bool = True,
    timeout: float = 120.0,
) -> WorkerHandle:
    """Start ``logprobe worker --backend BACKEND`` as a background process.

    ``redis_url`` / ``database_url`` default to ``LOGPROBE_REDIS_URL`` /
    ``LOGPROBE_DATABASE_URL`` (they reach the worker through its environment, never
    its command line, so ``ps`` does not show passwords). ``args`` are further
    ``logprobe worker`` options (``["--max-models", "2"]``). With ``wait`` (default),
    returns once the worker is ready to take jobs. An existing ``log_path`` is
    appended to; readiness and ``log_tail()`` look only at what this worker wrote.
    """
    argv = [sys.executable, "-m", "worker", "--backend", backend]
    if gpu is not None:
        argv += ["--gpu", str(gpu)]
    if queues:
        argv += ["--queues", queues if isinstance(queues, str) else ",".join(queues)]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    argv += list(args or [])
    child_env = {**os.environ, **(env or {})}
    # The child imports `worker` and `api_client` from where this module was loaded,
    # also when that is a checkout on sys.path rather than an installed package.
    root = str(Path(__file__).resolve().parent.parent)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, child_env.get("PYTHONPATH")]))
    if redis_url:
        child_env[ENV_REDIS_URL] = redis_url
    if database_url:
        child_env[ENV_DATABASE_URL] = database_url
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"logprobe-worker-{backend}-", suffix=".log")
        os.close(fd)
        log_path = name
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log_offset = log.seek(0, os.SEEK_END)  # " ready." of an earlier run is not ours
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=child_env,
                                   start_new_session=True)
    handle = WorkerHandle(process, log_path, argv, log_offset)
    atexit.register(handle.stop)
    if wait:
        try:
            handle.wait_ready(timeout)
        except BaseException:
            handle.stop()
            raise
    return handle
