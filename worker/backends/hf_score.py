"""HF score probes: loss and per-token logprobs of a text."""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from api_client.errors import ProbeInputError
from api_client.results import SequenceResult
from api_client.specs import ScoreSpec

from ..control import JobControl, JobStopped, control_for
from .base import OutputsReady, ProbeOutput
from .hf_batch_logprobs import LaunchedLogprobs, TextLogprobs, launch_token_logprobs
from .hf_common import (
    alternatives_from_topk,
    check_ids,
    decode_each,
    input_tokens,
    text_logprobs,
)
from .hf_interrupt import all_should_stop, stop_when
from .hf_models import LoadedModel

log = logging.getLogger(__name__)


def score_ids(lm: LoadedModel, spec: ScoreSpec, text_ids: Sequence[int] | None = None
              ) -> list[int]:
    """The ids a score probe scores: its ``token_ids``, or its text's tokens
    (``text_ids`` if the caller tokenized it already), after BOS if asked."""
    if spec.token_ids is not None:
        ids = list(spec.token_ids)
    elif text_ids is not None:
        ids = list(text_ids)
    else:
        ids = lm.tokenizer(spec.text, add_special_tokens=False)["input_ids"]
    if spec.prepend_bos:
        bos = lm.bos_token_id
        if bos is None:
            raise ProbeInputError(
                f"model {lm.name!r} has no BOS or EOS token to prepend; set prepend_bos=False"
            )
        ids = [bos, *ids]
    if len(ids) < 2:
        raise ProbeInputError(
            "the text is a single token, which has nothing before it to be scored "
            "against; pass prepend_bos=True or a longer text"
        )
    return ids


def score(lm: LoadedModel, spec: ScoreSpec) -> ProbeOutput:
    ids = score_ids(lm, spec)
    check_ids(lm, ids, "the scored text")
    control = control_for(spec)
    if control is not None:
        control.begin(len(ids), "tokens")
    tokens = text_logprobs(lm, ids, spec.top_logprobs)
    if control is not None:
        control.advance(len(ids))
    scored = [t.logprob for t in tokens[1:]]
    total = float(torch.tensor(scored, dtype=torch.float64).sum())
    return ProbeOutput(
        sequences=[SequenceResult(index=0, text=spec.text, tokens=tuple(tokens))],
        loss=-total / len(scored),
        sum_logprob=total,
        num_scored_tokens=len(scored),
        provenance={**lm.provenance(), "batch_size": 1},
    )


# --- batched scoring (docs/throughput.md) ---------------------------------------------

#: Padded tokens per forward pass (batch size x longest text in the batch) unless the
#: worker is told otherwise (``LOGPROBE_BATCH_TOKENS``); halved for the rest of the
#: process each time a batch runs out of memory. On a CPU, small length buckets win
#: (padding costs as much as real tokens, and a GEMM is efficient from ~1k rows); on
#: a GPU, big batches do.
DEFAULT_BATCH_TOKENS = {"cpu": 1024, "mps": 4096, "cuda": 8192}
#: Most texts in one forward pass, however short they are, by device type, unless the
#: worker is told otherwise (``LOGPROBE_MAX_BATCH``). A GPU forward pass costs its
#: launching thread about the same CPU time however many texts it holds (a
#: Llama-2-7B-shaped model's: ~35 ms of Python per batch on the H100 machine, against
#: ~92 ms on the GPU for 64 paragraphs), so short texts go up to 256 a batch there,
#: within the token budget (~117 paragraphs): the GPU's work per batch grows, the
#: CPU's does not. On a CPU the token budget binds first.
DEFAULT_MAX_BATCH = {"cpu": 64, "mps": 64, "cuda": 256}


@dataclass
class BatchBudget:
    """How big a forward pass may be; shrinks when one runs out of memory."""

    tokens: int = DEFAULT_BATCH_TOKENS["cpu"]
    max_batch: int = DEFAULT_MAX_BATCH["cpu"]

    @classmethod
    def for_device(cls, device_type: str,
                   environ: Mapping[str, str] = os.environ) -> BatchBudget:
        """The worker's budget on a device of ``device_type`` ("cpu", "cuda", ...):
        ``LOGPROBE_BATCH_TOKENS`` and ``LOGPROBE_MAX_BATCH`` from ``environ`` where set,
        else :data:`DEFAULT_BATCH_TOKENS` and :data:`DEFAULT_MAX_BATCH` (a device type
        they do not list takes the CPU's)."""
        known = device_type if device_type in DEFAULT_BATCH_TOKENS else "cpu"
        tokens = int(environ.get("LOGPROBE_BATCH_TOKENS", DEFAULT_BATCH_TOKENS[known]))
        max_batch = int(environ.get("LOGPROBE_MAX_BATCH", DEFAULT_MAX_BATCH[known]))
        if tokens < 0:
            raise ValueError(f"LOGPROBE_BATCH_TOKENS must be 0 or more (0: no batching), "
                             f"got {tokens}")
        if max_batch < 1:
            raise ValueError(f"LOGPROBE_MAX_BATCH must be at least 1, got {max_batch}")
        return cls(tokens=tokens, max_batch=max_batch)

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices into ``lengths`` in batches: sorted by length (little padding), each
        within the token budget (a text longer than the budget goes alone)."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            longest = lengths[i]  # sorted ascending: the newcomer is the longest
            if current and (
                (len(current) + 1) * longest > self.tokens or len(current) >= self.max_batch
            ):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


