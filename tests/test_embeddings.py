"""Embedding inputs and full logits through a real worker, checked against Hugging Face.

One worker per database (SQLite, PostgreSQL) serves the module, with its own
artifact directory and a small logits cap (``LOGPROBE_MAX_LOGITS_BYTES``) so
that the worker-side cap can be seen refusing a job.
"""

from __future__ import annotations

import hashlib
import subprocess
import uuid
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from api_client import Client, JobFailed, JobStatus, SpecError
from api_client.artifacts import EMBEDDINGS_DIR, ArtifactStore, load_array
from api_client.embedding_specs import InterpolateEmbedding, NoiseEmbedding
from api_client.errors import ArtifactError
from tests.helpers import REPO_ROOT, WorkerProcess, logprobe_command, subprocess_env

TEXT = "Finn writes code"
TOL = 1e-5
#: The worker's logits cap: 9 rows of the 50257-token GPT-2 vocabulary in float32.
WORKER_CAP = 9 * 50257 * 4


@cache
def reference(path: str) -> tuple[object, object]:
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def ref_embeddings(path: str, ids: list[int]) -> torch.Tensor:
    model, _ = reference(path)
    with torch.no_grad():
        return model.get_input_embeddings()(torch.tensor(ids)).detach()


@pytest.fixture(scope="module")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def tensor_worker(module_database_url: str, redis_url: str, artifacts_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(
        backend="hf", queue=f"logprobe.hf.emb-{uuid.uuid4().hex[:8]}", redis_url=redis_url,
        database_url=module_database_url, log_dir=tmp_path_factory.mktemp("worker-logs"),
        env={"LOGPROBE_ARTIFACTS_URL": str(artifacts_dir),
             "LOGPROBE_MAX_LOGITS_BYTES": str(WORKER_CAP)},
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def client(tensor_worker: WorkerProcess, artifacts_dir: Path) -> Iterator[Client]:
    with tensor_worker.client(artifacts_url=str(artifacts_dir)) as c:
        yield c


@pytest.fixture(params=["gpt2", "llama"])
def model_path(request: pytest.FixtureRequest, tiny_models: dict) -> str:
    return str(tiny_models[request.param])


def test_generate_from_own_embeddings_matches_ids(client: Client, model_path: str) -> None:
    model, tok = reference(model_path)
    ids = tok(TEXT)["input_ids"]
    opts = dict(model=model_path, max_new_tokens=5, top_logprobs=3)
    by_ids = client.generate(TEXT, **opts)
    by_noise0 = client.generate(embedding=NoiseEmbedding(text=TEXT, scale=0.0, seed=7), **opts)
    # A torch tensor, uploaded by the client as safetensors (duck-typed, [1, seq, hidden]).
    by_upload = client.generate(embedding=ref_embeddings(model_path, ids)[None], **opts)
    res_ids, res_noise0, res_upload = (j.result(timeout=120)
                                       for j in (by_ids, by_noise0, by_upload))

    with torch.no_grad():
        ref = model.generate(inputs_embeds=ref_embeddings(model_path, ids)[None],
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=5, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
    ref_lp = model.compute_transition_scores(ref.sequences, ref.scores, normalize_logits=True)

    seq_ids, seq_noise0, seq_upload = (r.sequences[0] for r in (res_ids, res_noise0, res_upload))
    assert seq_noise0.token_ids == seq_ids.token_ids == ref.sequences[0].tolist()
    assert seq_noise0.logprobs == pytest.approx(seq_ids.logprobs, abs=TOL)
    assert seq_noise0.logprobs == pytest.approx(ref_lp[0].tolist(), abs=TOL)
    assert [t.position for t in seq_noise0.tokens] == list(range(len(ids), len(ids) + 5))
    # Scale 0 is the prompt's own embedding: exactly what uploading E(ids) gives.
    assert seq_upload.token_ids == seq_noise0.token_ids
    assert seq_upload.logprobs == seq_noise0.logprobs
    assert [[a.logprob for a in t.top_logprobs] for t in seq_upload.tokens] == \
        [[a.logprob for a in t.top_logprobs] for t in seq_noise0.tokens]
    # Prompt rows: the noise source knows its token ids, an upload does not.
    assert [t.token_id for t in seq_noise0.prompt_tokens] == ids
    assert [t.logprob for t in seq_noise0.prompt_tokens[1:]] == pytest.approx(
        [t.logprob for t in seq_ids.prompt_tokens[1:]], abs=TOL)
    assert [(t.token_id, t.token, t.logprob) for t in seq_upload.prompt_tokens] == \
        [(None, "", None)] * len(ids)
    # The upload is recorded: spec carries URI + sha256, artifacts has the verified file.
    spec = by_upload.info()["spec"]["embedding"]
    assert spec["source"] == "artifact" and spec["shape"] == [len(ids), 64]
    row = by_upload.artifacts()["input_embeds"]
    assert row.sha256 == spec["sha256"] == hashlib.sha256(
        Path(row.uri.removeprefix("file://")).read_bytes()).hexdigest()
    assert by_noise0.info()["spec"]["embedding"] == {"source": "noise", "text": TEXT,
                                                     "scale": 0.0, "seed": 7}


def test_noise_seed_and_scale_rebuild_the_embedding(client: Client, tiny_gpt2: str) -> None:
    noise = NoiseEmbedding(text=TEXT, scale=0.5, seed=3)
    jobs = [client.score(embedding=noise, model=tiny_gpt2),
            client.score(embedding=noise, model=tiny_gpt2),
            client.score(embedding=noise.model_copy(update={"seed": 4}), model=tiny_gpt2),
            client.generate(embedding=noise, model=tiny_gpt2, max_new_tokens=6),
            client.generate(embedding=noise, model=tiny_gpt2, max_new_tokens=6)]
    # Rebuild the noisy embedding from the recorded spec, as the docs say, and upload it.
    _, tok = reference(tiny_gpt2)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    rebuilt = ref_embeddings(tiny_gpt2, ids) + 0.5 * torch.randn(
        (len(ids), 64), generator=torch.Generator().manual_seed(3))
    jobs.append(client.score(embedding=rebuilt.numpy(), token_ids=ids, model=tiny_gpt2))
    first, again, other, gen_a, gen_b, uploaded = (j.result(timeout=120) for j in jobs)

    assert first.tokens and [t.token_id for t in first.tokens] == ids
    assert [t.logprob for t in first.tokens] == [t.logprob for t in again.tokens]
    assert first.loss == again.loss
    assert [t.logprob for t in uploaded.tokens] == [t.logprob for t in first.tokens]
    assert uploaded.loss == first.loss
    assert other.loss != first.loss
    assert gen_a.sequences[0].token_ids == gen_b.sequences[0].token_ids
    assert gen_a.sequences[0].logprobs == gen_b.sequences[0].logprobs


def test_score_embedding_matches_hf_loss(client: Client, model_path: str) -> None:
    model, tok = reference(model_path)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    emb = ref_embeddings(model_path, ids) * 1.5  # not a text's embedding any more
    with_targets = client.score(embedding=emb, token_ids=ids, model=model_path, top_logprobs=2)
    without = client.score(embedding=emb, model=model_path, top_logprobs=2)
    text_a, text_b = " to make it", " one two three"
    ids_a = tok(text_a, add_special_tokens=False)["input_ids"]
    ids_b = tok(text_b, add_special_tokens=False)["input_ids"]
    assert len(ids_a) == len(ids_b)
    mixed = client.score(embedding=InterpolateEmbedding(text_a=text_a, text_b=text_b,
                                                        weight=0.25),
                         token_ids=ids_b, model=model_path)
    res, res_none, res_mixed = (j.result(timeout=120) for j in (with_targets, without, mixed))

    with torch.no_grad():
        out = model(inputs_embeds=emb[None], labels=torch.tensor([ids]))
        mix = 0.75 * ref_embeddings(model_path, ids_a) + 0.25 * ref_embeddings(model_path, ids_b)
        out_mixed = model(inputs_embeds=mix[None], labels=torch.tensor([ids_b]))
    logprobs = torch.log_softmax(out.logits[0], -1)
    assert res.loss == pytest.approx(out.loss.item(), abs=TOL)
    assert [t.logprob for t in res.tokens[1:]] == pytest.approx(
        [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=TOL)
    assert res_mixed.loss == pytest.approx(out_mixed.loss.item(), abs=TOL)
    # No targets: positions without token ids, no loss, but the alternatives are there.
    assert res_none.loss is None
    assert [(t.token_id, t.token, t.logprob) for t in res_none.tokens] == \
        [(None, "", None)] * len(ids)
    assert [a.token_id for a in res_none.tokens[1].top_logprobs] == \
        torch.topk(logprobs[0], 2).indices.tolist()
    rows = client.sql("SELECT COUNT(*) AS n, COUNT(token_id) AS ids FROM tokens "
                      "WHERE job_id = :j", {"j": without.id}).iloc[0]
    assert (rows["n"], rows["ids"]) == (len(ids), 0)


def test_bad_embeddings_fail_clearly_and_worker_keeps_serving(
        client: Client, tiny_gpt2: str, tensor_worker: WorkerProcess) -> None:
    store = client.artifacts
    good = client.upload_embedding(np.zeros((3, 64), dtype=np.float32))

    def artifact(array: np.ndarray, **override: object) -> dict:
        ref = store.put_array(EMBEDDINGS_DIR, "embedding", array)
        spec = {"source": "artifact", "uri": ref.uri, "sha256": ref.sha256,
                "shape": list(ref.shape[-2:]), "dtype": ref.dtype}
        return {**spec, **override}

    nan = np.zeros((3, 64), dtype=np.float32)
    nan[1, 5] = np.nan
    cases = {
        "hidden size mismatch": client.upload_embedding(np.zeros((3, 32), dtype=np.float32)),
        "dtype mismatch": artifact(np.zeros((3, 64), dtype=np.int64), dtype="float32"),
        "1 values are NaN or infinite (the first at position 1)": artifact(nan),
        "sha256 mismatch": {**good.model_dump(), "sha256": "0" * 64},
        "shape mismatch": {**good.model_dump(), "shape": [4, 64]},
        "more than the 128-token context": client.upload_embedding(np.zeros((125, 64))),
        "text_a encodes to 1 tokens and text_b to 2": InterpolateEmbedding(
            text_a=" to", text_b=" to make", weight=0.5),
        "is outside this worker's artifact store": {**good.model_dump(),
                                                    "uri": "file:///etc/hostname"},
    }
    jobs = {message: client.generate(embedding=embedding, model=tiny_gpt2, max_new_tokens=4)
            for message, embedding in cases.items()}
    ok = client.generate(embedding=good, model=tiny_gpt2, max_new_tokens=4)
    for message, job in jobs.items():
        with pytest.raises(JobFailed) as failed:
            job.result(timeout=120)
        assert "embedding" in failed.value.error and message in failed.value.error
        assert job.info()["error_type"] == "ProbeInputError"
    assert len(ok.result(timeout=120).sequences[0].tokens) == 4
    assert tensor_worker.alive()

    # Refused at submit, before anything is uploaded or queued.
    with pytest.raises(SpecError, match="NaN or infinite"):
        client.upload_embedding(nan)
    with pytest.raises(SpecError, match="batch of 2"):
        client.upload_embedding(np.zeros((2, 3, 64), dtype=np.float32))
    with pytest.raises(SpecError, match="not a float type"):
        client.upload_embedding(np.zeros((3, 64), dtype=np.int32))
    with pytest.raises(SpecError, match="exactly one of prompt and embedding"):
        client.generate(TEXT, embedding=good, model=tiny_gpt2)
    with pytest.raises(SpecError, match="token_ids has 2 ids but the embedding has 3"):
        client.score(embedding=good, token_ids=[1, 2], model=tiny_gpt2)


def test_logits_round_trip(client: Client, model_path: str, tmp_path: Path) -> None:
    model, tok = reference(model_path)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    job = client.score(TEXT, model=model_path, return_logits=True)
    half = client.score(TEXT, model=model_path, return_logits=True, logits_last_n=2,
                        logits_dtype="float16")
    gen = client.generate(TEXT, model=model_path, max_new_tokens=5, return_logits=True)
    res, res_gen = job.result(timeout=120), gen.result(timeout=120)

    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float()
    logits = job.logits()
    assert isinstance(logits, np.ndarray) and logits.dtype == np.float32
    assert logits.shape == (len(ids), ref.shape[-1])
    assert np.abs(logits - ref.numpy()).max() <= TOL
    logprobs = torch.log_softmax(torch.from_numpy(logits), -1)
    assert [t.logprob for t in res.tokens[1:]] == pytest.approx(
        [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=TOL)
    assert isinstance(job.logits(as_torch=True), torch.Tensor)
    npy = tmp_path / "logits.npy"
    out = subprocess.run(
        logprobe_command("--redis-url", client.settings.redis_url or "", "--database-url",
                         client.settings.database_url or "", "logits", job.id, "--out",
                         str(npy)),
        capture_output=True, text=True, cwd=REPO_ROOT, env=subprocess_env(), timeout=120,
        check=True).stdout
    assert f"shape   [{len(ids)}, {ref.shape[-1]}]" in out
    assert np.array_equal(np.load(npy, allow_pickle=False), logits)

    small = half.logits(timeout=120)
    assert small.dtype == np.float16 and small.shape == (2, ref.shape[-1])
    assert np.abs(small.astype(np.float32) - ref[-2:].numpy()).max() <= 1e-2

    steps = gen.logits()
    assert steps.shape == (1, 5, ref.shape[-1])
    step_lp = torch.log_softmax(torch.from_numpy(steps[0]), -1)
    seq = res_gen.sequences[0]
    assert seq.logprobs == pytest.approx(
        [step_lp[t, tid].item() for t, tid in enumerate(seq.token_ids)], abs=TOL)

    row = client.sql("SELECT name, uri, sha256, shape, dtype, num_bytes FROM artifacts "
                     "WHERE job_id = :j", {"j": job.id}).iloc[0]
    data = Path(row["uri"].removeprefix("file://")).read_bytes()
    assert row["name"] == "logits" and row["dtype"] == "float32"
    assert row["num_bytes"] == len(data) and row["sha256"] == hashlib.sha256(data).hexdigest()
    # An altered file is caught on read.
    Path(row["uri"].removeprefix("file://")).write_bytes(data[:-4] + b"\0\0\0\0")
    with pytest.raises(ArtifactError, match="changed after it was written"):
        job.logits()


def test_logits_size_cap(client: Client, tiny_gpt2: str, tensor_worker: WorkerProcess,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    long_text = " one two three four five six seven eight nine ten eleven twelve"
    refused = client.score(long_text, model=tiny_gpt2, return_logits=True)
    last = client.score(long_text, model=tiny_gpt2, return_logits=True, logits_last_n=3)
    with pytest.raises(JobFailed, match=r"return_logits: 12 rows x 50257 vocab .* above the"):
        refused.result(timeout=120)
    assert last.logits(timeout=120).shape == (3, 50257)
    assert refused.status() is JobStatus.FAILED and tensor_worker.alive()

    # At submit: the local model's config.json gives the vocabulary; rows known
    # without the tokenizer (token ids, generation steps) are refused there.
    monkeypatch.setenv("LOGPROBE_MAX_LOGITS_BYTES", str(50257 * 4 * 4))
    with Client(redis_url=client.settings.redis_url, database_url=client.settings.database_url,
                queue=client.queue) as capped:
        with pytest.raises(SpecError, match="return_logits: 5 rows"):
            capped.score(token_ids=[1, 2, 3, 4, 5], model=tiny_gpt2, return_logits=True)
        with pytest.raises(SpecError, match="return_logits: up to 8 rows"):
            capped.generate(TEXT, model=tiny_gpt2, max_new_tokens=8, return_logits=True)
        assert capped.score(TEXT, model=tiny_gpt2, return_logits=True, logits_last_n=4)
        # A text's tokens are counted by the worker: 14 bytes, 3 tokens, within 4 rows.
        fits = capped.score(" one two three", model=tiny_gpt2, return_logits=True)
    assert fits.logits(timeout=120).shape == (3, 50257)


def test_fsspec_store_round_trip(tmp_path: Path) -> None:
    store = ArtifactStore(f"memory://logprobe-{uuid.uuid4().hex[:8]}")
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    ref = store.put_array(EMBEDDINGS_DIR, "embedding", values)
    assert ref.uri.startswith("memory://") and ref.shape == (3, 4) and ref.dtype == "float32"
    assert np.array_equal(load_array(ref.uri, ref.sha256), values)
    with pytest.raises(ArtifactError, match="not the recorded"):
        load_array(ref.uri, "0" * 64)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_array(ref.uri + ".missing")
    assert store.contains(ref.uri) and not store.contains("memory://elsewhere/x")
    local = ArtifactStore(str(tmp_path))
    assert local.contains((tmp_path / "embeddings" / "a.safetensors").as_uri())
    assert not local.contains((tmp_path / ".." / "a.safetensors").as_uri())


def test_values_the_models_dtype_cannot_hold_are_refused(
        tiny_gpt2: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: finite values beyond float16's 65,504 would reach a float16 model as
    inf (NaN logprobs, or torch's "probability tensor contains inf" when sampling)."""
    from api_client.embedding_specs import ArtifactEmbedding
    from api_client.errors import ProbeInputError
    from api_client.specs import GenerateSpec
    from worker.backends.hf_embeddings import build_embedding
    from worker.backends.hf_generate import generate
    from worker.backends.hf_models import load_model

    monkeypatch.setenv("LOGPROBE_ARTIFACTS_URL", str(tmp_path))
    lm = load_model(tiny_gpt2, None, "float16", "cpu")

    def uploaded(values: np.ndarray) -> ArtifactEmbedding:
        ref = ArtifactStore(str(tmp_path)).put_array(EMBEDDINGS_DIR, "embedding", values)
        return ArtifactEmbedding(uri=ref.uri, sha256=ref.sha256, shape=ref.shape,
                                 dtype=ref.dtype)

    values = np.zeros((3, 64), dtype=np.float32)
    values[1, 7], values[2, 0] = 65_000.0, -1e5
    with pytest.raises(ProbeInputError, match=r"embedding: 1 value overflows float16, "
                       r"the model's dtype \(\|x\| at most 65504; the first at position 2\)"):
        build_embedding(lm, uploaded(values), "score")
    values[2, 0] = -65_000.0  # within float16: fed as given
    built = build_embedding(lm, uploaded(values), "score")
    assert built.embeds.dtype == torch.float16
    assert np.array_equal(built.embeds[0].float().numpy(), values.astype(np.float16))

    noisy = NoiseEmbedding(text=TEXT, scale=1e5, seed=1)
    with pytest.raises(ProbeInputError, match=r"overflows? float16"):
        generate(lm, GenerateSpec(embedding=noisy, model=tiny_gpt2, dtype="float16",
                                  max_new_tokens=3, do_sample=True, seed=1))
