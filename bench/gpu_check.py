"""GPU check: one worker per visible GPU serving a Llama-2-7B-shaped model, tokens/s.

Builds a LLaMA-architecture model of the real Llama-2-7B shape (hidden 4096, 32
layers, 32 heads, intermediate 11008, vocab 32000; 6.7 B parameters) with random
weights in float16, saves it with ``save_pretrained`` (about 13.5 GB), starts
``logprobe worker --backend hf --gpu N`` for every visible GPU on one queue, and
submits score and generate jobs through the normal client. It prints tokens/s for
scoring (prompt tokens scored per second) and for greedy generation (new tokens
per second), over all GPUs and per job, from the job rows' own timestamps, and
Hugging Face ``generate`` alone for reference. Then issue 6's GPU targets: a sweep
of ``--ratio-texts`` texts (and of ``--long-texts`` longer ones) scored end to end
through the queue (rows committed) against the bare batched forward pass and the
notebook loop on GPU 0, same model, dtype and ids (targets: >= 0.9x and >= 5x),
for each worker configuration of ``--worker-args``; for the first, also the worker
backend's ``score_batch`` in this process with its lookahead on and off (outputs
built, nothing stored: the gap from there to end to end is the queue's and the
database's), and where queuing one batch synchronizes with the GPU.

    python bench/gpu_check.py                   # on a machine with NVIDIA GPUs
    python bench/gpu_check.py --shape tiny      # a CPU smoke test of this script

With no ``LOGPROBE_REDIS_URL`` / ``LOGPROBE_DATABASE_URL`` it runs on the embedded
defaults (embedded Redis, SQLite) under a temporary ``LOGPROBE_HOME``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

SHAPES = {
    # The real Llama-2-7B configuration (meta-llama/Llama-2-7b-hf config.json).
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                  "max_position_embeddings": 4096},
    # For trying the script on a CPU.
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 32000,
             "max_position_embeddings": 4096},
    # Negligible compute, for bench/virtual_gpu.py (ids below 1,000).
    "nano": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000,
             "max_position_embeddings": 4096},
}
PROMPT = "The quick brown fox jumps over the lazy dog"  # GPT-2 ids, all below 32000


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def build_model(path: Path, shape: str, dtype: str) -> Path:
    """A randomly initialised LlamaForCausalLM of ``shape``, saved like a hub model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()  # decodes every id below 32000; prompts stay below it
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.monotonic()
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # no float32 copy of 6.7 B weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"built {shape} ({params / 1e9:.2f} B parameters, {dtype}) in "
          f"{time.monotonic() - started:.0f}s at {path}", flush=True)
    return path


def start_workers(gpus: list[int | None], queue: str, env: dict[str, str],
                  log_dir: Path, extra: list[str], name: str,
                  timeline: Path | None = None) -> list[subprocess.Popen]:
    """One ``logprobe worker --backend hf`` per GPU (``None``: the CPU); with
    ``timeline``, each started through ``bench/gpu_timeline.py``, which appends its
    batches' GPU timeline there."""
    workers = []
    if timeline is not None:
        from bench.gpu_timeline import ENV_TIMELINE

        env = {**env, ENV_TIMELINE: str(timeline)}
    start = ([str(REPO_ROOT / "bench" / "gpu_timeline.py"), "--worker"] if timeline
             else ["-m", "api_client.cli", "worker"])
    for gpu in gpus:
        args = [sys.executable, *start, "--backend", "hf",
                "--queues", queue, "--loglevel", "info", *extra]
        if gpu is not None:
            args += ["--gpu", str(gpu)]
        log = (log_dir / f"worker-{name}-{gpu}.log").open("wb")
        workers.append(subprocess.Popen(args, env=env, cwd=REPO_ROOT, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True))
    return workers


def run_patched_worker(argv: list[str], install: object) -> None:
    """``logprobe worker ARGV`` in this process, ``install(**signal_kwargs)`` connected
    to Celery's ``worker_init`` (before the pool starts): how ``virtual_gpu.py`` and
    ``gpu_timeline.py`` patch the worker they run."""
    from celery.signals import worker_init

    from worker.__main__ import main as worker_main

    worker_init.connect(install, weak=False)
    sys.argv = ["logprobe-worker", *argv]
    worker_main()


