"""GPU check: one worker per visible GPU serving a Llama-2-7B-shaped model, tokens/s.

Builds a LLaMA-architecture model of the real Llama-2-7B shape (hidden 4096, 32
layers, 32 heads, intermediate 11008, vocab 32000; 6.7 B parameters) with random
weights in float16, saves it with ``save_pretrained`` (about 13.5 GB), starts
``logprobe worker --backend hf --gpu N`` for every visible GPU on one queue, and
submits score and generate jobs through the normal client. It prints tokens/s for
scoring (prompt tokens scored per second) and for greedy generation (new tokens
per second), over all GPUs and per job, from the job rows' own timestamps. Then
issue 6's GPU targets: a sweep of ``--ratio-texts`` texts scored end to end
through the queue (rows committed) against the bare batched forward pass and the
notebook loop on GPU 0, same model, dtype and ids (targets: >= 0.9x and >= 5x).

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
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
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
                  log_dir: Path) -> list[subprocess.Popen]:
    workers = []
    for gpu in gpus:
        args = [sys.executable, "-m", "api_client.cli", "worker", "--backend", "hf",
                "--queues", queue, "--loglevel", "info"]
        if gpu is not None:
            args += ["--gpu", str(gpu)]
        log = (log_dir / f"worker-{gpu}.log").open("wb")
        workers.append(subprocess.Popen(args, env=env, cwd=REPO_ROOT, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True))
    return workers


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


def run_batch(client: object, jobs: list, what: str, tokens_of: object) -> None:
    """Wait for ``jobs`` and print throughput over the batch and per job."""
    started = time.monotonic()
    results = [job.result(timeout=3600) for job in jobs]
    wall = time.monotonic() - started
    infos = [job.info() for job in jobs]
    total = sum(tokens_of(r) for r in results)
    per_job = [tokens_of(r) / (i["finished_at"] - i["started_at"]).total_seconds()
               for r, i in zip(results, infos, strict=True)]
    devices = sorted({f"{i['device']} ({i['device_name']}, {i['dtype']})" for i in infos})
    print(f"{what}: {len(jobs)} jobs, {total} tokens in {wall:.1f}s = {total / wall:.1f} "
          f"tokens/s over all workers; per job median "
          f"{sorted(per_job)[len(per_job) // 2]:.1f} tokens/s; on {', '.join(devices)}",
          flush=True)


def scoring_ratios(client: object, queue: str, model_dir: Path, dtype: str, device: str,
                   spec_device: str | None, args: argparse.Namespace, workers: int) -> None:
    """Issue 6's GPU targets: logprobe end to end (a sweep through the queue, every
    token row committed) against the bare batched forward pass (full logits, nothing
    else) and the notebook loop (one ``model(ids, labels=ids)`` and log-softmax per
    text), both run in this process on ``device`` with the same model, dtype and token
    ids. Texts have the lengths of the CPU benchmark's paragraphs (random ids: the
    GPT-2 tokenizer's ids run past this vocabulary). Methods interleaved, medians."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM

    from api_client.specs import ScoreSpec
    from bench.corpus import paragraphs
    from bench.throughput import (
        bare_batched_forward,
        notebook_loop,
        sweep_token_rows,
        wait_all_succeeded,
    )
    from tests.tiny_models import gpt2_tokenizer
    from worker.backends.hf_score import DEFAULT_BATCH_TOKENS, BatchBudget

    lengths = [len(ids) + 1 for ids in gpt2_tokenizer()(  # + 1: BOS, as there
        paragraphs(args.ratio_texts), add_special_tokens=False)["input_ids"]]
    rng = random.Random(1)
    vocab = SHAPES[args.shape]["vocab_size"]
    id_lists = [[1, *(rng.randrange(3, vocab) for _ in range(n - 1))] for n in lengths]
    n_scored = sum(n - 1 for n in lengths)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    plan = BatchBudget(tokens=DEFAULT_BATCH_TOKENS[torch.device(device).type]).plan(lengths)

    def end_to_end() -> None:
        sweep_id = uuid.uuid4().hex
        client.submit_many([ScoreSpec(model=str(model_dir), token_ids=ids, dtype=dtype,
                                      device=spec_device, reuse=False)
                            for ids in id_lists], sweep_id=sweep_id, queue=queue)
        # GPU rounds are short: poll every 20 ms, not the CPU benchmark's 50.
        wait_all_succeeded(client, sweep_id, len(id_lists), interval=0.02)
        rows = sweep_token_rows(client, sweep_id)
        assert rows == n_scored + len(id_lists), (rows, n_scored + len(id_lists))

    methods = {"bare batched forward (full logits, nothing else)":
                   lambda: bare_batched_forward(model, id_lists, plan, 2, device),
               "notebook loop (model(ids, labels=ids) + log_softmax)":
                   lambda: notebook_loop(model, id_lists, device),
               f"logprobe end to end ({workers} worker(s), rows committed)": end_to_end}
    for fn in methods.values():  # warm-up: kernels, allocator, the workers' first batch
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.ratio_rounds):
        for name, fn in methods.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    med = {name: statistics.median(t) for name, t in times.items()}
    bare, notebook, ours = med.values()
    print(f"\nscoring {len(id_lists)} texts, {n_scored} scored tokens, {dtype} on {device}, "
          f"{args.ratio_rounds} rounds (medians):", flush=True)
    print("| method | median s | tokens/s | vs bare forward | vs notebook loop |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, seconds in med.items():
        print(f"| {name} | {seconds:.2f} | {n_scored / seconds:.0f} | {bare / seconds:.2f}x "
              f"| {notebook / seconds:.2f}x |")
    print(f"issue 6 on this device: end to end {bare / ours:.2f}x the bare forward "
          f"(target >= 0.9x), {notebook / ours:.2f}x the notebook loop (target >= 5x); "
          "all rounds (s): " + "; ".join(
              f"{name.split(' (')[0]}: {', '.join(f'{t:.2f}' for t in ts)}"
              for name, ts in times.items()), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--dtype", default=None, help="default: float16 on GPU, float32 on CPU")
    parser.add_argument("--model-dir", type=Path, help="reuse / write the model here")
    parser.add_argument("--score-jobs", type=int, default=8, help="score jobs per worker")
    parser.add_argument("--score-tokens", type=int, default=1024)
    parser.add_argument("--generate-jobs", type=int, default=2, help="generate jobs per worker")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--ratio-texts", type=int, default=512,
                        help="texts for the end-to-end / bare forward / notebook comparison "
                             "(0 skips it)")
    parser.add_argument("--ratio-rounds", type=int, default=3)
    args = parser.parse_args()

    n_gpus = gpu_count()
    if n_gpus == 0 and args.shape != "tiny":
        print("no CUDA GPU visible: run this on the GPU machine, or use --shape tiny to "
              "try the script on a CPU", file=sys.stderr)
        return 2
    dtype = args.dtype or ("float16" if n_gpus else "float32")
    gpus: list[int | None] = list(range(n_gpus)) or [None]
    work = Path(tempfile.mkdtemp(prefix="logprobe-gpu-check-"))
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

    from api_client import Client

    queue = f"logprobe.hf.gpu-check-{os.getpid()}"
    workers = start_workers(gpus, queue, env, work)
    try:
        with Client(queue=queue) as client:
            device = None if n_gpus else "cpu"
            options = {"model": str(model_dir), "dtype": dtype, "device": device}
            # Warm up: every worker loads the model once (not timed).
            started = time.monotonic()
            warm = [client.score(PROMPT, **options) for _ in gpus]
            for job in warm:
                job.result(timeout=1800)
            print(f"workers up, model loaded in {time.monotonic() - started:.0f}s", flush=True)

            rng = random.Random(0)
            vocab = SHAPES[args.shape]["vocab_size"]
            score_jobs = [
                client.score(token_ids=[rng.randrange(3, vocab) for _ in range(args.score_tokens)],
                             **options)
                for _ in range(args.score_jobs * len(gpus))
            ]
            run_batch(client, score_jobs, "scoring", lambda r: len(r.tokens))

            gen_jobs = [client.generate(PROMPT, max_new_tokens=args.new_tokens, **options)
                        for _ in range(args.generate_jobs * len(gpus))]
            run_batch(client, gen_jobs, "generation", lambda r: len(r.tokens))
            if args.ratio_texts:
                scoring_ratios(client, queue, model_dir, dtype, "cuda:0" if n_gpus else "cpu",
                               device, args, len(gpus))
    finally:
        stop_workers(workers)
        if not os.environ.get("LOGPROBE_REDIS_URL"):
            stop_embedded(Path(env["LOGPROBE_HOME"]) / "redis")
        if args.model_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
