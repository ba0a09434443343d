"""The worker's scoring pipeline against a simulated GPU, on a CPU.

On a GPU, logprobe end to end can only be as fast as the bare batched forward pass
if everything else (the broker, claiming and storing in SQL, building the rows,
the worker's Python) runs while the GPU computes. ``bench/gpu_check.py`` measures
that on a real GPU; this script estimates it where there is none, so that a change
to the pipeline can be judged before a GPU session:

- the worker is the real one (``logprobe worker --backend hf``, Celery, Redis,
  SQL), serving a LLaMA of negligible size (hidden 16, one layer, 1,000 ids), its
  math threads limited to one core (a GPU worker's launching thread uses one);
- each batch it launches also occupies a *virtual device* for ``padded tokens x
  seconds per token``, on one timeline (a batch starts when it is queued or when
  the batch before it ends); collecting a batch sleeps until its virtual end
  (the GIL released, as a wait on a CUDA event releases it), and the lookahead is
  on, as on CUDA;
- the seconds per token are set so that the bare batched forward of the texts
  (all of them planned at the CUDA budget) takes ``--device-seconds``: 0.80 s is
  what an H100 took for the 512 paragraphs on a Llama-2-7B shape in float16
  (docs/throughput.md, "On a GPU").

It prints end to end against the virtual bare forward (issue 6's ratio) per worker
configuration and chunk size, and per round where the time went: the submit, the
worker's span, and the device's padded tokens (against the bare forward's: padding
the worker's batches added), busy and idle time. The estimate is this machine's CPU
against an H100's time: the GPU machine's CPU is faster (the real H100 runs left
less idle than this script does for the same configuration), so read the
configurations' order and the effect of a change, not the absolute ratio. The
pool processes of ``--concurrency 2`` share the one virtual device, as two
processes pinned to one GPU take turns on it (each with a copy of the model).

    python bench/virtual_gpu.py                       # default configurations
    python bench/virtual_gpu.py --chunk-size 64 --chunk-size 256 \\
        "--worker-args=" "--worker-args=--pool threads --concurrency 2"

The worker process runs this module with ``--worker`` (the device patched in at
Celery's ``worker_init``, before the pool starts).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.gpu_check import (  # noqa: E402  (after the path)
    chunk_label,
    chunk_size_arg,
    run_patched_worker,
    worker_configuration,
)
from bench.gpu_timeline import Batch, read, summarize  # noqa: E402

#: Seconds of virtual device time per padded token (set by the driver).
ENV_SECONDS_PER_TOKEN = "LOGPROBE_VIRTUAL_GPU_SECONDS_PER_TOKEN"
#: Seconds of Python (GIL held) added to queuing each batch (set by the driver).
ENV_LAUNCH_PYTHON = "LOGPROBE_VIRTUAL_GPU_LAUNCH_PYTHON"
#: "1": queuing a batch first waits for the device to finish all work queued before
#: (transformers 5.x's host-side check of the position ids; set by the driver).
ENV_SYNC_ON_LAUNCH = "LOGPROBE_VIRTUAL_GPU_SYNC_ON_LAUNCH"
#: Where the worker appends a line per batch (``bench.gpu_timeline.Batch``: the device's
#: start and end are its GPU times, its queuing from first to last kernel its launch).
ENV_DEVICE_LOG = "LOGPROBE_VIRTUAL_GPU_LOG"


class VirtualDevice:
    """One serial timeline: a batch queued at ``t`` with cost ``c`` ends at
    ``max(t, end of the batch before) + c``. Each batch is logged to ``log``.

    The timeline lives in shared memory: made in the worker's main process (at
    ``worker_init``), it is the one device of all the pool processes forked after, as
    a GPU is of the processes of ``--pool prefork --concurrency 2`` pinned to it (which
    take turns on it: the batches of each wait for those queued before by either)."""

    def __init__(self, seconds_per_token: float, log: str | None = None) -> None:
        self.seconds_per_token = seconds_per_token
        self.log = log
        self._free_at = multiprocessing.Value("d", 0.0)  # with its own (shared) lock

    def queue(self, queued_at: float, padded_tokens: int, queued_until: float = 0.0,
              message: str = "-") -> float:
        """The virtual end of a batch of ``padded_tokens`` whose work was queued from
        ``queued_at`` to ``queued_until`` (it cannot end before its last kernel is
        queued); ``message``: the broker message it belongs to (for the log)."""
        with self._free_at.get_lock():
            start = max(queued_at, self._free_at.value)
            end = max(start + padded_tokens * self.seconds_per_token, queued_until)
            self._free_at.value = end
            if self.log:
                thread = f"{os.getpid()}:{threading.current_thread().name}"
                with open(self.log, "a") as log:
                    log.write(Batch(thread, queued_at, queued_until, start, start, end,
                                    padded_tokens, message).line())
            return end

    @property
    def free_at(self) -> float:
        with self._free_at.get_lock():
            return float(self._free_at.value)


def install_virtual_device(**_: Any) -> None:
    """Patch the worker's hf scoring: each launched batch also takes its virtual
    device time, which collecting it waits for; lookahead on."""
    from celery import current_task

    import worker.backends.hf as hf
    import worker.backends.hf_score as hf_score

    device = VirtualDevice(float(os.environ[ENV_SECONDS_PER_TOKEN]),
                           os.environ.get(ENV_DEVICE_LOG))
    launch_python = float(os.environ.get(ENV_LAUNCH_PYTHON, "0"))
    sync_on_launch = os.environ.get(ENV_SYNC_ON_LAUNCH) == "1"
    launch = hf_score.launch_token_logprobs
    score_batch = hf_score.score_batch

    def launch_on_device(lm: Any, batch: Any, top_k: Any, **options: Any) -> Any:
        if sync_on_launch:  # waits (GIL released) for all work queued before
            time.sleep(max(0.0, device.free_at - time.monotonic()))
        queued_at = time.monotonic()  # a GPU starts on the first kernel queued
        launched = launch(lm, batch, top_k, **options)
        python_until = time.perf_counter() + launch_python
        while time.perf_counter() < python_until:  # Python's work queuing a real model
            pass
        ends_at = device.queue(queued_at, len(batch) * max(map(len, batch)),
                               time.monotonic(), current_task.request.id or "-")
        wait = launched.pending.wait

        def wait_for_device() -> Any:
            time.sleep(max(0.0, ends_at - time.monotonic()))
            return wait()

        launched.pending.wait = wait_for_device
        return launched

    def score_batch_with_lookahead(*args: Any, lookahead: bool | None = None,
                                   **kwargs: Any) -> Any:
        return score_batch(*args, lookahead=True if lookahead is None else lookahead,
                           **kwargs)

    hf_score.launch_token_logprobs = launch_on_device  # type: ignore[assignment]
    hf.score_batch = score_batch_with_lookahead  # type: ignore[assignment]


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        run_patched_worker(sys.argv[2:], install_virtual_device)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--device-seconds", type=float, default=0.80,
                        help="the virtual bare batched forward of the texts (seconds)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--launch-ms", type=float, default=0.0,
                        help="Python (GIL held) added to queuing each batch, for a real "
                             "model's module calls and kernel launches (the nano model's "
                             "own are a few ms; Llama-2-7B's were ~34 ms a batch on the "
                             "H100 machine)")
    parser.add_argument("--sync-on-launch", action="store_true",
                        help="queuing a batch first waits for the device to finish the "
                             "work queued before, as transformers 5.x's check of its "
                             "position ids for packed sequences made it wait on a GPU, before "
                             "the packed path skipped it, and an unidentified wait may")
    parser.add_argument("--chunk-size", type=chunk_size_arg, action="append",
                        help="jobs per message, or 'default' (the client's) (repeat; "
                             "default: 'default', 64 and 256)")
    parser.add_argument("--worker-args", action="append", metavar="ARGS",
                        help="a worker configuration: `logprobe worker` arguments after any "
                             "NAME=value settings of its environment (repeat; default: the "
                             "defaults, and --pool threads --concurrency 2)")
    args = parser.parse_args()
    chunk_sizes = args.chunk_size or [None, 64, 256]
    configurations = args.worker_args or ["", "--pool threads --concurrency 2"]

    from api_client import Client
    from api_client.specs import ScoreSpec
    from bench.gpu_check import (
        SHAPES,
        build_model,
        paragraph_lengths,
        stop_embedded,
        stop_workers,
        sweep_timeline,
    )
    from bench.throughput import wait_all_succeeded
    from worker.backends.hf_score import BatchBudget

    work = Path(tempfile.mkdtemp(prefix="logprobe-virtual-gpu-"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("LOGPROBE_HOME", str(work / "home"))
    cuda = BatchBudget.for_device("cuda")  # the worker on the CPU batches as on CUDA
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", LOGPROBE_BATCH_TOKENS=str(cuda.tokens),
               LOGPROBE_MAX_BATCH=str(cuda.max_batch))
    os.environ.update({k: env[k] for k in ("LOGPROBE_HOME", "HF_HUB_OFFLINE")})
    lengths = paragraph_lengths(args.texts)
    plan = cuda.plan(lengths)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in plan)
    env[ENV_SECONDS_PER_TOKEN] = repr(args.device_seconds / padded)
    env[ENV_LAUNCH_PYTHON] = repr(args.launch_ms / 1000)
    env[ENV_SYNC_ON_LAUNCH] = "1" if args.sync_on_launch else "0"
    rng = random.Random(1)
    vocab = SHAPES["nano"]["vocab_size"]
    id_lists = [[1, *(rng.randrange(3, vocab) for _ in range(n - 1))] for n in lengths]
    print(f"{len(lengths)} paragraphs, {sum(n - 1 for n in lengths)} scored tokens; "
          f"virtual bare forward {args.device_seconds:.2f} s ({len(plan)} batches, "
          f"{padded} padded tokens)", flush=True)
    rows = []
    try:
        model_dir = str(build_model(work / "nano-llama", "nano", "float32"))
        with Client() as client:
            for number, worker_args in enumerate(configurations):
                queue = f"logprobe.hf.virtual-gpu-{os.getpid()}-{number}"
                log = (work / f"worker-{number}.log").open("wb")
                device_log = work / f"device-{number}.log"
                device_log.touch()
                env[ENV_DEVICE_LOG] = str(device_log)
                settings, arguments = worker_configuration(worker_args)
                worker = subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--worker", "--backend",
                     "hf", "--queues", queue, "--loglevel", "info", *arguments],
                    env={**env, **settings}, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)
                try:
                    for chunk_size in chunk_sizes:
                        def round_trip(chunk_size: int | None = chunk_size,
                                       queue: str = queue,
                                       device_log: Path = device_log) -> tuple[float, str]:
                            sweep_id = uuid.uuid4().hex
                            specs = [ScoreSpec(model=model_dir, token_ids=ids, reuse=False)
                                     for ids in id_lists]
                            logged = len(read(device_log))
                            started, submitted = time.perf_counter(), time.time()
                            client.submit_many(specs, sweep_id=sweep_id, queue=queue,
                                               chunk_size=chunk_size)
                            sent = time.time()
                            wait_all_succeeded(client, sweep_id, len(specs), interval=0.02)
                            seconds = time.perf_counter() - started
                            timeline = sweep_timeline(client, sweep_id, submitted, sent,
                                                      time.time())
                            batches = read(device_log)[logged:]
                            return seconds, (f"{timeline}; device: "
                                             f"{summarize(batches, (0.0, float('inf')))}")

                        round_trip()  # warm-up: the model loads
                        times, timelines = [], []
                        for _ in range(args.rounds):
                            seconds, timeline = round_trip()
                            times.append(seconds)
                            timelines.append(timeline)
                        median = statistics.median(times)
                        rows.append((worker_args or "(defaults)", chunk_size or "default",
                                     median,
                                     args.device_seconds / median, times))
                        rounds = [f"{t:.2f} s: {line}"
                                  for t, line in zip(times, timelines, strict=True)]
                        print(f"`{worker_args or '(defaults)'}`, {chunk_label(chunk_size)} "
                              "jobs per "
                              f"message: median {median:.2f} s = "
                              f"{args.device_seconds / median:.2f}x the virtual bare forward; "
                              "rounds:\n  " + "\n  ".join(rounds), flush=True)
                finally:
                    stop_workers([worker])
    finally:
        if not os.environ.get("LOGPROBE_REDIS_URL"):
            stop_embedded(Path(env["LOGPROBE_HOME"]) / "redis")
        shutil.rmtree(work, ignore_errors=True)
    print("\n| worker configuration | jobs per message | median s | vs virtual bare forward "
          "| rounds (s) |\n| --- | ---: | ---: | ---: | --- |")
    for worker_args, chunk_size, median, ratio, times in rows:
        print(f"| `{worker_args}` | {chunk_size} | {median:.2f} | {ratio:.2f}x | "
              f"{', '.join(f'{t:.2f}' for t in times)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