def worker_configuration(text: str) -> tuple[dict[str, str], list[str]]:
    """A ``--worker-args`` value: its leading ``NAME=value`` words (the workers'
    environment) and the ``logprobe worker`` arguments after them."""
    words = shlex.split(text)
    settings: dict[str, str] = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        name, _, value = words.pop(0).partition("=")
        settings[name] = value
    return settings, words


def stop_workers(workers: list[subprocess.Popen]) -> None:
    import signal

    for worker in workers:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)


def stop_embedded(data_dir: Path) -> None:
    """Shut down the embedded Redis this script started (waiting for it to go)."""
    import redis

    port_file = data_dir / "port"
    if port_file.exists():
        connection = redis.Redis(port=int(port_file.read_text()), socket_timeout=5)
        with contextlib.suppress(redis.RedisError):  # it closes the connection as it exits
            connection.shutdown(nosave=True)


def run_batch(jobs: list, what: str) -> float:
    """Wait for ``jobs``; print throughput over the batch and per job (from the job
    rows' own start and finish). Returns the per-job median in tokens/s."""
    started = time.monotonic()
    results = [job.result(timeout=3600) for job in jobs]
    wall = time.monotonic() - started
    infos = [job.info() for job in jobs]
    counts = [len(r.tokens) for r in results]  # scored, or generated, tokens
    per_job = sorted(n / (i["finished_at"] - i["started_at"]).total_seconds()
                     for n, i in zip(counts, infos, strict=True))
    devices = sorted({f"{i['device']} ({i['device_name']}, {i['dtype']})" for i in infos})
    print(f"{what}: {len(jobs)} jobs, {sum(counts)} tokens in {wall:.1f}s = "
          f"{sum(counts) / wall:.1f} tokens/s over all workers; per job median "
          f"{per_job[len(per_job) // 2]:.1f} tokens/s; on {', '.join(devices)}", flush=True)
    return per_job[len(per_job) // 2]


def bare_generate(model: object, tokenizer: object, device: str, new_tokens: int) -> None:
    """Hugging Face ``generate`` alone on PROMPT, greedy, in this process: the reference
    for the worker's generation. Its first call is timed apart: kernels that plan per
    shape (a decode step's key length is new at every step) pay for it then."""
    import torch

    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]], device=device)

    def run() -> tuple[int, float]:
        started = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             do_sample=False, max_new_tokens=new_tokens, pad_token_id=2)
        if ids.is_cuda:
            torch.cuda.synchronize()
        return out.shape[1] - ids.shape[1], time.perf_counter() - started

    with torch.inference_mode():
        for label, (count, seconds) in (("first call", run()),
                                        ("best of 2 more", min(run(), run(),
                                                               key=lambda r: r[1]))):
            print(f"generation, Hugging Face generate alone in this process, {label}: "
                  f"{count} tokens in {seconds:.2f}s = {1000 * seconds / count:.1f} ms per "
                  "token", flush=True)


def scoring_ratios(client: object, queue: str, model: object, model_dir: Path, dtype: str,
                   device: str, spec_device: str | None, args: argparse.Namespace,
                   worker_pids: list[int], variant: str, first: bool,
                   settings: dict[str, str]) -> None:
    """Issue 6's GPU targets: logprobe end to end (a sweep through the queue, every
    token row committed) against the bare batched forward pass (full logits, nothing
    else) and, for the ``first`` worker configuration, the worker's ``score_batch`` and
    (unless ``--skip-notebook``) the notebook loop (one ``model(ids, labels=ids)`` and
    log-softmax per text), all run in this process on ``device`` with the same model,
    dtype and token ids. First on ``--ratio-texts`` texts with the lengths of the CPU
    benchmark's paragraphs (random ids: the GPT-2 tokenizer's ids run past this
    vocabulary), then on ``--long-texts`` texts of ``--long-length`` tokens. Methods
    interleaved, medians. ``settings``: the workers' environment settings of this
    configuration (the bare forward runs the batches their budget plans)."""
    runs = {}
    if args.ratio_texts:
        runs["paragraphs"] = paragraph_lengths(args.ratio_texts)
    if args.long_texts:
        runs[f"{args.long_length}-token texts"] = [args.long_length] * args.long_texts
    for what, lengths in runs.items():
        profile = args.profile_worker and args.profile_worker.with_name(
            f"{args.profile_worker.name}-{variant}-{what.split()[0]}")
        compare_scoring(client, queue, model, model_dir, dtype, device, spec_device, lengths,
                        what, args, worker_pids, variant, profile, first, settings)


