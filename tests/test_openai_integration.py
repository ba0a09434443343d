"""OpenAI probes through a real ``logprobe worker --backend openai`` process.

The worker uses the real ``openai`` client against the fake OpenAI-compatible
server of ``tests/openai_server.py`` on 127.0.0.1; every test compares the rows
in SQL with what the server recorded it sent. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion
from sqlalchemy import inspect, text

from api_client import Client, JobStatus
from api_client.errors import JobFailed
from tests.helpers import WorkerProcess
from tests.openai_server import FakeOpenAI, Fault, RecordedRequest

API_KEY = "sk-test-" + uuid.uuid4().hex  # must never reach SQL or a log line


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(fingerprint="fp_fake_1") as server:
        yield server


@pytest.fixture(scope="module")
def openai_worker(module_database_url: str, redis_url: str, fake_openai: FakeOpenAI,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(
        backend="openai", queue=f"logprobe.openai.test-{uuid.uuid4().hex[:8]}",
        redis_url=redis_url, database_url=module_database_url,
        log_dir=tmp_path_factory.mktemp("openai-worker-logs"), extra_args=["-c", "2"],
        env={"OPENAI_API_KEY": API_KEY, "LOGPROBE_OPENAI_BASE_URL": fake_openai.url,
             "LOGPROBE_OPENAI_LIMIT_NAME": uuid.uuid4().hex, "LOGPROBE_OPENAI_RPM": "0",
             "LOGPROBE_OPENAI_MAX_ATTEMPTS": "3", "LOGPROBE_OPENAI_BACKOFF_S": "0.1"},
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def oclient(openai_worker: WorkerProcess) -> Iterator[Client]:
    with openai_worker.client() as c:
        yield c


def sent(server: FakeOpenAI, key: str, value: object) -> list[RecordedRequest]:
    """The recorded requests whose body has ``key == value``, in arrival order."""
    return [r for r in server.recorded() if r.body.get(key) == value]


def job_row(client: Client, job_id: str) -> dict:
    row = client.sql("SELECT * FROM jobs WHERE id = :j", {"j": job_id}).iloc[0].to_dict()
    if isinstance(row["request_params"], str):  # SQLite returns JSON as text via pandas
        row["request_params"] = json.loads(row["request_params"])
    return row


def token_rows(client: Client, job_id: str, sequence: int = 0) -> list[dict]:
    frame = client.sql("SELECT position, token_id, token, logprob, generated FROM tokens "
                       "WHERE job_id = :j AND sequence_index = :s ORDER BY position",
                       {"j": job_id, "s": sequence})
    return frame.to_dict("records")


def alternative_rows(client: Client, job_id: str, sequence: int = 0) -> dict[int, list]:
    frame = client.sql("SELECT position, rank, token_id, token, logprob FROM top_logprobs "
                       "WHERE job_id = :j AND sequence_index = :s ORDER BY position, rank",
                       {"j": job_id, "s": sequence})
    out: dict[int, list] = {}
    for row in frame.to_dict("records"):
        assert row["token_id"] is None or math.isnan(row["token_id"])
        out.setdefault(int(row["position"]), []).append((row["token"], row["logprob"]))
    return out


def is_null(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def test_score_rows_are_what_the_server_sent(oclient: Client, fake_openai: FakeOpenAI) -> None:
    prompt = f"Score this {uuid.uuid4().hex[:6]} sentence please"
    res = oclient.score(prompt, model="davinci-002", backend="openai",
                        top_logprobs=3).result(timeout=60)

    (request,) = sent(fake_openai, "prompt", prompt)
    assert request.path == "/v1/completions"
    assert request.authorization == f"Bearer {API_KEY}"  # the key is sent ...
    assert request.body == {"model": "davinci-002", "prompt": prompt, "echo": True,
                            "max_tokens": 0, "temperature": 0, "logprobs": 3}
    lp = request.response["choices"][0]["logprobs"]

    rows = token_rows(oclient, res.job_id)
    assert [r["token"] for r in rows] == lp["tokens"]
    assert [None if is_null(r["logprob"]) else r["logprob"] for r in rows] == \
        lp["token_logprobs"]
    assert lp["token_logprobs"][0] is None
    assert all(is_null(r["token_id"]) for r in rows)  # no offline encoding: NULL, not made up
    assert not any(r["generated"] for r in rows)
    alternatives = alternative_rows(oclient, res.job_id)
    assert 0 not in alternatives
    for position, top in enumerate(lp["top_logprobs"][1:], start=1):
        assert alternatives[position] == sorted(top.items(), key=lambda kv: -kv[1])

    scored = lp["token_logprobs"][1:]
    assert res.loss == pytest.approx(-math.fsum(scored) / len(scored), abs=1e-12)
    job = job_row(oclient, res.job_id)
    assert job["num_scored_tokens"] == len(scored)
    assert job["system_fingerprint"] == "fp_fake_1"
    assert job["model_revision"] == request.response["model"]
    assert job["request_params"] == {"endpoint": "completions", **request.body}
    assert (job["prompt_tokens"], job["completion_tokens"]) == (
        request.response["usage"]["prompt_tokens"], request.response["usage"]["completion_tokens"])
    assert job["openai_version"]


def test_sampled_generation_records_the_seed_it_sent(oclient: Client,
                                                     fake_openai: FakeOpenAI) -> None:
    prompt = f"Once upon {uuid.uuid4().hex[:6]}"
    res = oclient.generate(prompt, model="gpt-3.5-turbo-instruct", backend="openai",
                           max_new_tokens=4, do_sample=True, temperature=0.8,
                           num_return_sequences=2, top_logprobs=2).result(timeout=60)

    (request,) = sent(fake_openai, "prompt", prompt)
    assert isinstance(request.body["seed"], int)  # picked by the worker ...
    assert res.seed == request.body["seed"]  # ... and stored
    assert request.body["temperature"] == 0.8 and request.body["n"] == 2
    prompt_tokens = request.response["usage"]["prompt_tokens"]
    for choice in request.response["choices"]:
        index = choice["index"]
        seq = res.sequences[index]
        assert seq.text == choice["text"] and seq.finish_reason == choice["finish_reason"]
        rows = token_rows(oclient, res.job_id, index)
        assert [(r["position"], r["token"], r["logprob"], bool(r["generated"])) for r in rows] == [
            (prompt_tokens + i, t, v, True) for i, (t, v) in
            enumerate(zip(choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"],
                          strict=True))]
        alternatives = alternative_rows(oclient, res.job_id, index)
        for i, top in enumerate(choice["logprobs"]["top_logprobs"]):
            assert alternatives[prompt_tokens + i] == sorted(top.items(), key=lambda kv: -kv[1])


def test_chat_generation_rows(oclient: Client, fake_openai: FakeOpenAI) -> None:
    prompt = f"Say hi {uuid.uuid4().hex[:6]}"
    res = oclient.generate(prompt, model="gpt-4o-mini", backend="openai", openai_api="chat",
                           max_new_tokens=3, top_logprobs=4).result(timeout=60)

    (request,) = [r for r in fake_openai.recorded()
                  if r.body.get("messages") == [{"role": "user", "content": prompt}]]
    assert request.path == "/v1/chat/completions"
    assert request.body["temperature"] == 0 and "seed" not in request.body  # greedy
    assert request.body["logprobs"] is True and request.body["top_logprobs"] == 4
    choice = request.response["choices"][0]
    assert res.text == choice["message"]["content"]
    content = choice["logprobs"]["content"]
    assert [(t.token, t.logprob) for t in res.tokens] == [(c["token"], c["logprob"])
                                                          for c in content]
    for token, item in zip(res.tokens, content, strict=True):
        assert [(a.token, a.logprob) for a in token.top_logprobs] == [
            (a["token"], a["logprob"]) for a in item["top_logprobs"]]
    assert job_row(oclient, res.job_id)["request_params"]["endpoint"] == "chat"


def test_echo_refusal_fails_the_job_clearly_and_the_worker_goes_on(
        oclient: Client, openai_worker: WorkerProcess) -> None:
    job = oclient.score("The cat sat", model="gpt-3.5-turbo-instruct", backend="openai")
    with pytest.raises(JobFailed) as failure:
        job.result(timeout=60)
    message = failure.value.error
    assert message.startswith("model gpt-3.5-turbo-instruct cannot score prompts (echo with "
                              "logprobs refused: HTTP 400 invalid_parameter_combination")
    assert "use davinci-002 or babbage-002, or the hf backend" in message
    assert "Traceback" not in message
    assert job_row(oclient, job.id)["error_type"] == "ProbeInputError"
    assert openai_worker.alive()
    ok = oclient.score("The cat sat", model="davinci-002", backend="openai").result(timeout=60)
    assert ok.status is JobStatus.SUCCEEDED


def create(server: FakeOpenAI, endpoint: str, **params: object
           ) -> Completion | ChatCompletion:
    """One call through the real ``openai`` client, without its retries."""
    with openai.OpenAI(api_key=API_KEY, base_url=server.url, max_retries=0) as client:
        if endpoint == "chat":
            return client.chat.completions.create(
                model="gpt-4o-mini", max_tokens=1,
                messages=[{"role": "user", "content": "x"}], **params)
        return client.completions.create(model="davinci-002", prompt="x", max_tokens=1,
                                         **params)


@pytest.mark.parametrize(("endpoint", "params", "param", "code"), [
    ("completions", {"logprobs": 6}, "logprobs", "integer_above_max_value"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "integer_above_max_value"),
    ("chat", {"top_logprobs": 3}, "top_logprobs", "invalid_value"),
    ("chat", {"logprobs": False, "top_logprobs": 3}, "top_logprobs", "invalid_value"),
])
def test_the_fake_server_refuses_what_the_api_refuses(
        fake_openai: FakeOpenAI, endpoint: str, params: dict, param: str, code: str) -> None:
    # A payload regression (more alternatives than the API gives, top_logprobs
    # without logprobs) must fail here as it would against api.openai.com.
    with pytest.raises(openai.BadRequestError) as refused:
        create(fake_openai, endpoint, **params)
    error = refused.value.body
    assert (refused.value.status_code, error["type"], error["param"], error["code"]) == (
        400, "invalid_request_error", param, code)
    assert f"'{param}'" in error["message"]


def test_the_fake_server_accepts_the_api_limits(fake_openai: FakeOpenAI) -> None:
    completion = create(fake_openai, "completions", logprobs=5)
    assert len(completion.choices[0].logprobs.top_logprobs[0]) == 5
    chat = create(fake_openai, "chat", logprobs=True, top_logprobs=20)
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 20


def test_server_errors_are_retried_then_fail_with_the_last_error(
        oclient: Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.inject(Fault(500, message="boom 1"), Fault(503, message="boom 2"))
    prompt = f"retry me {uuid.uuid4().hex[:6]}"
    res = oclient.generate(prompt, model="davinci-002", backend="openai",
                           max_new_tokens=2).result(timeout=60)
    assert [r.status for r in sent(fake_openai, "prompt", prompt)] == [500, 503, 200]
    assert res.status is JobStatus.SUCCEEDED

    fake_openai.inject(*[Fault(500, message=f"down {i}") for i in range(3)])
    prompt = f"give up {uuid.uuid4().hex[:6]}"
    job = oclient.generate(prompt, model="davinci-002", backend="openai", max_new_tokens=2)
    with pytest.raises(JobFailed, match=r"OpenAI request failed after 3 attempts; last error: "
                                        r"HTTP 500: down 2"):
        job.result(timeout=60)
    requests = sent(fake_openai, "prompt", prompt)
    assert len(requests) == 3
    # The failed job still records the request it sent (greedy: no seed).
    row = job_row(oclient, job.id)
    assert row["request_params"] == {"endpoint": "completions", **requests[-1].body}
    assert row["seed"] is None or math.isnan(row["seed"])


def test_a_refused_sampled_request_records_what_it_sent_and_its_picked_seed(
        oclient: Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.inject(Fault(400, code="invalid_value", message="refused"))
    prompt = f"refuse me {uuid.uuid4().hex[:6]}"
    job = oclient.generate(prompt, model="davinci-002", backend="openai", max_new_tokens=2,
                           do_sample=True, temperature=0.7)
    with pytest.raises(JobFailed, match="refused"):
        job.result(timeout=60)
    (request,) = sent(fake_openai, "prompt", prompt)  # not retried: the input's fault
    row = job_row(oclient, job.id)
    assert row["status"] == "failed"
    assert row["request_params"] == {"endpoint": "completions", **request.body}
    assert row["seed"] == request.body["seed"] and request.body["temperature"] == 0.7


def test_repeats_view_shows_identical_text_and_fingerprint_changes(
        oclient: Client, fake_openai: FakeOpenAI) -> None:
    prompt = f"Repeat {uuid.uuid4().hex[:6]}"
    for fingerprint in ("fp_a", "fp_a", "fp_b"):
        fake_openai.set_fingerprint(fingerprint)
        oclient.generate(prompt, model="davinci-002", backend="openai", max_new_tokens=3,
                         do_sample=True, seed=42).result(timeout=60)
    fake_openai.set_fingerprint("fp_fake_1")
    unseeded = [oclient.generate(prompt, model="davinci-002", backend="openai",
                                 max_new_tokens=3, do_sample=True) for _ in range(2)]
    for job in unseeded:
        job.result(timeout=60)

    frame = oclient.sql("SELECT * FROM openai_repeats WHERE request_params LIKE :p",
                        {"p": f"%{prompt}%"})
    seeded = frame[frame["seed"] == 42].iloc[0]
    assert (seeded["runs"], seeded["distinct_texts"], seeded["identical_text"]) == (3, 1, 1)
    assert (seeded["distinct_fingerprints"], seeded["fingerprint_changed"]) == (2, 1)
    others = frame[frame["seed"] != 42]
    assert len(others) == 2 and set(others["runs"]) == {1}  # different picked seeds


def test_no_secret_in_the_database_or_the_logs(oclient: Client, fake_openai: FakeOpenAI,
                                               openai_worker: WorkerProcess) -> None:
    # A server that echoes the key into its error message (real ones mask it).
    fake_openai.inject(Fault(401, code="invalid_api_key",
                             message=f"Incorrect API key provided: {API_KEY}."))
    with pytest.raises(JobFailed, match=r"OpenAI rejected the API key \(HTTP 401\)"):
        oclient.score("secret check", model="davinci-002", backend="openai").result(timeout=60)
    assert all(r.authorization == f"Bearer {API_KEY}" for r in fake_openai.recorded())

    found = []
    with oclient.engine.connect() as connection:
        for table in inspect(connection).get_table_names():
            for row in connection.execute(text(f'SELECT * FROM "{table}"')):
                found += [(table, value) for value in row if API_KEY in str(value)
                          or API_KEY[8:] in str(value)]
    assert found == []
    assert oclient.sql("SELECT COUNT(*) AS n FROM jobs").iloc[0]["n"] >= 5
    log = openai_worker.log_text()
    assert "ready." in log and API_KEY not in log and API_KEY[8:] not in log
    # No request URLs either (httpx logs each at INFO): a base URL may hold a
    # proxy's credentials.
    assert fake_openai.url.split("//")[1] not in log
