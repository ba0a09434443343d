"""``python -m bench.throughput``: logprobe's scoring throughput against the usual ways.

One run, same texts, same model (a 124M GPT-2-shaped model, ``GPT2Config()``
defaults, random weights, the offline GPT-2 tokenizer), every method scoring the
same tokens (BOS prepended, every text token scored):

- bare batched forward: ``model(input_ids, attention_mask)`` on logprobe's own
  length-bucketed batches, full [batch, length, vocabulary] logits, nothing else
  (a reference, not a ceiling: logprobe computes the output layer only for scored,
  distinct rows, ~14% fewer rows here); once with the stock transformers model,
  once with the model as the worker loads it (fused GELU kernel);
- notebook loop: one ``model(ids, labels=ids)`` per text, then a log-softmax;
- lm-evaluation-harness ``HFLM.loglikelihood_rolling`` at several batch sizes, on
  the stock model (as users run it) and, at batch 8 and 16, on the worker's model
  object (the pipeline compared without the kernel);
- logprobe end to end: ``sweep`` -> Redis -> a real worker -> every token row
  committed in PostgreSQL.

Every method's total logprob is checked against the others (they score the same
tokens; the run stops if they differ by more than 1e-5 a token). Each in-process
method gets one untimed call first (the worker's was its model load), then the
methods run interleaved, ``--repeats`` rounds, each round starting one method later;
the table shows medians. Then tiny
probes (a 2-layer model, <= 16 tokens) end to end against a trivial Celery task
per probe, the worker's memory over a long sweep, and token-row ingestion into
PostgreSQL and SQLite.
Needs Redis and PostgreSQL (URLs below); writes nothing outside temp dirs and its
own throwaway database. See docs/throughput.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.corpus import paragraphs, tiny_texts

ROWS: list[tuple[str, str, str, str]] = []


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- models -----------------------------------------------------------------------------

def build_gpt2_124m(path: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.tiny_models import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_small_vocab_gpt2(path: Path, vocab: int = 1024, seed: int = 0) -> Path:
    """The 2-layer test GPT-2 with a 1,024-token vocabulary (the GPT-2 tokenizer still
    decodes its ids): probes whose model math is negligible, to measure the queue and
    SQL path alone."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.tiny_models import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- the baselines, in this process -------------------------------------------------------

def notebook_loop(model: Any, id_lists: list[list[int]], device: str = "cpu") -> float:
    total = 0.0
    with torch.no_grad():
        for ids in id_lists:
            x = torch.tensor([ids], device=device)
            out = model(x, labels=x)
            logprobs = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
            total += logprobs.gather(1, x[0, 1:, None]).sum().item()
    return total


def bare_batched_forward(model: Any, id_lists: list[list[int]], plan: list[list[int]],
                         pad: int, device: str = "cpu") -> None:
    """Each batch of ``plan`` right-padded with ``pad`` through ``model`` on ``device``
    (inputs built on the CPU, then moved); waits for a GPU to finish."""
    with torch.inference_mode():
        for batch in plan:
            rows = [id_lists[i] for i in batch]
            longest = max(len(r) for r in rows)
            x = torch.full((len(rows), longest), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, ids in enumerate(rows):
                x[r, : len(ids)] = torch.tensor(ids)
                mask[r, : len(ids)] = 1
            model(input_ids=x.to(device), attention_mask=mask.to(device))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def lm_eval_rolling(lm: Any, texts: list[str]) -> float:
    from lm_eval.api.instance import Instance

    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
                for i, t in enumerate(texts)]
    return sum(lm.loglikelihood_rolling(requests, disable_tqdm=True))


# --- logprobe end to end ----------------------------------------------------------------

