"""Fixtures: tiny offline models, a real Redis, real SQLite/PostgreSQL, real workers.

Environment (defaults suit this machine and CI):
- ``LOGPROBE_TEST_REDIS_URL``: a Redis database the tests own and flush
  (default ``redis://127.0.0.1:6379/13``).
- ``LOGPROBE_TEST_POSTGRES_URL``: a PostgreSQL server where the tests create and
  drop databases of their own (default ``postgresql://postgres@127.0.0.1:5432/postgres``);
  set it to ``skip`` to run without PostgreSQL.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api_client.database import make_engine, make_sessionmaker
from tests.helpers import WorkerProcess, create_postgres_database, drop_postgres_database

REDIS_URL = os.environ.get("LOGPROBE_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
POSTGRES_URL = os.environ.get(
    "LOGPROBE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session", autouse=True)
def _offline_hub() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.tiny_models import build_gpt2, build_llama

    root = tmp_path_factory.mktemp("models")
    return {"gpt2": build_gpt2(root / "tiny-gpt2"), "llama": build_llama(root / "tiny-llama")}


@pytest.fixture(scope="session")
def long_gpt2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny GPT-2 with a 16,384-token context, for long generations (10,000 tokens)."""
    from tests.tiny_models import build_gpt2

    return str(build_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2-16k",
                          n_positions=16384))


@pytest.fixture(scope="session")
def overflow_gpt2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny GPT-2 whose float16 logits overflow (NaN logprobs in float16)."""
    from tests.tiny_models import build_gpt2_overflow

    return str(build_gpt2_overflow(tmp_path_factory.mktemp("models") / "tiny-gpt2-overflow"))


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_models: dict[str, Path]) -> str:
    return str(tiny_models["gpt2"])


@pytest.fixture(scope="session")
def tiny_llama(tiny_models: dict[str, Path]) -> str:
    return str(tiny_models["llama"])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    import redis

    connection = redis.Redis.from_url(REDIS_URL)
    try:
        connection.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"tests need a Redis at {REDIS_URL} (LOGPROBE_TEST_REDIS_URL): {exc}")
    connection.flushdb()
    yield REDIS_URL
    connection.flushdb()
    connection.close()


def _postgres_available() -> bool:
    return POSTGRES_URL != "skip"


@pytest.fixture(scope="session")
def postgres_server() -> str:
    if not _postgres_available():
        pytest.skip("LOGPROBE_TEST_POSTGRES_URL=skip")
    return POSTGRES_URL


def make_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database of ``kind`` ('sqlite' or 'postgres'); dropped after."""
    from api_client.database import upgrade_schema

    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'logprobe-test.db'}"
        upgrade_schema(url)
        yield url
        return
    if not _postgres_available():
        pytest.skip("LOGPROBE_TEST_POSTGRES_URL=skip")
    name = f"logprobe_test_{uuid.uuid4().hex[:12]}"
    url = create_postgres_database(POSTGRES_URL, name)
    try:
        upgrade_schema(url)
        yield url
    finally:
        drop_postgres_database(POSTGRES_URL, name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from make_database(request.param, tmp_path)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on a fresh database of each kind (see ``database_url``)."""
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres",
                                                                marks=pytest.mark.postgres)])
def module_database_url(request: pytest.FixtureRequest,
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from make_database(request.param, tmp_path_factory.mktemp("db"))


@pytest.fixture(scope="module")
def hf_worker(module_database_url: str, redis_url: str,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A real ``logprobe worker --backend hf`` process on its own queue."""
    queue = f"logprobe.hf.test-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(
        backend="hf", queue=queue, redis_url=redis_url, database_url=module_database_url,
        log_dir=tmp_path_factory.mktemp("worker-logs"),
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def client(hf_worker: WorkerProcess) -> Iterator[object]:
    with hf_worker.client() as c:
        yield c
