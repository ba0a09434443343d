"""Where a worker's GPU idles: a timeline of the forward passes it queues.

``bench/gpu_check.py --timeline`` starts its workers through this module
(``python bench/gpu_timeline.py --worker <logprobe worker arguments>``), which patches
the worker's scoring at Celery's ``worker_init``: each batch the worker queues
(``launch_token_logprobs``) gets three CUDA events, recorded as its launch begins,
when its first decoder layer is queued (after transformers' host-side checks, which
wait for the GPU), and when its launch returns. Once the last has completed, the
worker appends a line for the batch to ``LOGPROBE_GPU_TIMELINE``: its process and
thread, the CPU times (``time.monotonic``) its launch began and returned, the GPU
times its first kernel ran, its first layer began and its work ended (on the same
clock, through a reference event), and its padded tokens. On a CPU the launch runs
the batch, and the "GPU" times are the CPU's at those points: enough to rehearse the
plumbing. (``bench/virtual_gpu.py`` writes its virtual device's batches so too.)

:func:`summarize` turns the lines of a time window (one end-to-end round) into where
the GPU was idle: between batches, split into the time before the next launch began
(the CPU busy elsewhere: storing, Celery, the other message) and after; and inside
batches, from a batch's first kernel to its first layer (the wait for the GPU at the
start of each forward pass, and the launch's Python up to there).
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

#: Where the worker appends a line per batch (set by the driver).
ENV_TIMELINE = "LOGPROBE_GPU_TIMELINE"


@dataclass(frozen=True)
class Batch:
    """One batch on the timeline (seconds on the CPU's monotonic clock)."""

    thread: str
    launch_began: float
    launch_returned: float
    gpu_began: float
    first_layer: float
    gpu_ended: float
    tokens: int
    message: str = "-"

    @classmethod
    def parse(cls, line: str) -> Batch:
        thread, *numbers, tokens, message = line.split()
        return cls(thread, *map(float, numbers), int(tokens), message)  # type: ignore[arg-type]

    def line(self) -> str:
        return (f"{self.thread} {self.launch_began:.6f} {self.launch_returned:.6f} "
                f"{self.gpu_began:.6f} {self.first_layer:.6f} {self.gpu_ended:.6f} "
                f"{self.tokens} {self.message}\n")


class _CpuEvent:
    """``torch.cuda.Event``'s part used here, on the CPU's clock (for a CPU device)."""

    def __init__(self) -> None:
        self.at = 0.0

    def record(self) -> None:
        self.at = time.monotonic()

    def query(self) -> bool:
        return True


class Recorder:
    """Events of the batches queued in this process; a thread writes the finished."""

    def __init__(self, path: str, cuda: bool) -> None:
        import torch

        self.path, self.cuda = path, cuda
        self._lock = threading.Lock()
        self._pending: list[tuple[str, float, float, Any, Any, Any, int, str]] = []
        self._first_layer = threading.local()
        if cuda:
            torch.cuda.synchronize()
            self._base = torch.cuda.Event(enable_timing=True)
            self._base.record()
            self._base.synchronize()
            self._base_at = time.monotonic()
        threading.Thread(target=self._write_finished, name="gpu-timeline",
                         daemon=True).start()

    def event(self) -> Any:
        if not self.cuda:
            event: Any = _CpuEvent()
        else:
            import torch

            event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def at(self, event: Any) -> float:
        return event.at if isinstance(event, _CpuEvent) else (
            self._base_at + self._base.elapsed_time(event) / 1000)

    def before_first_layer(self, _module: Any, _args: Any) -> None:
        if getattr(self._first_layer, "waiting", False):
            self._first_layer.waiting = False
            self._first_layer.event = self.event()

    def launch(self, launch: Any, lm: Any, batch: Sequence[Sequence[int]], *args: Any,
               **kwargs: Any) -> Any:
        from celery import current_task

        message = getattr(current_task, "request", None)
        message_id = getattr(message, "id", None) or "-"
        began = time.monotonic()
        first = self.event()
        self._first_layer.waiting, self._first_layer.event = True, None
        try:
            launched = launch(lm, batch, *args, **kwargs)
        finally:
            self._first_layer.waiting = False
        last = self.event()
        layer = self._first_layer.event or first
        with self._lock:
            # (pid:thread: the pool processes of --concurrency 2 share one file)
            self._pending.append((f"{os.getpid()}:{threading.current_thread().name}",
                                  began, time.monotonic(),
                                  first, layer, last, len(batch) * max(map(len, batch)),
                                  message_id))
        return launched

    def _write_finished(self) -> None:
        while True:
            time.sleep(0.25)
            with self._lock:
                done = [item for item in self._pending if item[5].query()]
                self._pending = [item for item in self._pending if item not in done]
            if done:
                with open(self.path, "a") as out:
                    out.writelines(
                        Batch(thread.replace(" ", "_"), began, returned, self.at(first),
                              self.at(layer), self.at(last), tokens, message).line()
                        for thread, began, returned, first, layer, last, tokens, message
                        in done)


def install_timeline(**_: Any) -> None:
    """Patch the worker's scoring to record its batches (the recorder starts in the
    process that runs tasks, on its first batch: CUDA must not start before the fork)."""
    import worker.backends.hf_score as hf_score
    from worker.backends.hf_interrupt import decoder_layers

    path = os.environ[ENV_TIMELINE]
    launch = hf_score.launch_token_logprobs
    recorders: dict[int, Recorder] = {}
    hooked: set[int] = set()
    lock = threading.Lock()

    def recorded_launch(lm: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        with lock:
            recorder = recorders.get(os.getpid())
            if recorder is None:
                recorder = recorders[os.getpid()] = Recorder(path, lm.device.type == "cuda")
            if id(lm.model) not in hooked:
                hooked.add(id(lm.model))
                layers = decoder_layers(lm.model)
                if layers:
                    layers[0].register_forward_pre_hook(recorder.before_first_layer)
        return recorder.launch(launch, lm, batch, *args, **kwargs)

    hf_score.launch_token_logprobs = recorded_launch  # type: ignore[assignment]


def read(path: Path) -> list[Batch]:
    return [Batch.parse(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(batches: Iterable[Batch], window: tuple[float, float]) -> str:
    """Where the GPU was idle in ``window`` (the batches that began in it): between
    batches, at a message's boundary (before a batch of another message than the one
    before it on the GPU) and inside messages; for each gap inside a message, its ms
    and the ms its thread spent from its previous launch's return to this launch."""
    inside = sorted((b for b in batches if window[0] <= b.gpu_began <= window[1]),
                    key=lambda b: b.gpu_began)
    if not inside:
        return "no batches"
    busy_until = inside[0].gpu_began
    busy = between = cpu_late = boundary = 0.0
    gaps = 0
    at_boundaries: list[str] = []  # each gap's ms
    within: list[str] = []
    previous: Batch | None = None
    returned: dict[str, float] = {}  # thread -> its last launch's return
    for batch in inside:
        if batch.gpu_began > busy_until:  # idle from the last work's end to this batch
            gap = batch.gpu_began - busy_until
            between += gap
            cpu_late += min(gap, max(0.0, batch.launch_began - busy_until))
            gaps += 1
            if previous is not None and previous.message != batch.message:
                boundary += gap
                at_boundaries.append(f"{1000 * gap:.0f}")
            elif batch.thread in returned:
                within.append(f"{1000 * gap:.0f}/"
                              f"{1000 * (batch.launch_began - returned[batch.thread]):.0f}")
        start = max(batch.gpu_began, busy_until)
        busy += max(0.0, batch.gpu_ended - start)
        busy_until = max(busy_until, batch.gpu_ended)
        returned[batch.thread] = batch.launch_returned
        previous = batch
    span = busy_until - inside[0].gpu_began
    to_layer = [b.first_layer - b.gpu_began for b in inside]
    launch = [b.launch_returned - b.launch_began for b in inside]
    padded = sum(b.tokens for b in inside)
    return (f"{len(inside)} batches of {padded} padded tokens over {span:.3f}s, GPU busy "
            f"{busy:.3f}s (from each batch's "
            f"first kernel); idle between batches {between:.3f}s "
            f"in {gaps} gaps ({cpu_late:.3f}s of it before the next launch began; "
            f"{boundary:.3f}s in {len(at_boundaries)} at a message's boundary"
            f"{' (' + ', '.join(at_boundaries) + ' ms)' if at_boundaries else ''}; inside a "
            "message, "
            f"gap/CPU from the thread's last launch ms: {', '.join(within) or 'none'}); "
            f"from a batch's first kernel to its first layer {sum(to_layer):.3f}s in all "
            f"(median {1000 * statistics.median(to_layer):.1f} ms); launches (CPU) median "
            f"{1000 * statistics.median(launch):.1f} ms, {sum(launch):.3f}s in all")


if __name__ == "__main__":
    from bench.gpu_check import run_patched_worker

    if sys.argv[1:2] == ["--worker"]:
        run_patched_worker(sys.argv[2:], install_timeline)
    else:
        print(__doc__)