def wait_all_succeeded(client: Any, sweep_id: str, n: int, timeout: float = 3600,
                       interval: float = 0.05) -> None:
    """Poll (every ``interval`` s, one indexed count on jobs.sweep_id over one held
    connection) until n jobs finished; raise if any failed.

    Each poll costs CPU here and in PostgreSQL that the worker's 2-thread matrix
    products share on a 2-core machine: a fresh ORM session per poll cost ~2.7 ms of
    this process's CPU, a held connection and a prepared Core statement a fraction of
    that. 50 ms adds at most 50 ms to a run."""
    from sqlalchemy import func, select

    from api_client.schema import Job, JobStatus

    deadline = time.monotonic() + timeout
    jobs = Job.__table__
    finished = [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED]
    count = select(func.count()).select_from(jobs).where(
        jobs.c.sweep_id == sweep_id, jobs.c.status.in_(finished))
    with client.engine.connect() as connection:
        while True:
            done = connection.execute(count).scalar_one()
            connection.rollback()  # a fresh snapshot for the next poll
            if done >= n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done}/{n} jobs done after {timeout}s")
            time.sleep(interval)
    with client.session() as session:
        failed = session.scalars(select(Job.error).where(
            Job.sweep_id == sweep_id, Job.status != JobStatus.SUCCEEDED)).all()
    if failed:
        raise RuntimeError(f"{len(failed)} jobs failed, e.g. {failed[0]}")


def sweep_token_rows(client: Any, sweep_id: str) -> int:
    """How many token rows the sweep's jobs have in SQL."""
    from sqlalchemy import func, select

    from api_client.schema import Job, Token

    with client.session() as session:
        return session.scalar(select(func.count()).select_from(Token).join(
            Job, Job.id == Token.job_id).where(Job.sweep_id == sweep_id))


def sweep_sum_logprob(client: Any, sweep_id: str) -> float:
    """The sum of every job's ``sum_logprob`` in the sweep (its texts' total logprob)."""
    from sqlalchemy import func, select

    from api_client.schema import Job

    with client.session() as session:
        return float(session.scalar(select(func.sum(Job.sum_logprob))
                                    .where(Job.sweep_id == sweep_id)))


def logprobe_end_to_end(client: Any, texts: list[str], model_dir: str,
                        expected_rows: int) -> float:
    """Score ``texts`` through the queue; returns their total logprob as stored in SQL
    (one more query, timed with the rest: it counts against logprobe)."""
    sweep = client.sweep(texts, models=[model_dir], prepend_bos=True, reuse=False)
    wait_all_succeeded(client, sweep.id, len(texts))
    rows = sweep_token_rows(client, sweep.id)
    assert rows == expected_rows, (rows, expected_rows)
    return sweep_sum_logprob(client, sweep.id)


# --- helpers ------------------------------------------------------------------------------

def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds ``fn()`` took, and what it returned."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def rss_of_children(pid: int) -> int:
    import psutil

    children = psutil.Process(pid).children(recursive=True)
    return sum(c.memory_info().rss for c in children)


def start_worker(kind: str, queue: str, redis_url: str, database_url: str, log_dir: Path,
                 extra_args: list[str] | None = None, **env: str) -> Any:
    from tests.helpers import WorkerProcess

    worker = WorkerProcess(backend=kind, queue=queue, redis_url=redis_url,
                           database_url=database_url, log_dir=log_dir,
                           extra_args=extra_args or [], env=env)
    return worker.start(timeout=180)


# --- sections -----------------------------------------------------------------------------

