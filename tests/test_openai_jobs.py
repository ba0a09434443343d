"""OpenAI jobs as jobs: cancellation, time limits, requests in flight, call timeouts.

A real ``logprobe worker --backend openai`` process (SQLite and PostgreSQL) runs
against the fake server of ``tests/openai_server.py`` through the real ``openai``
client; the tests assert on job rows and on the requests the server saw. Latency
and limits are scaled down to fractions of a second so the module stays short.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator

import pytest
import redis as redis_lib

from api_client import Client
from api_client.constants import REDIS_PREFIX
from tests.helpers import WorkerProcess
from tests.openai_server import FakeOpenAI, RecordedRequest

API_KEY = "sk-test-" + uuid.uuid4().hex
LIMIT_NAME = uuid.uuid4().hex
CONCURRENCY = 4  # LOGPROBE_OPENAI_CONCURRENCY: requests in flight per message
RPM, WINDOW_S = 6, 1.0  # a shared limit of 6 requests per 1 s window (+0.25 s pad)
TIMEOUT_S, TIMEOUT_PER_TOKEN_S = 0.4, 0.02


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _calm_server(server: FakeOpenAI, redis_url: str) -> Iterator[None]:
    """Each test starts with a fast, complete server and no shared 429 pause."""
    yield
    server.latency_s = server.latency_per_token_s = 0.0
    server.text_offsets = True
    server.clear()
    connection = redis_lib.Redis.from_url(redis_url)
    connection.delete(f"{REDIS_PREFIX}:openai:ratelimit:{{{LIMIT_NAME}}}:pause_until")
    connection.close()


@pytest.fixture(scope="module")
def worker(module_database_url: str, redis_url: str, server: FakeOpenAI,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    process = WorkerProcess(
        backend="openai", queue=f"logprobe.openai.test-{uuid.uuid4().hex[:8]}",
        redis_url=redis_url, database_url=module_database_url,
        log_dir=tmp_path_factory.mktemp("openai-jobs-logs"), extra_args=["-c", "2"],
        env={"OPENAI_API_KEY": API_KEY, "LOGPROBE_OPENAI_BASE_URL": server.url,
             "LOGPROBE_OPENAI_LIMIT_NAME": LIMIT_NAME, "LOGPROBE_OPENAI_RPM": str(RPM),
             "LOGPROBE_OPENAI_WINDOW_S": str(WINDOW_S),
             "LOGPROBE_OPENAI_CONCURRENCY": str(CONCURRENCY),
             "LOGPROBE_OPENAI_MAX_ATTEMPTS": "3", "LOGPROBE_OPENAI_BACKOFF_S": "0.1",
             "LOGPROBE_OPENAI_TIMEOUT_S": str(TIMEOUT_S),
             "LOGPROBE_OPENAI_TIMEOUT_PER_TOKEN_S": str(TIMEOUT_PER_TOKEN_S),
             "LOGPROBE_OPENAI_SCORE_MAX_TOKENS": "1"},
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(worker: WorkerProcess) -> Iterator[Client]:
    with worker.client() as c:
        yield c


def generate_specs(prompts: list[str], max_new_tokens: int = 2) -> list[dict]:
    return [{"kind": "generate", "prompt": p, "model": "davinci-002", "backend": "openai",
             "max_new_tokens": max_new_tokens} for p in prompts]


def sent(server: FakeOpenAI, prompts: list[str]) -> list[RecordedRequest]:
    return [r for r in server.recorded() if r.body.get("prompt") in prompts]


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def rows_of(client: Client, job_id: str) -> tuple[int, int]:
    frame = client.sql("SELECT (SELECT COUNT(*) FROM sequences WHERE job_id = :j) AS s, "
                       "(SELECT COUNT(*) FROM tokens WHERE job_id = :j) AS t", {"j": job_id})
    return int(frame.iloc[0]["s"]), int(frame.iloc[0]["t"])


def job_row(client: Client, job_id: str) -> dict:
    return client.sql("SELECT * FROM jobs WHERE id = :j", {"j": job_id}).iloc[0].to_dict()


def max_in_flight(requests: list[RecordedRequest]) -> int:
    return max(sum(1 for r in requests if r.time <= x.time < r.done) for x in requests)


def test_score_without_text_offsets_drops_the_generated_token(
        client: Client, server: FakeOpenAI) -> None:
    server.text_offsets = False  # optional in openai's Logprobs type
    text = f"The cat sat on the mat {uuid.uuid4().hex[:6]}"
    result = client.score(text, model="davinci-002", backend="openai",
                          top_logprobs=2).result(timeout=60)

    (request,) = sent(server, [text])
    assert request.body["max_tokens"] == 1  # LOGPROBE_OPENAI_SCORE_MAX_TOKENS=1
    logprobs = request.response["choices"][0]["logprobs"]
    assert logprobs["text_offset"] is None
    n_prompt = request.response["usage"]["prompt_tokens"]
    assert len(logprobs["tokens"]) == n_prompt + 1  # the prompt, then one generated token
    assert [t.token for t in result.tokens] == logprobs["tokens"][:n_prompt]
    scored = logprobs["token_logprobs"][1:n_prompt]
    assert job_row(client, result.job_id)["num_scored_tokens"] == n_prompt - 1
    assert result.loss == pytest.approx(-math.fsum(scored) / len(scored), abs=1e-12)
    assert rows_of(client, result.job_id) == (1, n_prompt)
