"""No password of a Redis or database URL is printed: real processes, output grepped.

The credentials in URLs (``redis://:pw@host``, ``postgresql://user:pw@host/db``)
must not show in the CLI's output, a worker's log, an exception message or a
``repr``. Each test uses a recognizable canary password and greps for it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from api_client import Client
from api_client.errors import ConfigError
from api_client.settings import Settings
from tests.helpers import REPO_ROOT, logprobe_command, subprocess_env
from tests.test_remote_workers import PASSWORD, password_redis  # noqa: F401 (a fixture)

CANARY = "s3cr3t-canary"


def _leaks(text: str, secret: str) -> list[str]:
    """The forms of ``secret`` (as written, percent-encoded, its part after an '@')
    that ``text`` shows."""
    forms = {secret, quote(secret, safe=""), secret.rpartition("@")[2]}
    return sorted(form for form in forms if form and form in text)


def test_settings_repr_masks_passwords() -> None:
    """A notebook showing ``client.settings`` (or a log line formatting it) prints it."""
    redis_url = f"rediss://:{CANARY}@cache.example.org:6380/0?ssl_cert_reqs=none"
    database_url = f"postgresql://logprobe:{CANARY}@db.example.org/logprobe"
    client = Client(redis_url=redis_url, database_url=database_url)
    for shown in (repr(client.settings), str(client.settings), f"{client.settings}"):
        assert CANARY not in shown, shown
        assert "rediss://:***@cache.example.org:6380/0" in shown
        assert "postgresql://logprobe:***@db.example.org/logprobe" in shown
    assert client.settings.redis_url == redis_url  # the real URL is still what connects
    assert Settings(redis_url=redis_url) == Settings(redis_url=redis_url)
    assert "redis_url=None" in repr(Settings())


def test_openai_settings_repr_shows_neither_key_nor_base_url_password() -> None:
    from worker.backends.openai_backend import OpenAISettings
    from worker.backends.openai_retry import RetryPolicy

    settings = OpenAISettings(api_key=f"sk-{CANARY}", timeout_s=1.0, retry=RetryPolicy(),
                              base_url=f"https://team:{CANARY}@proxy.example.org/v1",
                              score_max_tokens=0)
    shown = repr(settings)
    assert CANARY not in shown and "https://team:***@proxy.example.org/v1" in shown, shown
    assert "base_url=None" in repr(OpenAISettings(
        api_key="sk-x", base_url=None, timeout_s=1.0, retry=RetryPolicy(), score_max_tokens=0))


#: '@' in a PostgreSQL password, unencoded: SQLAlchemy ends the password at the first
#: '@' and takes the rest for the host ("failed to resolve host 'pw2@127.0.0.1'") or,
#: with a ':' in it, for the port ("invalid literal for int() ... 'pw2@127.0.0.1:5432'").
AT_PASSWORDS = [f"pg@{CANARY}", f"pg@x:{CANARY}", f"pg@{CANARY}/x"]


@pytest.mark.parametrize("password", AT_PASSWORDS)
def test_at_in_a_database_password_is_refused_without_echoing_it(password: str,
                                                                tmp_path: Path) -> None:
    url = f"postgresql://logprobe:{password}@127.0.0.1:5432/logprobe"
    proc = subprocess.run(logprobe_command("--database-url", url, "db", "upgrade"),
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)
    output = proc.stdout + proc.stderr
    assert _leaks(output, password) == [], output
    assert proc.returncode == 2 and "%40" in output, output
    assert "postgresql://logprobe:***@127.0.0.1:5432/logprobe" in output

    with Client(redis_url="redis://127.0.0.1:1/0", database_url=url,
                home=str(tmp_path)) as client, pytest.raises(ConfigError) as err:
        client.sql("SELECT 1 AS x")
    assert _leaks(str(err.value), password) == [] and "%40" in str(err.value)


def test_worker_refuses_at_in_a_database_password_at_its_start(tmp_path: Path) -> None:
    """Not a job at a time: each would log "database unreachable ... failed to resolve
    host '<rest of the password>@db'" while retrying."""
    password = AT_PASSWORDS[0]
    env = subprocess_env(
        LOGPROBE_REDIS_URL=os.environ.get("LOGPROBE_TEST_REDIS_URL", "redis://127.0.0.1:6379/10"),
        LOGPROBE_DATABASE_URL=f"postgresql://logprobe:{password}@127.0.0.1:5432/logprobe",
        LOGPROBE_HOME=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "worker", "--backend", "hf", "--pool", "solo",
                             "--queues", "logprobe.hf.secrets-test"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO_ROOT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    assert _leaks(output, password) == [], output
    assert proc.returncode == 2 and "%40" in output, output


def test_running_example_masks_the_broker_password(password_redis: str,  # noqa: F811
                                                  tiny_gpt2: str, tmp_path: Path) -> None:
    """examples/running_example.py prints "database:" and "broker:" lines; with no
    worker (``--no-worker``) it stops at the first wait, after printing them."""
    env = subprocess_env(LOGPROBE_REDIS_URL=password_redis, LOGPROBE_HOME=str(tmp_path))
    env.pop("LOGPROBE_DATABASE_URL", None)
    proc = subprocess.run(
        [sys.executable, "examples/running_example.py", "--model", tiny_gpt2, "--no-worker",
         "--timeout", "1"],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    output = proc.stdout + proc.stderr
    assert "broker:" in proc.stdout, output
    assert _leaks(output, PASSWORD) == [], output
    assert "broker:   redis://:***@127.0.0.1:" in proc.stdout


def test_password_query_parameters_and_store_urls_are_masked() -> None:
    """libpq and redis-py also read a password from the query string; an fsspec store
    URL may carry credentials: neither is shown in messages."""
    from api_client.artifacts import ArtifactStore, load_array
    from api_client.errors import ArtifactError
    from api_client.settings import mask_url

    assert mask_url(f"redis://h:6379/0?password={CANARY}") == "redis://h:6379/0?password=***"
    assert mask_url(f"postgresql://u@h/d?sslmode=require&PASSWORD={CANARY}#x") == \
        "postgresql://u@h/d?sslmode=require&PASSWORD=***#x"
    client = Client(redis_url="redis://127.0.0.1:1/0",
                    database_url=f"postgresql://u@127.0.0.1:1/d?password={CANARY}")
    assert CANARY not in client.database_url_safe and "password=***" in client.database_url_safe
    assert CANARY not in repr(client.settings)

    store = ArtifactStore(f"memory://user:{CANARY}@bucket/store")
    assert CANARY not in repr(store)
    with pytest.raises(ArtifactError) as err:
        load_array(f"memory://user:{CANARY}@bucket/store/none.safetensors", "0" * 64)
    assert CANARY not in str(err.value) and ":***@bucket" in str(err.value)