def paragraph_lengths(count: int) -> list[int]:
    """Token counts of ``count`` of the CPU benchmark's paragraphs, BOS included (as
    there; the texts get random ids of these lengths: the GPT-2 tokenizer's ids run
    past the test models' vocabularies)."""
    from bench.corpus import paragraphs
    from tests.tiny_models import gpt2_tokenizer

    return [len(ids) + 1 for ids in gpt2_tokenizer()(
        paragraphs(count), add_special_tokens=False)["input_ids"]]


def compare_scoring(client: object, queue: str, model: object, model_dir: Path, dtype: str,
                    device: str, spec_device: str | None, lengths: list[int], what: str,
                    args: argparse.Namespace, worker_pids: list[int], variant: str,
                    profile: Path | None, first: bool, settings: dict[str, str]) -> None:
    """The three methods on texts of ``lengths`` (BOS, then random ids) in interleaved
    rounds; prints the table and the end-to-end rounds' timelines."""
    import statistics

    import torch

    from api_client.specs import ScoreSpec
    from bench.throughput import (
        bare_batched_forward,
        notebook_loop,
        sweep_token_rows,
        wait_all_succeeded,
    )
    from worker.backends.hf_score import BatchBudget

    rng = random.Random(1)
    vocab = SHAPES[args.shape]["vocab_size"]
    id_lists = [[1, *(rng.randrange(3, vocab) for _ in range(n - 1))] for n in lengths]
    n_scored = sum(n - 1 for n in lengths)
    # The workers' budget (their environment's settings included): the bare forward
    # runs the batches a worker plans for all the texts at once.
    budget = BatchBudget.for_device(torch.device(device).type, {**os.environ, **settings})
    plan = budget.plan(lengths)

    timelines: list[str] = []

    def end_to_end(chunk_size: int | None) -> None:
        sweep_id = uuid.uuid4().hex
        specs = [ScoreSpec(model=str(model_dir), token_ids=ids, dtype=dtype,
                           device=spec_device, reuse=False) for ids in id_lists]
        submitted = time.time()
        client.submit_many(specs, sweep_id=sweep_id, queue=queue,
                           chunk_size=chunk_size)
        sent = time.time()
        # GPU rounds are short: poll every 20 ms, not the CPU benchmark's 50.
        wait_all_succeeded(client, sweep_id, len(id_lists), interval=0.02)
        seen = time.time()
        rows = sweep_token_rows(client, sweep_id)
        assert rows == n_scored + len(id_lists), (rows, n_scored + len(id_lists))
        timelines.append(sweep_timeline(client, sweep_id, submitted, sent, seen))

    methods = {"bare batched forward (full logits, nothing else)":
                   lambda: bare_batched_forward(model, id_lists, plan, 2, device)}
    scored = dict.fromkeys(methods, n_scored)  # tokens each method scores
    notebook = first and not args.skip_notebook
    notebook_name = "notebook loop (model(ids, labels=ids) + log_softmax)"
    if notebook:
        # On the first --notebook-texts texts (the slowest method): compared by tokens/s.
        notebook_ids = id_lists[: args.notebook_texts or None]
        if len(notebook_ids) < len(id_lists):
            notebook_name = notebook_name[:-1] + f", first {len(notebook_ids)} texts)"
        methods[notebook_name] = lambda: notebook_loop(model, notebook_ids, device)
        scored[notebook_name] = sum(len(ids) - 1 for ids in notebook_ids)
    if first and not args.skip_in_process:
        # The bare forward on the batches a worker runs when the texts come N a
        # message (each message planned alone): what its batches cost the GPU, apart
        # from the queue's cost (a message smaller than a full batch, or not a
        # multiple of one, makes more batches than the plan over all the texts).
        for chunk_size in args.chunk_size or [None]:
            batches = message_batches(lengths, chunk_size, budget)
            methods[f"bare batched forward on the batches of {chunk_label(chunk_size)} "
                    f"jobs a message ({len(batches)} batches, against {len(plan)})"] = (
                lambda batches=batches: bare_batched_forward(model, id_lists, batches, 2,
                                                             device))
        # The worker's scoring (outputs built, nothing stored) on this process's model:
        # what the queue and the database cost is the gap from here to end to end.
        lm = in_process_model(model, model_dir, device)
        specs = [ScoreSpec(model=str(model_dir), token_ids=ids, dtype=dtype,
                           device=spec_device) for ids in id_lists]
        for lookahead, label in ((True, "on"), (False, "off")):
            methods[f"worker's score_batch in this process, lookahead {label}"] = (
                lambda lookahead=lookahead: in_process_scoring(lm, specs, lookahead))
        report_syncs(lm, id_lists[: len(plan[0])])
    ends = []  # one end-to-end method per --chunk-size
    for chunk_size in args.chunk_size or [None]:
        ends.append(f"logprobe end to end ({len(worker_pids)} worker(s), {variant}"
                    + (f", {chunk_label(chunk_size)} jobs a message" if args.chunk_size
                       else "")
                    + ", rows committed)")
        methods[ends[-1]] = lambda chunk_size=chunk_size: end_to_end(chunk_size)
    # Warm-up: kernels, allocator, the workers' first batch (the notebook loop on a few
    # texts: its kernels are the same for all).
    bare_batched_forward(model, id_lists, plan, 2, device)
    if notebook:
        notebook_loop(model, id_lists[:16], device)
    if first and not args.skip_in_process:
        in_process_scoring(lm, specs, lookahead=True)  # and pinned host memory
    for chunk_size in args.chunk_size or [None]:
        end_to_end(chunk_size)
    timelines.clear()
    times: dict[str, list[float]] = {name: [] for name in methods}
    windows: dict[str, list[tuple[float, float]]] = {name: [] for name in ends}
    with profiled(worker_pids, profile):
        for _ in range(args.ratio_rounds):
            for name, fn in methods.items():
                started, began = time.perf_counter(), time.monotonic()
                fn()
                times[name].append(time.perf_counter() - started)
                if name in windows:
                    windows[name].append((began, time.monotonic()))
    med = {name: statistics.median(t) for name, t in times.items()}
    # Rates, not seconds: the notebook loop may have scored fewer texts.
    rate = {name: scored.get(name, n_scored) / seconds for name, seconds in med.items()}
    bare, ours = rate[next(iter(rate))], max(rate[name] for name in ends)
    chunk_of = {name: f" ({chunk_label(size)} jobs a message)"
                for name, size in zip(ends, args.chunk_size or [], strict=False)}
    notebook_rate = rate.get(notebook_name)
    print(f"\nscoring {len(id_lists)} texts ({what}), {n_scored} scored tokens, {dtype} on "
          f"{device}, {args.ratio_rounds} rounds (medians):", flush=True)
    print("| method | median s | tokens/s | vs bare forward |"
          + (" vs notebook loop |" if notebook_rate else ""))
    print("| --- | ---: | ---: | ---: |" + (" ---: |" if notebook_rate else ""))
    for name, seconds in med.items():
        print(f"| {name} | {seconds:.2f} | {rate[name]:.0f} | {rate[name] / bare:.2f}x |"
              + (f" {rate[name] / notebook_rate:.2f}x |" if notebook_rate else ""))
    print(f"issue 6 on this device: end to end {ours / bare:.2f}x the bare forward "
          + ("at the best --chunk-size " if len(ends) > 1 else "")
          + "(target >= 0.9x)" + (f", {ours / notebook_rate:.2f}x the notebook loop "
                                "(target >= 5x)" if notebook_rate else "")
          + "; all rounds (s): " + "; ".join(
              f"{name.split(' (')[0]}{chunk_of.get(name, '')}: "
              f"{', '.join(f'{t:.2f}' for t in ts)}"
              for name, ts in times.items()), flush=True)
    print("end-to-end rounds, from the job rows' own timestamps:\n  " + "\n  ".join(timelines),
          flush=True)
    if (path := timeline_path(args, variant)) is not None:
        from bench.gpu_timeline import read, summarize

        time.sleep(1.0)  # the workers write a batch once its events completed
        batches = read(path) if path.exists() else []
        print("the workers' GPU timeline in each end-to-end round (bench/gpu_timeline.py):",
              flush=True)
        for name, rounds in windows.items():
            for window in rounds:
                print(f"  {name.split(' (')[0]}{chunk_of.get(name, '')}: "
                      f"{summarize(batches, window)}", flush=True)


