"""docker-compose.yml, the Dockerfile and .env.example say what docs/deployment.md says.

``docker compose config`` validates the file where the compose plugin is installed;
everywhere else the YAML is parsed and checked here (no Docker engine is needed).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
GPU_WORKERS = {"worker-gpu0": "0", "worker-gpu1": "1"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _compose_plugin(), reason="the docker compose plugin is not installed "
                    "(the YAML checks below still run)")
def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["docker", "compose", "--env-file", str(REPO_ROOT / ".env.example"), "-f", str(COMPOSE),
         "--profile", "cpu", "--profile", "openai", "config", "--quiet"],
        capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr


def test_services_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "postgres", "migrate", *GPU_WORKERS, "worker-cpu",
                             "worker-openai", "flower"}
    assert set(compose["volumes"]) == {"redis-data", "postgres-data", "hf-cache", "artifacts"}
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "redis-data:/data" in services["redis"]["volumes"]
    for name in ("redis", "postgres", "flower", *GPU_WORKERS, "worker-openai"):
        check = services[name]["healthcheck"]["test"]
        assert check[0] in ("CMD", "CMD-SHELL") and len(check) >= 2, name
    for name in ("redis", "postgres", "flower"):  # published on localhost unless told
        assert all(port.startswith("${") and "127.0.0.1" in port
                   for port in services[name]["ports"]), name


def _argv_text(words: str | list[str]) -> str:
    """A command or healthcheck as the words its processes get: here-document bodies
    (which the shell writes to a pipe, not to anyone's argv) are left out."""
    text = words if isinstance(words, str) else " ".join(words)
    return re.sub(r"<<-?\s*'?(\w+)'?\n.*?^\1$", "<<heredoc", text, flags=re.S | re.M)


def test_no_password_on_any_command_line(compose: dict[str, Any]) -> None:
    # Arguments are visible to every user of the host (`ps`, `docker top`) and in
    # `docker inspect`; passwords reach commands only through their environment.
    assert _argv_text("a <<EOF\nrequirepass \"$$X\"\nEOF\n b") == "a <<heredoc\n b"
    for name, service in compose["services"].items():
        for what in ("command", "healthcheck"):
            words = service.get(what)
            if what == "healthcheck" and words:
                words = words["test"]
            if not words:
                continue
            text = _argv_text(words)
            assert not re.search(r"\$\$?\{?\w*(PASSWORD|PASS|SECRET|TOKEN|AUTH)", text, re.I), (
                name, what, text)
            assert not re.search(r"--requirepass|--basic[-_]auth|--broker|\s-a\s|://[^\s@]*@",
                                 text), (name, what, text)


def test_redis_has_a_password_and_persists(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert '\nrequirepass "$$REDIS_PASSWORD"\n' in command and "redis-server - " in command
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")


def test_redis_command_and_healthcheck_run(compose: dict[str, Any], tmp_path: Path) -> None:
    """The compose Redis command (password from a here-document on stdin) and its
    healthcheck (password from REDISCLI_AUTH), run with a local redis-server."""
    import redis

    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not server or not cli:
        pytest.skip("redis-server and redis-cli are not installed")
    service = compose["services"]["redis"]
    shell, flag, script = service["command"]
    assert (shell, flag) == ("sh", "-c")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = script.replace("$$", "$").replace(
        "redis-server - ", f"{server} - --port {port} --bind 127.0.0.1 --dir {tmp_path} ", 1)
    password = "pw-from-env_1"
    env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": password}
    proc = subprocess.Popen([shell, flag, script], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    check = service["healthcheck"]["test"]
    assert check[0] == "CMD-SHELL"
    health = check[1].replace("$$", "$").replace("redis-cli", f"{cli} -p {port}", 1)

    def healthy(auth: str) -> bool:
        return subprocess.run(["sh", "-c", health], env={"PATH": os.environ["PATH"],
                              "REDISCLI_AUTH": auth}, capture_output=True).returncode == 0

    try:
        deadline = time.monotonic() + 15
        while not healthy(password):
            assert proc.poll() is None and time.monotonic() < deadline, "redis did not start"
            time.sleep(0.1)
        assert not healthy("wrong")
        client = redis.Redis(port=port, password=password)
        assert client.info("server")["process_id"] == proc.pid  # exec: no shell left over
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password="wrong").ping()
    finally:
        proc.terminate()
        proc.wait(10)


def test_flower_reads_its_secrets_from_the_environment(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    assert flower["command"] == ["celery", "flower", "--port=5555"]
    env = flower["environment"]
    assert env["CELERY_BROKER_URL"] == (
        "redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD in .env}@redis:6379/0")
    assert env["FLOWER_BASIC_AUTH"] == (
        "${FLOWER_USER:-admin}:${FLOWER_PASSWORD:?set FLOWER_PASSWORD in .env}")


def test_postgres_healthcheck_uses_tcp(compose: dict[str, Any]) -> None:
    check = compose["services"]["postgres"]["healthcheck"]["test"]
    assert check[0] == "CMD-SHELL" and check[1].startswith("pg_isready -h 127.0.0.1 ")


def test_workers_share_one_artifact_store(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("migrate", *GPU_WORKERS, "worker-cpu", "worker-openai"):
        assert services[name]["environment"]["LOGPROBE_ARTIFACTS_URL"] == "/artifacts", name
        assert "artifacts:/artifacts" in services[name]["volumes"], name
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "mkdir -p /cache/huggingface /artifacts" in dockerfile  # owned by the image's user
    assert "chown logprobe:logprobe /cache/huggingface /artifacts" in dockerfile


def test_hf_token_reaches_only_workers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "HF_TOKEN" not in services["migrate"]["environment"]
    for name in (*GPU_WORKERS, "worker-cpu", "worker-openai"):
        assert services[name]["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}", name


def test_migrate_runs_once_before_workers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["logprobe", "db", "upgrade"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in (*GPU_WORKERS, "worker-cpu", "worker-openai"):
        assert services[name]["depends_on"] == {
            "redis": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
        }, name
        env = services[name]["environment"]
        assert env["LOGPROBE_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD")
        assert env["LOGPROBE_DATABASE_URL"].startswith("postgresql://${POSTGRES_USER")


def test_one_hf_worker_per_gpu(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, gpu in GPU_WORKERS.items():
        service = services[name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": [gpu], "capabilities": ["gpu"]}]
        command = service["command"]
        assert command[:4] == ["logprobe", "worker", "--backend", "hf"]
        # The container sees only its reserved GPU, as device 0.
        assert command[command.index("--gpu") + 1] == "0"
        assert command[command.index("--hostname") + 1] == f"hf-gpu{gpu}@%h"
        assert service["environment"]["WORKER_NAME"] == f"hf-gpu{gpu}"
    assert "deploy" not in services["worker-cpu"] and "--gpu" not in services["worker-cpu"][
        "command"]


def test_openai_key_comes_from_an_env_file(compose: dict[str, Any]) -> None:
    service = compose["services"]["worker-openai"]
    assert service["command"][:4] == ["logprobe", "worker", "--backend", "openai"]
    assert service["env_file"][0]["path"] == "openai.env"
    assert "OPENAI_API_KEY" not in COMPOSE.read_text()
    assert "OPENAI_API_KEY" not in (REPO_ROOT / ".env.example").read_text().split("\n# The")[0]
    assert "OPENAI_API_KEY=" in (REPO_ROOT / "openai.env.example").read_text()
    ignored = (REPO_ROOT / ".gitignore").read_text().split()
    assert ".env" in ignored and "openai.env" in ignored


def test_every_required_variable_is_in_env_example() -> None:
    text = COMPOSE.read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    example = {line.split("=", 1)[0] for line in (REPO_ROOT / ".env.example").read_text()
               .splitlines() if line and not line.startswith("#")}
    assert used <= example, used - example
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    assert {"REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD"} <= required


def test_dockerfile_installs_like_the_readme() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert "ARG TORCH_VARIANT=cpu" in text and "ARG TORCH_VERSION=" in text
    torch = text.index('pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"')
    project = text.index('pip install ".[${EXTRAS}]"')
    assert torch < project  # torch first, pinned, so pip keeps the chosen build
    assert "ARG EXTRAS=worker,postgres" in text
    setup = (REPO_ROOT / "scripts" / "setup.sh").read_text()
    pinned = re.search(r"torch==([\d.]+)", setup)
    assert pinned and f"ARG TORCH_VERSION={pinned.group(1)}" in text
    assert re.search(r"^USER logprobe$", text, re.M)