T = TypeVar("T")
R = TypeVar("R")


def run_with_backoff(
    items: list[T], forward: Callable[[list[T]], list[R]], budget: BatchBudget
) -> list[tuple[list[T], list[R] | BaseException]]:
    """``forward(items)``; on out-of-memory, halve the batch (and the budget) and retry.

    Returns ``(items, results)`` per sub-batch that ran, or ``(items, error)`` for a
    single item that does not fit even alone.
    """
    try:
        return [(items, forward(items))]
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(items) == 1:
            return [(items, exc)]
        half = len(items) // 2
        budget.tokens = max(1, min(budget.tokens, budget.tokens // 2))
        log.warning("out of memory on a batch of %d; retrying as %d + %d and lowering "
                    "the token budget to %d", len(items), half, len(items) - half,
                    budget.tokens)
        return (run_with_backoff(items[:half], forward, budget)
                + run_with_backoff(items[half:], forward, budget))


#: The texts of one batch: (index into the specs, token ids) each.
BatchPart = list[tuple[int, list[int]]]
#: What scoring a batch gave: its outputs, or the error of a text too big even alone.
BatchResults = list[tuple[BatchPart, list[ProbeOutput | Exception] | BaseException]]


def score_batch(lm: LoadedModel, specs: Sequence[ScoreSpec],
                budget: BatchBudget | None = None, *, chunk_rows: int | None = None,
                head_only: bool | None = None, vocabulary_tile: int | None = None,
                on_batch: OutputsReady | None = None,
                lookahead: bool | None = None) -> list[ProbeOutput | Exception]:
    """Score many texts on one model in length-bucketed, padded batches.

    Each output equals :func:`score` of its spec alone (float32, within 1e-5);
    ``provenance["batch_size"]`` is the number of texts in the forward pass it ran in.
    ``chunk_rows``, ``head_only`` and ``vocabulary_tile`` go to
    :func:`launch_token_logprobs`; the defaults suit the model and device
    (``head_only=False`` forces the full forward pass). ``on_batch(indices, outputs)``
    gets each batch's outputs as soon as its forward pass is done (texts that could
    not be prepared are handed on first).

    ``lookahead`` (default: on a CUDA device) queues each batch on the device before
    it collects the previous one, so the GPU computes batch i + 1 while the CPU turns
    batch i into outputs and hands them on (:func:`launch_token_logprobs`). On a CPU
    it would only hand each batch on one batch later.
    """
    budget = budget or BatchBudget()
    if lookahead is None:
        lookahead = lm.device.type == "cuda"
    scoring = BatchScoring(lm, specs, budget, on_batch,
                           dict(chunk_rows=chunk_rows, head_only=head_only,
                                vocabulary_tile=vocabulary_tile))
    in_flight: tuple[list[int], Launched] | None = None

    def collect_in_flight() -> None:
        nonlocal in_flight
        if in_flight is not None:
            (done_indices, done), in_flight = in_flight, None
            scoring.record(done_indices, scoring.collected(done))

    try:
        for batch_indices in budget.plan([len(ids) for _, ids in scoring.prepared]):
            items = [scoring.prepared[i] for i in batch_indices]
            launched: Launched | None = None
            if lookahead:
                try:
                    launched = scoring.launch(items)  # queued behind the batch in flight
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
            collect_in_flight()
            if launched is not None:
                in_flight = (batch_indices, launched)
            else:  # one batch at a time, or one that ran out of memory as it was queued
                scoring.record(batch_indices, run_with_backoff(items, scoring.forward, budget))
    finally:  # also when a later batch broke: the one in flight keeps its outputs
        collect_in_flight()
    return [out if out is not None else RuntimeError("not scored") for out in scoring.outputs]


@dataclass
class Launched:
    """A batch queued by :meth:`BatchScoring.launch`: its texts, their jobs' controls,
    and its queued work (or why every job of it stopped)."""

    part: BatchPart
    controls: list[tuple[JobControl | None, int]]
    work: LaunchedLogprobs | JobStopped


class BatchScoring:
    """The state of one :func:`score_batch` call: the specs' token ids (``prepared``;
    a text that could not be prepared has its error in ``outputs`` at once, handed
    on), and the steps of a batch: :meth:`launch`, :meth:`collect`, :meth:`record`."""

    def __init__(self, lm: LoadedModel, specs: Sequence[ScoreSpec], budget: BatchBudget,
                 on_batch: OutputsReady | None, options: dict[str, Any]) -> None:
        self.lm, self.specs, self.budget, self.on_batch = lm, specs, budget, on_batch
        self.options = options  # for launch_token_logprobs
        self.outputs: list[ProbeOutput | Exception | None] = [None] * len(specs)
        self.prepared: BatchPart = []
        with_text = [i for i, spec in enumerate(specs)
                     if spec.token_ids is None and spec.text]
        text_ids = dict(zip(with_text, lm.tokenizer(  # one call for all: the tokenizer's batch
            [specs[i].text for i in with_text], add_special_tokens=False)["input_ids"],
            strict=True)) if with_text else {}
        for index, spec in enumerate(specs):
            try:
                ids = score_ids(lm, spec, text_ids.get(index))
                check_ids(lm, ids, "the scored text")
                self.prepared.append((index, ids))
            except Exception as exc:
                self.outputs[index] = exc
        refused = [i for i, out in enumerate(self.outputs) if out is not None]
        if on_batch is not None and refused:
            on_batch(refused, [self.outputs[i] for i in refused])  # type: ignore[misc]
        self.provenance = lm.provenance()

    def launch(self, part: BatchPart) -> Launched:
        """Start the jobs' clocks and queue the batch's forward pass and scoring."""
        controls = [(control_for(self.specs[i]), len(ids)) for i, ids in part]
        for control, n in controls:
            if control is not None:
                control.begin(n, "tokens")
        try:
            with stop_when(all_should_stop([control for control, _ in controls])):
                return Launched(part, controls, launch_token_logprobs(
                    self.lm, [ids for _, ids in part],
                    [self.specs[i].top_logprobs for i, _ in part], **self.options))
        except JobStopped as stopped:  # every job of the batch was cancelled / timed out
            return Launched(part, controls, stopped)

    def collect(self, launched: Launched) -> list[ProbeOutput | Exception]:
        """Wait for a launched batch; its outputs."""
        if isinstance(launched.work, JobStopped):
            return [launched.work] * len(launched.part)
        scored = launched.work.result()
        for control, n in launched.controls:
            if control is not None:
                control.advance(n)
        return [
            _score_output(self.lm, self.specs[i], ids, text, self.provenance,
                          len(launched.part))
            for (i, ids), text in zip(launched.part, scored, strict=True)
        ]

    def forward(self, part: BatchPart) -> list[ProbeOutput | Exception]:
        """One batch, launched and collected (for :func:`run_with_backoff`)."""
        return self.collect(self.launch(part))

    def collected(self, launched: Launched) -> BatchResults:
        """:meth:`collect`; on out-of-memory, the batch again in halves."""
        try:
            return [(launched.part, self.collect(launched))]
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            return run_with_backoff(launched.part, self.forward, self.budget)

    def record(self, batch_indices: list[int], parts: BatchResults) -> None:
        """A planned batch's results into ``outputs``, then handed on."""
        for part, result in parts:
            for position, (index, _) in enumerate(part):
                if isinstance(result, BaseException):
                    self.outputs[index] = ProbeInputError(
                        f"scoring this text ran out of memory even alone ({result}); "
                        "shorten the text or run it on a larger device"
                    )
                else:
                    self.outputs[index] = result[position]
        if self.on_batch is not None:
            batch = [self.prepared[i][0] for i in batch_indices]
            self.on_batch(batch, [self.outputs[i] for i in batch])  # type: ignore[misc]


#: Per tokenizer, each token id's text as ``tokenizer.decode([id])`` gives it.
_TOKEN_TEXTS: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()


def token_texts(lm: LoadedModel, ids: Sequence[int]) -> list[str]:
    """:func:`decode_each`, remembering every token decoded before (tiny probes
    would otherwise spend a good part of their time in the tokenizer)."""
    cache = _TOKEN_TEXTS.setdefault(lm.tokenizer, {})
    missing = sorted({i for i in ids if i not in cache})
    if missing:
        cache.update(zip(missing, decode_each(lm, missing), strict=True))
    return [cache[i] for i in ids]


def _score_output(lm: LoadedModel, spec: ScoreSpec, ids: list[int], scored: TextLogprobs,
                  provenance: dict[str, Any], batch_size: int) -> ProbeOutput:
    alternatives = None
    if scored.top_values is not None and scored.top_ids is not None:
        texts = token_texts(lm, [i for row in scored.top_ids for i in row])
        alternatives = [(), *alternatives_from_topk(scored.top_values, scored.top_ids, texts)]
    token_lp = scored.token_logprobs
    tokens = tuple(input_tokens(ids, token_texts(lm, ids), token_lp, alternatives))
    total = math.fsum(token_lp)
    return ProbeOutput(
        sequences=[SequenceResult(index=0, text=spec.text, tokens=tokens)],
        loss=-total / len(token_lp),
        sum_logprob=total,
        num_scored_tokens=len(token_lp),
        provenance={**provenance, "batch_size": batch_size},
    )