def timeline_path(args: argparse.Namespace, variant: str) -> Path | None:
    """Where the workers of configuration ``variant`` write their GPU timeline
    (``--timeline``), or None."""
    if not args.timeline:
        return None
    return Path(args.timeline_dir) / f"timeline-{variant}.log"


def chunk_size_arg(value: str) -> int | None:
    """``--chunk-size``: a number of jobs a message, or 'default' (None: the client's)."""
    return None if value == "default" else int(value)


def chunk_label(chunk_size: int | None) -> str:
    return "the client's default number of" if chunk_size is None else str(chunk_size)


def message_batches(lengths: list[int], chunk_size: int | None,
                    budget: object) -> list[list[int]]:
    """The worker's batches (indices into ``lengths``) when the client sends texts of
    these token lengths ``chunk_size`` to a message (None: the client's default): cut
    into messages by ``api_client.messages.chunk_messages``, each planned on its own."""
    from api_client.messages import chunk_messages

    rows = [{"id": str(i), "queue": "q", "model": "m",
             "spec": {"kind": "score", "model": "m", "token_ids": [0] * n}}
            for i, n in enumerate(lengths)]
    batches = []
    for _, items in chunk_messages(rows, chunk_size):
        message = [int(item["id"]) for item in items]
        batches += [[message[i] for i in batch]
                    for batch in budget.plan([lengths[i] for i in message])]  # type: ignore[attr-defined]
    return batches


