"""Fault injection for the long-job tests: real outages, real kills, no mocks.

- :class:`TcpProxy`: a TCP proxy in front of PostgreSQL that a test stops (closing
  every connection and refusing new ones) and starts again: a database outage.
- :class:`RedisServer`: a redis-server of the test's own, on a free port, that the
  test kills and restarts (with or without its append-only file).
- :func:`slow_loading_model`: a model directory that takes seconds to load.
- :func:`wait_until`, :func:`progress_of`: polling helpers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.helpers import WorkerProcess, logprobe_command, subprocess_env

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout: float, what: str,
               interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; fail with ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def progress_of(redis: Any, job_id: str) -> dict[str, str]:
    from api_client.constants import progress_key

    try:
        raw = redis.hgetall(progress_key(job_id))
    except Exception:
        return {}
    return {k.decode(): v.decode() for k, v in raw.items()}


class TcpProxy:
    """Forward 127.0.0.1:<port> to a target; ``stop()`` is an outage, ``start()`` ends it."""

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Refuse new connections and cut every open one, as a crashed server would."""
        if self._server is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not,
            # and the kernel would go on accepting connections.
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
            self._server = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@dataclass
class RedisServer:
    """A redis-server process of the test's own, persisting to an append-only file."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["/usr/bin/redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", "--daemonize", "no", "--logfile", str(self.data_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        connection = redis.Redis.from_url(self.url)

        def ready() -> bool:
            try:
                return bool(connection.ping())
            except redis.ConnectionError:
                return False

        wait_until(ready, 20, f"redis-server on port {self.port}")
        connection.close()
        return self

    def kill(self, lose_data: bool = False) -> None:
        """kill -9 (a crash); with ``lose_data`` its files are deleted as well."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        if lose_data:
            for child in self.data_dir.iterdir():
                if child.name != "redis.log":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()

    def stop(self) -> None:
        self.kill()


@dataclass
class LimitedWorkerProcess(WorkerProcess):
    """A worker started under a command prefix (e.g. ``prlimit --data=...``)."""

    prefix: list[str] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> LimitedWorkerProcess:
        if not self.prefix:
            super().start(timeout)
            return self
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*self.prefix,
             *logprobe_command("--redis-url", self.redis_url, "--database-url", self.database_url,
                               "worker", "--backend", self.backend, "--queues", self.queue,
                               "--loglevel", "info", *self.extra_args)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            env=subprocess_env(**self.env), start_new_session=True,
        )
        wait_until(lambda: " ready." in self.log_text() or self.process.poll() is not None,
                   timeout, "the worker to be ready", interval=0.1)
        if self.process.poll() is not None:
            raise RuntimeError(f"worker exited early:\n{self.log_text()}")
        return self


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def slow_loading_model(model: str | Path, directory: Path, gib: int) -> str:
    """A copy of the model directory ``model`` that takes long to load: it holds a
    sparse file of ``gib`` GiB (no disk space) which the worker reads through when it
    hashes the directory for the model's revision
    (``worker.backends.hf_models.directory_revision``: about 1 s a GiB on a
    development machine's core)."""
    shutil.copytree(model, directory)
    with (directory / "padding.bin").open("wb") as handle:
        handle.truncate(gib << 30)
    return str(directory)
