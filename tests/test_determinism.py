"""Repeat-and-compare through a real ``--deterministic`` worker on the CPU.

The worker serves two queues so that ``client.repeat(..., queues=[a, b])`` runs
the same probe configuration from both; the ``determinism_report`` view (SQLite
and PostgreSQL) and ``logprobe determinism report`` summarise the runs.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from api_client import Client
from api_client.determinism import REPORT_COLUMNS, config_hash
from api_client.specs import make_spec
from tests.helpers import REPO_ROOT, WorkerProcess, logprobe_command, subprocess_env

TEXT = "Finn writes code"


@pytest.fixture(scope="module")
def queues() -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"logprobe.hf.det-{tag}-a", f"logprobe.hf.det-{tag}-b"]


@pytest.fixture(scope="module")
def det_worker(module_database_url: str, redis_url: str, queues: list[str],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(
        backend="hf", queue=",".join(queues), redis_url=redis_url,
        database_url=module_database_url, log_dir=tmp_path_factory.mktemp("worker-logs"),
        extra_args=["--deterministic"],
        env={"LOGPROBE_ARTIFACTS_URL": str(tmp_path_factory.mktemp("artifacts"))},
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def client(det_worker: WorkerProcess, queues: list[str]) -> Iterator[Client]:
    with det_worker.client(queue=queues[0]) as c:
        yield c


def report_row(client: Client, digest: str) -> dict:
    frame = client.determinism(config_hash=digest)
    assert len(frame) == 1, frame
    return frame.iloc[0].to_dict()


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_repeat_is_deterministic(client: Client, tiny_models: dict, model_name: str) -> None:
    spec = make_spec("generate", prompt=TEXT, model=str(tiny_models[model_name]),
                     max_new_tokens=6, do_sample=True, temperature=1.0, seed=11,
                     top_logprobs=2)
    jobs = client.repeat(spec, 5)
    results = [j.result(timeout=120) for j in jobs]

    assert len({j.info()["config_hash"] for j in jobs}) == 1
    assert len({tuple(r.sequences[0].token_ids) for r in results}) == 1
    row = report_row(client, config_hash(spec))
    assert set(REPORT_COLUMNS) <= set(row)
    assert row["runs"] == 5
    assert row["distinct_outputs"] == 1
    assert row["max_abs_dlogprob"] == 0
    assert row["deterministic"] == 1
    assert row["all_deterministic_mode"] == 1
    for flag in ("seed_differs", "revision_differs", "library_versions_differ",
                 "device_differs", "fingerprint_differs", "batch_size_differs"):
        assert row[flag] == 0, flag
    assert row["min_batch_size"] == row["max_batch_size"] == 1
    assert all(j.info()["deterministic"] is True for j in jobs)
    assert all(j.info()["reused_from"] is None for j in jobs)  # every run computed

    # The same probe submitted plainly (reuse on by default) is answered from a run's
    # rows: the same configuration, but a copy is not a run.
    plain = client.submit(spec)
    assert plain.result(timeout=120).sequences[0].token_ids == results[0].sequences[0].token_ids
    assert plain.info()["reused_from"] in {j.id for j in jobs}
    assert plain.info()["config_hash"] == config_hash(spec)
    assert report_row(client, config_hash(spec))["runs"] == 5


def test_report_flags_a_planted_difference(client: Client, tiny_gpt2: str,
                                           queues: list[str]) -> None:
    fields = dict(kind="generate", prompt=TEXT, model=tiny_gpt2, max_new_tokens=8,
                  do_sample=True, temperature=1.0, seed=5)
    jobs = client.repeat(n=2, queues=queues, **fields)  # 2 runs on each of two queues
    planted = client.submit(make_spec(**{**fields, "seed": 6}))  # same config, new seed
    results = [j.result(timeout=120) for j in [*jobs, planted]]
    assert {j.info()["queue"] for j in jobs} == set(queues)

    digest = config_hash(make_spec(**fields))
    assert planted.info()["config_hash"] == digest
    distinct = len({tuple(r.sequences[0].token_ids) for r in results})
    assert distinct == 2  # seed 6 samples another sequence
    row = report_row(client, digest)
    assert row["runs"] == 5
    assert row["distinct_outputs"] == distinct
    assert row["deterministic"] == 0
    assert row["seed_differs"] == 1
    assert row["device_differs"] == 0
    # Runs with the same output tokens got the same logprobs.
    assert row["max_abs_dlogprob"] == 0

    # A score probe repeated from the CLI: the loss spread is 0; the report shows both.
    def logprobe(*args: str) -> str:
        return subprocess.run(
            logprobe_command("--redis-url", client.settings.redis_url or "", "--database-url",
                             client.settings.database_url or "", *args),
            capture_output=True, text=True, cwd=REPO_ROOT, env=subprocess_env(), timeout=120,
            check=True,
        ).stdout

    score = make_spec("score", text=TEXT, model=tiny_gpt2)
    lines = logprobe("determinism", "repeat", "score", TEXT, "-m", tiny_gpt2, "-n", "3",
                     "--queue", queues[1], "--wait", "120", "--format", "json").splitlines()
    assert lines[0] == f"config_hash {config_hash(score)}" and len(lines) == 5
    assert json.loads(lines[-1])[0]["runs"] == 3
    rows = {r["config_hash"]: r for r in json.loads(
        logprobe("determinism", "report", "--model", tiny_gpt2, "--format", "json"))}
    assert rows[digest]["deterministic"] == 0 and rows[digest]["seed_differs"] == 1
    score_row = rows[config_hash(score)]
    assert (score_row["runs"], score_row["distinct_outputs"]) == (3, 1)
    assert score_row["max_abs_dloss"] == 0 and score_row["deterministic"] == 1


def test_batch_invariance_is_reported(client: Client, tiny_gpt2: str) -> None:
    """The same text scored alone and inside a batch of other texts: the report shows
    the batch sizes and the difference, and each job records the batch it ran in."""
    spec = make_spec("score", text="Finn writes code in the evening", model=tiny_gpt2,
                     top_logprobs=1, reuse=False)
    alone = client.submit(spec)  # one message, one probe: a batch of 1
    others = [make_spec("score", text=f"Another sentence, number {i}, about nothing much",
                        model=tiny_gpt2, reuse=False) for i in range(5)]
    batched = client.submit_many([*others, spec])[-1]  # one message: scored as a batch
    first, second = alone.result(timeout=120), batched.result(timeout=120)

    size = batched.info()["batch_size"]
    assert alone.info()["batch_size"] == 1 and size > 1
    assert [t.token_id for t in first.tokens] == [t.token_id for t in second.tokens]
    expected = max(abs(a.logprob - b.logprob)
                   for a, b in zip(first.tokens[1:], second.tokens[1:], strict=True))
    row = report_row(client, config_hash(spec))
    assert row["runs"] == 2
    assert row["batch_size_differs"] == 1
    assert (row["min_batch_size"], row["max_batch_size"]) == (1, size)
    assert row["distinct_outputs"] == 1
    assert row["max_abs_dlogprob"] == pytest.approx(expected, abs=1e-12)
    assert row["max_abs_dlogprob"] <= 1e-5  # batching changes float rounding, not results