def in_process_model(model: object, model_dir: Path, device: str) -> object:
    """``model`` (loaded here) as the worker's backend holds a model."""
    import torch
    from transformers import AutoTokenizer

    from worker.backends.hf_models import LoadedModel

    config = model.config  # type: ignore[attr-defined]
    return LoadedModel(
        name=str(model_dir), model=model, tokenizer=AutoTokenizer.from_pretrained(model_dir),
        device=torch.device(device), revision=None,
        dtype=str(model.dtype).removeprefix("torch."),  # type: ignore[attr-defined]
        context_length=config.max_position_embeddings,
        vocab_size=int(model.get_output_embeddings().weight.shape[0]))  # type: ignore[attr-defined]


def in_process_scoring(lm: object, specs: list, lookahead: bool) -> None:
    """The worker backend's ``score_batch`` on all ``specs``, at the worker's budget."""
    import torch

    from worker.backends.hf_score import BatchBudget, score_batch

    budget = BatchBudget.for_device(lm.device.type)  # type: ignore[attr-defined]
    outputs = score_batch(lm, specs, budget, lookahead=lookahead)  # type: ignore[arg-type]
    failed = [out for out in outputs if isinstance(out, Exception)]
    assert not failed, failed[:3]
    if lm.device.type == "cuda":  # type: ignore[attr-defined]
        torch.cuda.synchronize()


def report_syncs(lm: object, batch: list[list[int]]) -> None:
    """Where queuing one batch (``launch_token_logprobs``) waits for the GPU: torch's
    sync debug mode warns at each host-device synchronization. The base model runs
    without an attention mask, so transformers does not read one on the host to
    choose a kernel; on an H100 with transformers 5.17 one or two were left, one in
    its check of the position ids for packed sequences, which the packed path skips
    since (``worker/backends/hf_packed_check.py``); after that, one report, its frames
    at the mode switch after the batch was queued (run F, docs/throughput.md). Each
    makes queuing batch i + 1 wait for batch i's forward pass to end. Only torch's
    synchronization warnings count; each is printed with its text."""
    import traceback
    import warnings

    import torch

    from worker.backends.hf_batch_logprobs import launch_token_logprobs

    if lm.device.type != "cuda":  # type: ignore[attr-defined]
        return
    torch.cuda.synchronize()
    stacks: list[str] = []  # where each wait came from: the Python frames above it

    def note(message: object, category: object, filename: str, lineno: int,
             file: object = None, line: object = None) -> None:
        if "synchroniz" not in str(message):  # another warning
            return
        frames = [frame for frame in traceback.extract_stack()[:-1]
                  if not frame.filename.endswith("warnings.py")][-6:]
        stacks.append(f"{str(message)[:60]!r}: " + " <- ".join(
            f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in reversed(frames)))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = note
        torch.cuda.set_sync_debug_mode("warn")
        try:
            launched = launch_token_logprobs(lm, batch, [0] * len(batch))  # type: ignore[arg-type]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    launched.result()
    print(f"queuing one batch of {len(batch)} texts synchronized with the GPU "
          f"{len(stacks)} time(s)" + "".join(f"\n  at {stack}" for stack in stacks),
          flush=True)


