"""Bad input: refused at submit where possible, otherwise a failed job with its error in
SQL, and the worker goes on serving the next job."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from api_client import JobFailed, JobStatus, SpecError
from api_client.constants import TASK_RUN_PROBES
from api_client.schema import Job
from api_client.specs import make_spec

TEXT = "Finn writes code"


def assert_still_serving(client, model: str) -> None:
    res = client.score(TEXT, model=model).result(timeout=120)
    assert res.loss is not None and res.loss > 0


def failed_error(job) -> str:
    with pytest.raises(JobFailed) as info:
        job.result(timeout=120)
    row = job.info()
    assert row["status"] is JobStatus.FAILED
    assert row["error"] == info.value.error
    assert row["finished_at"] is not None
    return info.value.error


def test_unknown_model_fails_the_job_not_the_worker(client, hf_worker, tiny_gpt2) -> None:
    error = failed_error(client.score(TEXT, model="no-such-org/no-such-model-xyz"))
    assert "could not load model 'no-such-org/no-such-model-xyz'" in error
    assert hf_worker.alive()
    assert_still_serving(client, tiny_gpt2)


def test_over_long_input_fails_with_context_message(client, hf_worker, tiny_gpt2) -> None:
    long_text = "word " * 200  # 200 tokens > the tiny model's 128-token context
    error = failed_error(client.score(long_text, model=tiny_gpt2))
    assert "more than the 128-token context" in error
    assert "shorten the input" in error
    error = failed_error(client.generate(TEXT, model=tiny_gpt2, max_new_tokens=126))
    assert "max_new_tokens 126" in error and "lower max_new_tokens" in error
    assert_still_serving(client, tiny_gpt2)


def test_token_id_outside_vocabulary(client, tiny_gpt2) -> None:
    error = failed_error(client.score(model=tiny_gpt2, token_ids=[10, 999_999]))
    assert "token id 999999, outside the vocabulary" in error


def test_malformed_spec_in_a_message_fails_in_the_worker(client, hf_worker, tiny_gpt2) -> None:
    # A message that bypassed the client's validation (another producer, an old client).
    job_id = uuid.uuid4().hex
    bad_spec = {"kind": "score", "model": tiny_gpt2, "text": TEXT, "top_logprobs": 99}
    with client.session() as session, session.begin():
        session.add(Job(id=job_id, kind="score", backend="hf", model=tiny_gpt2,
                        status=JobStatus.QUEUED, spec=bad_spec, queue=hf_worker.queue,
                        created_at=datetime.now(timezone.utc)))
    client.celery.send_task(TASK_RUN_PROBES, args=[{"jobs": [{"id": job_id, "spec": bad_spec}]}],
                            queue=hf_worker.queue)
    # A message for a job that SQL does not know is dropped.
    client.celery.send_task(TASK_RUN_PROBES, args=[{"jobs": [{"id": "missing", "spec": {}}]}],
                            queue=hf_worker.queue)
    error = failed_error(client.job(job_id))
    assert "top_logprobs" in error and "less than or equal to 20" in error
    assert_still_serving(client, tiny_gpt2)


def test_invalid_spec_is_refused_at_submit_and_writes_nothing(client) -> None:
    before = client.sql("SELECT COUNT(*) AS n FROM jobs").iloc[0]["n"]
    with pytest.raises(SpecError, match="top_logprobs"):
        client.score(TEXT, model="gpt2", top_logprobs=50)
    with pytest.raises(SpecError, match="does not exist"):
        client.score(TEXT, model="/no/such/model/dir")
    with pytest.raises(SpecError, match="do_sample=True"):
        client.generate(TEXT, model="gpt2", seed=3)
    with pytest.raises(SpecError, match="prompt"):
        client.submit_many([{"kind": "generate", "model": "gpt2", "prompt": "ok"},
                            {"kind": "generate", "model": "gpt2"}])
    # Too long for the jobs table's columns (PostgreSQL would refuse the row).
    with pytest.raises(SpecError, match=r"queue: .* 129 characters"):
        client.score(TEXT, model="gpt2", queue="q" * 129)
    with pytest.raises(SpecError, match="model: String should have at most 512"):
        client.score(TEXT, model="m" * 513)
    with pytest.raises(SpecError, match="token_ids"):
        client.score(TEXT, model="gpt2", token_ids=[])
    # A spec varied with model_copy is validated too, and a string is not a list.
    base = make_spec("generate", prompt=TEXT, model="gpt2")
    with pytest.raises(SpecError, match="top_logprobs"):
        client.submit(base.model_copy(update={"top_logprobs": 500}))
    with pytest.raises(SpecError, match="texts: pass a list"):
        client.score_many(TEXT, model="gpt2")
    with pytest.raises(SpecError, match="queues: pass a list"):
        client.repeat(base, n=2, queues="logprobe.hf")
    assert client.sql("SELECT COUNT(*) AS n FROM jobs").iloc[0]["n"] == before


def test_a_relative_home_is_made_absolute(tmp_path, monkeypatch) -> None:
    """A client and a worker started in different directories with LOGPROBE_HOME=rel
    must share one SQLite file and one embedded Redis."""
    from api_client.settings import Settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOGPROBE_HOME", "lp")
    assert Settings.from_env().home == tmp_path / "lp"
    assert Settings.from_env(home="~/x").home == Path.home() / "x"
    assert Settings.from_env().resolved_database_url() == f"sqlite:///{tmp_path / 'lp'}/logprobe.db"


def test_token_ids_as_an_array_and_a_sweep_with_a_time_limit(client, tiny_gpt2) -> None:
    import numpy as np
    import torch

    ids = [464, 2068, 7586]
    from_numpy = client.score(model=tiny_gpt2, token_ids=np.array(ids)).result(timeout=120)
    from_torch = client.score(model=tiny_gpt2, token_ids=torch.tensor([ids])).result(timeout=120)
    assert [t.token_id for t in from_numpy.tokens] == [t.token_id for t in from_torch.tokens] \
        == ids
    assert from_numpy.loss == from_torch.loss
    sweep = client.sweep([TEXT, "another text"], models=[tiny_gpt2], time_limit=120)
    limits = client.sql("SELECT time_limit FROM jobs WHERE sweep_id = :s",
                        {"s": sweep.id})["time_limit"]
    assert limits.tolist() == [120, 120]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_database_without_the_schema_says_to_create_it(kind, tmp_path, redis_url) -> None:
    """An explicit database URL whose schema was never created: submit says what to
    run, not SQLAlchemy's "no such table"; nothing reaches the broker."""
    import redis as redis_py

    from api_client import Client, ConfigError
    from tests.conftest import POSTGRES_URL
    from tests.helpers import create_postgres_database, drop_postgres_database

    if kind == "postgres" and POSTGRES_URL == "skip":
        pytest.skip("LOGPROBE_TEST_POSTGRES_URL=skip")
    name = f"logprobe_test_{uuid.uuid4().hex[:12]}"
    url = (f"sqlite:///{tmp_path / 'empty.db'}" if kind == "sqlite"
           else create_postgres_database(POSTGRES_URL, name))
    queue = f"test-no-schema-{uuid.uuid4().hex[:8]}"
    try:
        with (Client(redis_url=redis_url, database_url=url, queue=queue) as client,
              pytest.raises(ConfigError, match=r"has no logprobe tables; create them with "
                            r"`logprobe db upgrade`")):
            client.score(TEXT, model="gpt2")
        assert redis_py.Redis.from_url(redis_url).llen(queue) == 0
    finally:
        if kind == "postgres":
            drop_postgres_database(POSTGRES_URL, name)