def scoring_section(args: argparse.Namespace, tmp: Path, redis_url: str, db_url: str) -> None:
    from transformers import AutoModelForCausalLM

    from api_client import Client
    from api_client.specs import ScoreSpec
    from worker.backends.hf_models import load_model
    from worker.backends.hf_score import BatchBudget, score_batch
    from worker.bulk_persistence import claim_many, store_outputs

    texts = paragraphs(args.texts)
    model_dir = str(build_gpt2_124m(tmp / "gpt2-124m"))
    lm = load_model(model_dir, None, None, "cpu")  # as the worker loads it
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), lm.tokenizer
    bos = lm.bos_token_id
    id_lists = [[bos, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts]
    n_tokens = sum(len(ids) - 1 for ids in id_lists)
    log(f"{len(texts)} texts, {n_tokens} scored tokens, torch threads {torch.get_num_threads()}")
    budget = BatchBudget.for_device("cpu")
    plan = budget.plan([len(ids) for ids in id_lists])

    worker = start_worker("hf", f"bench.hf.{uuid.uuid4().hex[:6]}", redis_url, db_url,
                          tmp / "logs")
    client = Client(redis_url=redis_url, database_url=db_url, queue=worker.queue)
    try:
        client.score(texts[0], model=model_dir).result(timeout=600)  # load the model
        methods: dict[str, Callable[[], Any]] = {
            "bare batched forward (logits only)":
                lambda: bare_batched_forward(model, id_lists, plan, bos),
            "bare batched forward, worker's model (fused GELU; logits only)":
                lambda: bare_batched_forward(lm.model, id_lists, plan, bos),
            "notebook loop (model(ids, labels=ids) + log_softmax)":
                lambda: notebook_loop(model, id_lists),
        }
        if not args.skip_lm_eval:
            from lm_eval.models.huggingface import HFLM

            for size in args.lm_eval_batch_sizes:
                hflm = HFLM(pretrained=model, tokenizer=tok, batch_size=size, device="cpu")
                methods[f"lm-eval loglikelihood_rolling, batch {size}"] = (
                    lambda hflm=hflm: lm_eval_rolling(hflm, texts))
            # The same harness on the worker's model object (fused GELU), so the ratio
            # to logprobe shows the pipeline, not the kernel: at the sizes that win.
            for size in [b for b in args.lm_eval_batch_sizes if b in (8, 16)]:
                hflm = HFLM(pretrained=lm.model, tokenizer=tok, batch_size=size, device="cpu")
                methods[f"lm-eval loglikelihood_rolling, worker's model, batch {size}"] = (
                    lambda hflm=hflm: lm_eval_rolling(hflm, texts))
        methods["logprobe end to end (rows committed, PostgreSQL)"] = (
            lambda: logprobe_end_to_end(client, texts, model_dir, n_tokens + len(texts)))
        for name, fn in methods.items():  # one untimed call each: first-call costs
            if not name.startswith("logprobe"):  # (the worker's was its model load)
                fn()
        times: dict[str, list[float]] = {name: [] for name in methods}
        totals: dict[str, float] = {}
        names = list(methods)
        for round_ in range(args.repeats):
            # Each round starts one method later: no method always goes first or last.
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                seconds, total = timed(methods[name])
                times[name].append(seconds)
                if isinstance(total, float):
                    totals[name] = total
                log(f"round {round_ + 1}: {name}: {seconds:.2f}s")

        # Storing vs scoring, inside the worker's own functions.
        specs = [ScoreSpec(model=model_dir, text=t, prepend_bos=True) for t in texts]
        score_s, store_s = [], []
        nobody = f"bench.nobody.{uuid.uuid4().hex[:6]}"  # rows only: no worker reads it
        for _ in range(args.repeats):
            start = time.perf_counter()
            outputs = score_batch(lm, specs, budget)
            score_s.append(time.perf_counter() - start)
            handles = client.submit_many(specs, queue=nobody)
            ids = [h.id for h in handles]
            with client.session() as session:
                claim_many(session, ids, "bench")
            start = time.perf_counter()
            with client.session() as session:
                store_outputs(session, list(zip(ids, outputs, strict=True)))  # type: ignore
            store_s.append(time.perf_counter() - start)
        _delete_queue(redis_url, nobody)
    finally:
        client.close()
        worker.stop()
        _delete_queue(redis_url, worker.queue)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    baselines = [n for n in med if n.startswith(("notebook", "lm-eval"))
                 and "worker's model" not in n]
    best = min(baselines, key=lambda n: med[n])  # as users run them: the stock model
    same_model = [n for n in med if n.startswith("lm-eval") and "worker's model" in n]
    best_same = min(same_model, key=lambda n: med[n]) if same_model else None
    bare = next(n for n in med if n.startswith("bare"))  # the stock model
    bare_same = next(n for n in med if n.startswith("bare") and "worker's model" in n)
    print(f"\n### Scoring: {len(texts)} paragraphs, {n_tokens} tokens, GPT-2 124M shape, CPU\n")
    print("| method | median s | tokens/s | vs best baseline | vs best baseline, worker's "
          "model | vs bare forward | vs bare forward, worker's model |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, seconds in med.items():
        same = f"{med[best_same] / seconds:.2f}x" if best_same else "-"
        print(f"| {name} | {seconds:.2f} | {n_tokens / seconds:.0f} | "
              f"{med[best] / seconds:.2f}x | {same} | {med[bare] / seconds:.2f}x | "
              f"{med[bare_same] / seconds:.2f}x |")
    print(f"\nbest baseline: {best}; on the worker's model: {best_same}; all rounds (s): "
          + "; ".join(f"{n.split(' (')[0]}: {', '.join(f'{t:.1f}' for t in ts)}"
                      for n, ts in times.items()))
    # Every method scored the same tokens: their totals must agree (float32 sums).
    reference = totals.get(best) or next(iter(totals.values()))
    spread = max(abs(total - reference) for total in totals.values())
    print("\ntotal logprob of the scored tokens, by method: "
          + "; ".join(f"{n.split(' (')[0]}: {t:.4f}" for n, t in totals.items())
          + f" (largest difference {spread:.2e})")
    if spread > 1e-5 * n_tokens:
        raise SystemExit(f"the methods' total logprobs differ by {spread:.3g}: "
                         "they did not score the same thing")
    s_score, s_store = statistics.median(score_s), statistics.median(store_s)
    print(f"\nstoring {n_tokens + len(texts)} token rows (one transaction, COPY): "
          f"{s_store * 1000:.0f} ms = {100 * s_store / s_score:.1f}% of scoring them "
          f"({s_score:.2f} s, worker's score_batch)")


def tiny_section(args: argparse.Namespace, tmp: Path, redis_url: str, db_url: str) -> None:
    from api_client import Client
    from api_client.specs import ScoreSpec
    from tests.tiny_models import build_gpt2
    from worker.backends.hf_models import load_model
    from worker.backends.hf_score import BatchBudget, score_batch

    model_dir = str(build_gpt2(tmp / "tiny-gpt2"))
    # The model math alone, in this process (torch's default threads): the ceiling.
    lm = load_model(model_dir, None, None, "cpu")
    compute: list[float] = []
    for round_ in range(args.repeats):
        specs = [ScoreSpec(model=model_dir, text=t)
                 for t in tiny_texts(args.tiny, seed=100 + round_)]
        start = time.perf_counter()
        for i in range(0, len(specs), 64):  # one message's worth at a time, as the worker
            score_batch(lm, specs[i : i + 64], BatchBudget())
        compute.append(len(specs) / (time.perf_counter() - start))
        log(f"tiny compute round {round_ + 1}: {compute[-1]:.0f} probes/s")
    del lm

    results: dict[str, list[float]] = {"logprobe": [], "logprobe2": [], "unshared2": [],
                                       "small": []}
    memory: list[tuple[float, int]] = []
    baseline, sweep_seconds = 0, 0.0
    # One worker, its defaults: one pool process, torch's default threads.
    worker = start_worker("hf", f"bench.tiny.{uuid.uuid4().hex[:6]}", redis_url, db_url,
                          tmp / "logs")
    client = Client(redis_url=redis_url, database_url=db_url, queue=worker.queue)
    try:
        _tiny_rounds(args, client, model_dir, results["logprobe"], "one pool process")
        if args.memory_probes > 0:
            memory, baseline, sweep_seconds = _memory_sweep(args, client, model_dir, worker)
        # The queue and SQL path alone: the same probes on a 1,024-token vocabulary.
        import random

        small_dir = str(build_small_vocab_gpt2(tmp / "small-vocab-gpt2"))
        rng = random.Random(5)
        client.score(token_ids=[1, 2, 3], model=small_dir).result(timeout=300)
        for round_ in range(args.repeats):
            id_lists = [[rng.randrange(1, 1024) for _ in range(14)] for _ in range(args.tiny)]
            start = time.perf_counter()
            sweep_id = uuid.uuid4().hex
            client.submit_many([ScoreSpec(model=small_dir, token_ids=ids, reuse=False)
                                for ids in id_lists], sweep_id=sweep_id)
            wait_all_succeeded(client, sweep_id, len(id_lists))
            results["small"].append(len(id_lists) / (time.perf_counter() - start))
            log(f"small-vocab round {round_ + 1}: {results['small'][-1]:.0f} probes/s")
    finally:
        client.close()
        worker.stop()
        _delete_queue(redis_url, worker.queue)
    # One worker with two pool processes, each with half the CPUs' threads (the worker
    # splits them: one thread each on 2 cores).
    worker = start_worker("hf", f"bench.tiny2.{uuid.uuid4().hex[:6]}", redis_url, db_url,
                          tmp / "logs", extra_args=["--concurrency", "2"])
    client = Client(redis_url=redis_url, database_url=db_url, queue=worker.queue)
    try:
        _tiny_rounds(args, client, model_dir, results["logprobe2"], "two pool processes")
        _unshared_rounds(args, client, model_dir, results["unshared2"])
    finally:
        client.close()
        worker.stop()
        _delete_queue(redis_url, worker.queue)
    celery = {c: _celery_noop_rates(args, tmp, redis_url, concurrency=c) for c in (1, 2)}

    print(f"\n### Tiny probes: {args.tiny} score probes of <= 16 tokens, 2-layer GPT-2 "
          "(GPT-2's 50,257-token vocabulary), one worker\n")
    print("| method | median probes/s | vs Celery no-op, same pool |")
    print("| --- | ---: | ---: |")
    for c, label in ((1, "one pool process"), (2, "two pool processes (`--concurrency 2`)")):
        print(f"| trivial Celery task, one per probe, {label} | "
              f"{statistics.median(celery[c]):.0f} | 1.00x |")
    for key, c, label in (
        ("logprobe", 1, "one pool process, torch's default threads (the worker's defaults)"),
        ("logprobe2", 2, "`--concurrency 2`: two pool processes, each with half the "
                         "CPUs as threads"),
    ):
        ours = statistics.median(results[key])
        print(f"| logprobe end to end (rows committed, PostgreSQL), {label} | {ours:.0f} | "
              f"{ours / statistics.median(celery[c]):.2f}x |")
    unshared = statistics.median(results["unshared2"])
    print(f"| the same, texts that share no prefix (random ids, the same lengths: the output "
          f"layer runs on every scored row) | {unshared:.0f} | "
          f"{unshared / statistics.median(celery[2]):.2f}x |")
    ceiling = statistics.median(compute)
    noop = statistics.median(celery[1])
    print(f"| (model math alone: the worker's score_batch in-process, 64 per batch, no "
          f"queue, no SQL) | {ceiling:.0f} | {ceiling / noop:.2f}x |")
    small = statistics.median(results["small"])
    print(f"| logprobe end to end, 1,024-token vocabulary, one pool process (negligible "
          f"model math: the queue and SQL path) | {small:.0f} | {small / noop:.2f}x |")
    print("\nall rounds (probes/s): " + "; ".join(
        f"{name}: {', '.join(f'{v:.0f}' for v in values)}"
        for name, values in [*results.items(), ("math", compute),
                             *((f"celery -c {c}", v) for c, v in celery.items())]))
    if not memory:  # --memory-probes 0
        return
    rss = [r for _, r in memory]
    tenth = max(1, len(rss) // 10)
    early, late = statistics.median(rss[:tenth]), statistics.median(rss[-tenth:])
    mib = 2**20
    print(f"\nworker memory (RSS of the worker's pool process) over a {args.memory_probes}-"
          f"probe sweep ({args.memory_probes / sweep_seconds:.0f} probes/s, {len(rss)} "
          f"samples): idle before {baseline / mib:.0f} MiB; first tenth of the sweep "
          f"{early / mib:.0f} MiB, last tenth {late / mib:.0f} MiB "
          f"({100 * (late - early) / early:+.1f}%); range {min(rss) / mib:.0f}-"
          f"{max(rss) / mib:.0f} MiB (the high end is one batch's logits in flight); idle "
          f"after {rss[-1] / mib:.0f} MiB ({100 * (rss[-1] - baseline) / baseline:+.1f}%)")


def _tiny_rounds(args: argparse.Namespace, client: Any, model_dir: str, rates: list[float],
                 label: str) -> None:
    """A warm-up sweep, then ``args.repeats`` sweeps of ``args.tiny`` tiny probes. The
    warm-up goes 64 a message, so that every pool process loads its model before the
    timed rounds (the default would send its 500 probes as one message)."""
    warm = client.sweep(tiny_texts(500, seed=9), models=[model_dir], reuse=False,
                        chunk_size=64)
    wait_all_succeeded(client, warm.id, len(warm))
    for round_ in range(args.repeats):
        texts = tiny_texts(args.tiny, seed=100 + round_)
        start = time.perf_counter()
        sweep = client.sweep(texts, models=[model_dir], reuse=False)
        wait_all_succeeded(client, sweep.id, len(texts))
        rates.append(len(texts) / (time.perf_counter() - start))
        log(f"tiny round {round_ + 1}, {label}: {rates[-1]:.0f} probes/s")


def _unshared_rounds(args: argparse.Namespace, client: Any, model_dir: str,
                     rates: list[float]) -> None:
    """``args.repeats`` sweeps of tiny probes as long as the tiny texts but of random
    ids: texts that share no prefix, so no scored row shares its logits with another
    (the tiny texts follow a template; their rows do, see docs/throughput.md)."""
    import random

    from api_client.specs import ScoreSpec
    from tests.tiny_models import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    rng = random.Random(11)
    for round_ in range(args.repeats):
        lengths = [len(ids) for ids in tokenizer(
            tiny_texts(args.tiny, seed=100 + round_), add_special_tokens=False)["input_ids"]]
        id_lists = [[rng.randrange(256, tokenizer.vocab_size) for _ in range(n)]
                    for n in lengths]
        start = time.perf_counter()
        sweep_id = uuid.uuid4().hex
        client.submit_many([ScoreSpec(model=model_dir, token_ids=ids, reuse=False)
                            for ids in id_lists], sweep_id=sweep_id)
        wait_all_succeeded(client, sweep_id, len(id_lists))
        rates.append(len(id_lists) / (time.perf_counter() - start))
        log(f"tiny round {round_ + 1}, two pool processes, no shared prefixes: "
            f"{rates[-1]:.0f} probes/s")


def _memory_sweep(args: argparse.Namespace, client: Any, model_dir: str, worker: Any
                  ) -> tuple[list[tuple[float, int]], int, float]:
    """The worker's RSS every 0.5 s over a long sweep: (samples, idle before, seconds)."""
    baseline = rss_of_children(worker.process.pid)
    memory: list[tuple[float, int]] = []
    start = time.perf_counter()
    sweep = client.sweep(tiny_texts(args.memory_probes, seed=7), models=[model_dir],
                         reuse=False)
    while True:
        memory.append((time.perf_counter() - start, rss_of_children(worker.process.pid)))
        progress = sweep.progress()
        if progress["finished"] >= progress["total"]:
            break
        time.sleep(0.5)
    seconds = time.perf_counter() - start
    memory.append((seconds, rss_of_children(worker.process.pid)))
    assert progress["succeeded"] == args.memory_probes, progress
    return memory, baseline, seconds


def _celery_noop_rates(args: argparse.Namespace, tmp: Path, redis_url: str, *,
                       concurrency: int) -> list[float]:
    """Tasks/s of a trivial Celery task, one per probe, on ``concurrency`` pool processes
    (same broker settings as logprobe's; the task only counts itself in Redis)."""
    import redis

    from bench import celery_noop
    from tests.helpers import REPO_ROOT, subprocess_env

    env = subprocess_env(BENCH_REDIS_URL=redis_url)
    noop_log = (tmp / "logs" / f"noop-{concurrency}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.celery_noop", "worker", "-Q",
         celery_noop.QUEUE, "-c", str(concurrency), "--pool", "prefork", "--without-gossip",
         "--without-mingle", "-n", f"noop-{uuid.uuid4().hex[:6]}@bench", "-l", "warning"],
        cwd=REPO_ROOT, env=env, stdout=noop_log, stderr=subprocess.STDOUT,
        start_new_session=True)
    counter = redis.Redis.from_url(redis_url)
    rates: list[float] = []
    try:
        app = celery_noop.make_celery(redis_url, name="bench-noop-sender")
        counter.set(celery_noop.COUNTER_KEY, 0)
        for i in range(concurrency):
            app.send_task(celery_noop.TASK, args=[f"warm{i}"], queue=celery_noop.QUEUE)
        _wait_counter(counter, concurrency)
        for _ in range(args.repeats):
            counter.set(celery_noop.COUNTER_KEY, 0)
            start = time.perf_counter()
            with app.producer_or_acquire() as producer:
                for i in range(args.tiny):
                    app.send_task(celery_noop.TASK, args=[str(i)], queue=celery_noop.QUEUE,
                                  producer=producer)
            _wait_counter(counter, args.tiny)
            rates.append(args.tiny / (time.perf_counter() - start))
            log(f"celery noop, -c {concurrency}: {rates[-1]:.0f} tasks/s")
        app.close()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        counter.delete(celery_noop.COUNTER_KEY)
        counter.close()
        _delete_queue(redis_url, celery_noop.QUEUE)
    return rates


def _delete_queue(redis_url: str, queue: str) -> None:
    """Drop a benchmark queue from the broker: its messages (a Redis list per queue and
    priority) and kombu's bindings for it."""
    import redis

    from api_client.requeue import PRIORITY_SEPARATOR

    connection = redis.Redis.from_url(redis_url)
    try:
        keys = [queue, *connection.scan_iter(match=f"{queue}{PRIORITY_SEPARATOR}*"),
                f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
        connection.delete(*keys)
    finally:
        connection.close()


def _wait_counter(counter: Any, n: int, timeout: float = 600) -> None:
    from bench.celery_noop import COUNTER_KEY

    deadline = time.monotonic() + timeout
    while int(counter.get(COUNTER_KEY) or 0) < n:
        if time.monotonic() > deadline:
            raise TimeoutError("the noop Celery worker did not finish")
        time.sleep(0.005)


def ingestion_section(args: argparse.Namespace, db_url: str) -> None:
    """Token rows into PostgreSQL and into a SQLite file, the bulk path against
    SQLAlchemy's executemany, interleaved, medians."""
    from api_client.database import ensure_schema, make_engine

    sqlite_dir = Path(tempfile.mkdtemp(prefix="logprobe-bench-sqlite-"))
    sqlite_engine = make_engine(f"sqlite:///{sqlite_dir / 'ingest.sqlite'}")
    ensure_schema(sqlite_engine)
    sqlite_engine.dispose()
    databases = {"PostgreSQL": (db_url, "psycopg 3 COPY (logprobe's bulk path)"),
                 "SQLite": (f"sqlite:///{sqlite_dir / 'ingest.sqlite'}",
                            "INSERTs of up to 1,024 row tuples each (logprobe's bulk path)")}
    for name, (url, bulk_label) in databases.items():
        rates = ingestion_rates(args, url, name)
        print(f"\n### {name} token-row ingestion ({args.ingest_rows} rows per run, one "
              "transaction)\n")
        print("| method | median rows/s |")
        print("| --- | ---: |")
        for method, values in rates.items():
            label = bulk_label if method == "bulk" else (
                "SQLAlchemy executemany (a parameter dictionary per row)")
            print(f"| {label} | {statistics.median(values):,.0f} |")
    shutil.rmtree(sqlite_dir, ignore_errors=True)


def ingestion_rates(args: argparse.Namespace, db_url: str, name: str) -> dict[str, list[float]]:
    from sqlalchemy import insert

    from api_client.bulk_insert import insert_rows
    from api_client.database import make_engine, make_sessionmaker
    from api_client.schema import Job, JobStatus, Token
    from worker.output_rows import TOKEN_COLUMNS

    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    per_job = 1000
    n_jobs = args.ingest_rows // per_job
    rates: dict[str, list[float]] = {"bulk": [], "executemany": []}
    for round_ in range(args.repeats):
        for method in rates:
            ids = [uuid.uuid4().hex for _ in range(n_jobs)]
            with sessions() as session, session.begin():
                session.execute(insert(Job), [
                    {"id": i, "kind": "score", "backend": "hf", "model": "bench",
                     "status": JobStatus.RUNNING, "spec": {}, "queue": "bench"} for i in ids])
            rows = [(job_id, 0, p, 1000 + p, f" token{p}", -0.5 - p * 1e-3, False)
                    for job_id in ids for p in range(per_job)]
            start = time.perf_counter()
            with sessions() as session, session.begin():
                if method == "bulk":
                    insert_rows(session, Token, TOKEN_COLUMNS, rows)
                else:
                    session.execute(insert(Token),
                                    [dict(zip(TOKEN_COLUMNS, r, strict=True)) for r in rows])
            rates[method].append(len(rows) / (time.perf_counter() - start))
            log(f"ingest round {round_ + 1}: {name} {method}: {rates[method][-1]:.0f} rows/s")
    engine.dispose()
    return rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=64, help="paragraphs to score (64)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians are shown (3)")
    parser.add_argument("--lm-eval-batch-sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 8, 16, 64], help="HFLM batch sizes to try (1,8,16,64)")
    parser.add_argument("--skip-lm-eval", action="store_true")
    parser.add_argument("--tiny", type=int, default=3000, help="tiny probes per round (3000)")
    parser.add_argument("--memory-probes", type=int, default=10_000,
                        help="probes in the memory sweep (10000)")
    parser.add_argument("--ingest-rows", type=int, default=200_000)
    parser.add_argument("--sections", default="scoring,tiny,ingest")
    parser.add_argument("--redis-url", default=os.environ.get("LOGPROBE_BENCH_REDIS_URL",
                                                              "redis://127.0.0.1:6379/4"))
    parser.add_argument("--postgres-url", default=os.environ.get(
        "LOGPROBE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from api_client.database import upgrade_schema
    from tests.helpers import create_postgres_database, drop_postgres_database

    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sections = set(args.sections.split(","))
    name = f"logprobe_bench_{uuid.uuid4().hex[:8]}"
    db_url = create_postgres_database(args.postgres_url, name)
    print(f"# logprobe throughput benchmark\n\n`python -m bench.throughput "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}`, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    try:
        upgrade_schema(db_url)
        with tempfile.TemporaryDirectory(prefix="logprobe-bench-") as tmp:
            if "scoring" in sections:
                scoring_section(args, Path(tmp), args.redis_url, db_url)
            if "tiny" in sections:
                tiny_section(args, Path(tmp), args.redis_url, db_url)
            if "ingest" in sections:
                ingestion_section(args, db_url)
    finally:
        drop_postgres_database(args.postgres_url, name)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