def sweep_timeline(client: object, sweep_id: str, submitted: float, sent: float,
                   seen: float) -> str:
    """Where a round's wall time went: submitting, waiting for the worker's first
    job to start, the worker's span from its first job's start to its last job's
    finish, and noticing the end (the poll)."""
    from sqlalchemy import func, select

    from api_client.schema import Job

    with client.session() as session:
        first, last = session.execute(select(func.min(Job.started_at), func.max(
            Job.finished_at)).where(Job.sweep_id == sweep_id)).one()
    first_s, last_s = (t.replace(tzinfo=t.tzinfo or timezone.utc).timestamp()  # naive: UTC
                       for t in (first, last))
    return (f"submit {sent - submitted:.3f}s, to first start {first_s - sent:.3f}s, "
            f"worker span {last_s - first_s:.3f}s, end noticed after {seen - last_s:.3f}s")


@contextlib.contextmanager
def profiled(pids: list[int], path: Path | None):
    """``py-spy record`` of the worker processes (and their pool children) while the
    block runs, written to ``path`` in py-spy's raw (collapsed stacks) format."""
    if path is None:
        yield
        return
    import signal

    spies = [subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--subprocesses",
                               "--rate", "200", "--format", "raw", "--nonblocking",
                               "-o", f"{path}.{pid}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT) for pid in pids]
    time.sleep(1.0)  # let it attach
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--dtype", default=None, help="default: float16 on GPU, float32 on CPU")
    parser.add_argument("--model-dir", type=Path, help="reuse / write the model here")
    parser.add_argument("--score-jobs", type=int, default=8,
                        help="score jobs per worker (0: skip)")
    parser.add_argument("--score-tokens", type=int, default=1024)
    parser.add_argument("--generate-jobs", type=int, default=2,
                        help="generate jobs per worker (0: skip, and HF generate too)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--ratio-texts", type=int, default=512,
                        help="texts for the end-to-end / bare forward / notebook comparison "
                             "(0 skips it)")
    parser.add_argument("--ratio-rounds", type=int, default=3)
    parser.add_argument("--long-texts", type=int, default=0,
                        help="then the same comparison on this many texts of --long-length "
                             "tokens (0: skip)")
    parser.add_argument("--long-length", type=int, default=512)
    parser.add_argument("--chunk-size", type=chunk_size_arg, nargs="+", default=None,
                        help="jobs per broker message in the end-to-end sweeps, or 'default' "
                             "(the client's: api_client/messages.py; the default); several: "
                             "one end-to-end method each, interleaved")
    parser.add_argument("--worker-args", action="append", metavar="ARGS",
                        help="extra `logprobe worker` arguments of one worker configuration "
                             "to compare, e.g. '--concurrency 2', after any NAME=value "
                             "settings of the workers' environment, e.g. "
                             "'LOGPROBE_MAX_BATCH=64 --pool threads' (repeat for "
                             "several; default: one configuration, the defaults). Generation "
                             "and the notebook loop run with the first only")
    parser.add_argument("--notebook-texts", type=int, default=0,
                        help="run the notebook loop on the first N texts only (0: all) and "
                             "compare it by tokens/s")
    parser.add_argument("--skip-notebook", action="store_true",
                        help="leave out the notebook loop (the slowest method: ~40 ms a "
                             "text on an H100), e.g. on a workload sized for the queue")
    parser.add_argument("--skip-in-process", action="store_true",
                        help="leave out the first configuration's extra methods: the bare "
                             "forward on each --chunk-size's batches, the worker's "
                             "score_batch in this process, and where queuing a batch waits")
    parser.add_argument("--profile-worker", type=Path, metavar="PATH",
                        help="py-spy the workers during generation and the timed comparison "
                             "rounds (collapsed stacks to PATH-<phase>.<pid>; needs py-spy)")
    parser.add_argument("--timeline", action="store_true",
                        help="start the workers through bench/gpu_timeline.py and print "
                             "where their GPU idled in each end-to-end round")
    args = parser.parse_args()

    n_gpus = gpu_count()
    if n_gpus == 0 and args.shape != "tiny":
        print("no CUDA GPU visible: run this on the GPU machine, or use --shape tiny to "
              "try the script on a CPU", file=sys.stderr)
        return 2
    dtype = args.dtype or ("float16" if n_gpus else "float32")
    gpus: list[int | None] = list(range(n_gpus)) or [None]
    work = Path(tempfile.mkdtemp(prefix="logprobe-gpu-check-"))
    args.timeline_dir = work
    env = dict(os.environ)
    env.setdefault("LOGPROBE_HOME", str(work / "home"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    os.environ.update({k: env[k] for k in ("LOGPROBE_HOME", "HF_HUB_OFFLINE")})

    model_dir = args.model_dir or work / f"random-{args.shape}"
    if not (model_dir / "config.json").exists():
        build_model(model_dir, args.shape, dtype)
    import torch

    if n_gpus:
        print(f"{n_gpus} GPU(s): " + ", ".join(torch.cuda.get_device_name(i)
                                               for i in range(n_gpus)), flush=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from api_client import Client

    queue = f"logprobe.hf.gpu-check-{os.getpid()}"
    device = "cuda:0" if n_gpus else "cpu"
    spec_device = None if n_gpus else "cpu"
    options = {"model": str(model_dir), "dtype": dtype, "device": spec_device}
    reference = None  # this process's copy of the model, for the references
    try:
        with Client(queue=queue) as client:
            for number, variant_args in enumerate(args.worker_args or [""]):
                settings, worker_args = worker_configuration(variant_args)
                variant = "-".join(a.strip("-") for a in shlex.split(variant_args)) or "default"
                command = " ".join([*(f"{k}={v}" for k, v in settings.items()),
                                    "logprobe worker --backend hf --gpu N", *worker_args])
                print(f"\n== workers: `{command}`", flush=True)
                # A queue per configuration: messages a stopped worker had prefetched
                # go back to its queue, not to the next configuration's.
                client.queue = f"{queue}-{number}"
                workers = start_workers(gpus, client.queue, {**env, **settings}, work,
                                        worker_args, variant, timeline_path(args, variant))
                try:
                    # Warm up: every pool process loads the model once (not timed).
                    started = time.monotonic()
                    warm = [client.score(PROMPT, reuse=False, **options)
                            for _ in range(8 * len(gpus))]
                    for job in warm:
                        job.result(timeout=1800)
                    print(f"workers up, model loaded in {time.monotonic() - started:.0f}s",
                          flush=True)
                    if reference is None:
                        reference = AutoModelForCausalLM.from_pretrained(
                            model_dir, dtype=getattr(torch, dtype)).to(device).eval()
                    if number == 0:
                        worker_throughput(client, options, args, gpus,
                                          [w.pid for w in workers], variant)
                        if args.generate_jobs:
                            bare_generate(reference, AutoTokenizer.from_pretrained(model_dir),
                                          device, args.new_tokens)
                    if args.ratio_texts or args.long_texts:
                        scoring_ratios(client, client.queue, reference, model_dir, dtype, device,
                                       spec_device, args, [w.pid for w in workers], variant,
                                       first=number == 0, settings=settings)
                finally:
                    stop_workers(workers)
    finally:
        if not os.environ.get("LOGPROBE_REDIS_URL"):
            stop_embedded(Path(env["LOGPROBE_HOME"]) / "redis")
        if args.model_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def worker_throughput(client: object, options: dict, args: argparse.Namespace,
                      gpus: list[int | None], pids: list[int], variant: str) -> None:
    """Long score jobs, then greedy generation jobs, twice."""
    rng = random.Random(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    score_jobs = [client.score(token_ids=[rng.randrange(3, vocab)
                                          for _ in range(args.score_tokens)], **options)
                  for _ in range(args.score_jobs * len(gpus))]
    if score_jobs:
        run_batch(score_jobs, "scoring")
    if not args.generate_jobs:
        return
    profile = args.profile_worker and args.profile_worker.with_name(
        f"{args.profile_worker.name}-{variant}-generation")
    with profiled(pids, profile):
        # The same greedy jobs twice (reuse off: each runs): the first round meets each
        # decode step's shape for the first time in the worker, the second again.
        for label in ("first", "second, same prompt"):
            jobs = [client.generate(PROMPT, max_new_tokens=args.new_tokens, reuse=False,
                                    **options)
                    for _ in range(args.generate_jobs * len(gpus))]
            per_job = run_batch(jobs, f"generation ({label})")
            print(f"generation ({label}): {1000 / per_job:.1f} ms per new token per job",
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
