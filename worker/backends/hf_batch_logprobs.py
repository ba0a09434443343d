"""Per-token logprobs of a padded batch of texts, computed only where they are needed.

A text of n ids is scored at positions 0..n-2 (each predicts the next token); the
last position and the padding need no logits, and positions that end the same prefix
as an earlier one (:mod:`.hf_prefix_rows`) share its row. The distinct rows are
packed and run through the output layer and a float32 log-softmax a chunk at a time,
so the [rows, vocabulary] logits never exist whole: each scored token's logit is
gathered, each row's log-sum-exp computed, and top-k values and ids kept only for
rows that asked for alternatives.

Where the model's forward is exactly ``head(base_model(...).last_hidden_state)``
(:data:`HEAD_ONLY_CLASSES`), the base model runs and only the packed hidden rows go
through the head. Any other model runs its full forward and the needed logits rows
are packed from its output.

A chunk's logits are ``[rows, vocabulary]``. On a CPU the plain-linear head computes
a chunk a tile of vocabulary ids at a time (:data:`CPU_TILE_BYTES` of logits): each
tile's product, max and log-sum-exp run on data still in cache, and the tiles' sums
are combined as an online softmax does (``sum_t exp(max_t - max) * sum_t``). A chunk
of 64 rows over GPT-2's 50,257 ids is 13 MB, past the cache: its product and
log-sum-exp took 16.7 ms on one core, in 4,096-id tiles 12.3 ms. With tiles, a chunk
may have more rows (the product wants them) without leaving the cache. A tile's
log-sum-exp goes through ``torch.log_softmax``'s kernel on a CPU (:func:`tile_log_sum`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .hf_models import LoadedModel
from .hf_packed_check import without_packed_check
from .hf_prefix_rows import PrefixRows, distinct_prefix_rows

#: Packed rows per chunk of output layer + log-softmax, by device type. A GPU wants
#: big kernels; on a CPU the matrix product wants many rows, and vocabulary tiles
#: keep the logits in cache however many. A chunk's logits take rows x vocabulary x 4
#: bytes on top of the forward pass, a CPU's rows x tile x 4 (the log-softmax works in
#: place; in half precision, 2 bytes plus a float32 copy: 6).
DEFAULT_CHUNK_ROWS = {"cpu": 512, "mps": 1024, "cuda": 1024}
#: Bytes of float32 logits per vocabulary tile on a CPU (a chunk's logits are
#: computed and reduced one tile at a time: see the module's docstring); elsewhere a
#: chunk is one tile. Measured on the 2-core AMD EPYC here (512 KiB L2 per core,
#: 32 MiB L3), the worker's score_batch on 1,024 tiny texts in 64-text batches, wall
#: ms per text: one thread, 512-row chunks in 1,024-id tiles (2 MiB) 0.62, 256 rows in
#: 2,048-id tiles 0.62, 128 rows in 4,096-id tiles 0.66-0.68, 128 rows in 2,048-id
#: tiles 0.69-0.72; two threads 0.45-0.46 at 512 rows in 2 MiB tiles, 0.59-0.67 at
#: 256 rows. Before the log-softmax kernel (``exp_`` and a sum on the logits laid out
#: ``[vocabulary, rows]``, computed as ``weight @ rows.T``, which MKL ran faster than
#: ``rows @ weight.T``), the best was 128 rows in 4,096-id tiles: 0.74-0.75 on one
#: thread, 0.54-0.85 on two. 64 paragraphs on GPT-2 124M with two threads: 512 rows
#: in 2 MiB tiles as fast as 384 rows in 2 MiB tiles (the model's body dominates).
#: The machine is noisy: differences under ~10% are within its noise.
CPU_TILE_BYTES = 2 << 20

#: ``config.model_type`` -> the transformers class whose forward computes its logits
#: as exactly ``lm_head(base_model(...).last_hidden_state)``, with no scaling or
#: soft-capping after the head (read in transformers 5.24's modeling files).
HEAD_ONLY_CLASSES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

#: Config fields by which other architectures post-process logits after the head
#: (Gemma 2 soft-capping, Cohere/Granite scaling): a model setting any of them takes
#: the full forward even if its class is listed above.
LOGIT_POSTPROCESSING_FIELDS = (
    "final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
)

#: Logits of the packed rows ``[start, stop)`` for the vocabulary ids ``[first, last)``
#: (``[stop - start, last - first]``, contiguous), on the device the output layer
#: uses; a tensor the caller may overwrite.
LogitsOfRows = Callable[[int, int, int, int], torch.Tensor]


@dataclass(frozen=True)
class RowLogits:
    """Where packed rows' logits come from: ``of`` computes a tile of them, at most
    ``tile`` vocabulary ids at a time (all ``vocabulary`` where a tile is the whole
    row)."""

    of: LogitsOfRows
    vocabulary: int
    tile: int


@dataclass
class TextLogprobs:
    """One text's scores: the logprob of each token after the first and, if the text
    asked for ``k`` alternatives, the top-k logprobs and token ids at each of those
    positions (best first)."""

    token_logprobs: list[float]
    top_values: list[list[float]] | None = None
    top_ids: list[list[int]] | None = None


def head_only_applies(model: torch.nn.Module) -> bool:
    """Whether ``model``'s logits are its output layer applied to its base model's
    last hidden state, with nothing after (see :data:`HEAD_ONLY_CLASSES`)."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    expected = HEAD_ONLY_CLASSES.get(model_type or "")
    cls = type(model)
    return (
        expected is not None
        and cls.__name__ == expected
        and cls.__module__ == f"transformers.models.{model_type}.modeling_{model_type}"
        and all(getattr(config, field, None) is None for field in LOGIT_POSTPROCESSING_FIELDS)
    )


def head_device(head: torch.nn.Module) -> torch.device:
    """Where the output layer computes: its weight's device or, for a weight that
    accelerate offloaded (on the meta device until its hook loads it), the hook's
    execution device."""
    weight = head.weight
    if weight.device.type != "meta":
        return weight.device
    execution_device = getattr(getattr(head, "_hf_hook", None), "execution_device", None)
    return torch.device(execution_device) if execution_device is not None else weight.device


def default_chunk_rows(head: torch.nn.Module) -> int:
    """Rows per chunk for the output layer ``head``: :data:`DEFAULT_CHUNK_ROWS` for its
    device type."""
    return DEFAULT_CHUNK_ROWS.get(head_device(head).type, DEFAULT_CHUNK_ROWS["cuda"])


def padded_batch(lm: LoadedModel, batch: Sequence[Sequence[int]]) -> torch.Tensor:
    """``batch`` right-padded (with EOS where the model has it, else 0) as input ids."""
    longest = max(len(ids) for ids in batch)
    # Any id the model embeds will do (padded positions come after a text's own, and
    # are masked or never scored): EOS, unless the tokenizer's EOS lies outside the
    # model's vocabulary (a tokenizer larger than the model).
    eos = lm.eos_token_id
    pad = eos if eos is not None and eos < lm.vocab_size else 0
    # One tensor from padded lists: a tensor and a slice assignment per text cost a
    # 64-text batch of tiny probes ~1 ms.
    input_ids = torch.tensor([[*ids, *[pad] * (longest - len(ids))] for ids in batch],
                             dtype=torch.long)
    return to_device(input_ids, lm.device)


def padding_mask(lm: LoadedModel, batch: Sequence[Sequence[int]]) -> torch.Tensor:
    """The attention mask of :func:`padded_batch` (1 on each text's own tokens)."""
    longest = max(len(ids) for ids in batch)
    lengths = torch.tensor([len(ids) for ids in batch], dtype=torch.long)
    mask = (torch.arange(longest)[None, :] < lengths[:, None]).long()
    return to_device(mask, lm.device)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (on the CPU) on ``device``, without waiting for the GPU: to a CUDA
    device through pinned memory, non-blocking. (A plain copy from pageable memory
    waits for all the work queued on the stream, so a batch's index tensors moved
    after its forward pass was launched would wait for that forward pass to end,
    and the next batch could not be queued behind it: :func:`launch_token_logprobs`.)"""
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def is_plain_linear(head: torch.nn.Module) -> bool:
    """Whether calling ``head`` is exactly ``x @ weight.T (+ bias)``: a bare
    ``nn.Linear`` with no hooks (accelerate's offloading or placement, quantization)."""
    return (
        type(head) is torch.nn.Linear
        and not head._forward_hooks
        and not head._forward_pre_hooks
        and not hasattr(head, "_hf_hook")
        and head.weight.device.type != "meta"
    )


def default_vocabulary_tile(device: torch.device, chunk_rows: int, vocabulary: int) -> int:
    """Vocabulary ids per tile: on a CPU, :data:`CPU_TILE_BYTES` of a chunk's float32
    logits; elsewhere the whole vocabulary."""
    if device.type != "cpu":
        return vocabulary
    return max(1, min(vocabulary, CPU_TILE_BYTES // (4 * chunk_rows)))


def head_only_logits(lm: LoadedModel, batch: Sequence[Sequence[int]], input_ids: torch.Tensor,
                     positions: torch.Tensor, chunk_rows: int,
                     vocabulary_tile: int | None = None) -> RowLogits:
    """Runs the base model; the output layer is applied later, to packed rows only.

    The base model gets no attention mask (``batch``, for the mask, is not needed):
    the batch is padded on the right and attention is causal, so each text's own
    positions attend to its own earlier tokens alone, mask or none, and only those
    positions are scored (what padded positions compute is never read); the
    architectures this path takes (:func:`head_only_applies`) number positions from
    0 whatever the mask. Without one, transformers neither builds a [batch, 1,
    length, length] mask nor reads it on the host to choose an attention kernel (on
    a GPU, a wait for all the work queued before), and SDPA runs its causal kernel
    (flash attention on a GPU). Nor does transformers 5.x check the position ids it
    made for packed sequences, another wait (:mod:`.hf_packed_check`), so that batch
    i + 1 can be queued while batch i computes (on an H100 the workers' GPU then
    never waited inside a message with one pool process: docs/throughput.md, run G). The
    scored positions' hidden states equal the masked call's (bit for bit on a CPU;
    ``tests/test_batch_logprobs.py``).

    A plain ``nn.Linear`` head computes ``rows @ weight[tile].T`` ``vocabulary_tile``
    ids at a time (default :func:`default_vocabulary_tile`) into one reused buffer
    (fresh vocabulary-sized tensors cost page faults on a CPU). Any other head runs
    once per chunk, on the whole vocabulary.
    """
    with without_packed_check():  # ids only: one sequence a row, no GPU wait
        hidden = lm.model.base_model(
            input_ids=input_ids, attention_mask=None, use_cache=False
        ).last_hidden_state
    head = lm.model.get_output_embeddings()
    packed = hidden.flatten(0, 1).index_select(0, to_device(positions, hidden.device))
    packed = packed.to(head_device(head))
    if not is_plain_linear(head):
        vocabulary = lm.vocab_size
        return RowLogits(lambda start, stop, first, last: head(packed[start:stop]),
                         vocabulary, vocabulary)
    weight, bias = head.weight, head.bias
    vocabulary = weight.shape[0]
    tile = vocabulary_tile or default_vocabulary_tile(packed.device, chunk_rows, vocabulary)
    storage = torch.empty(min(chunk_rows, packed.shape[0]) * min(tile, vocabulary),
                          dtype=packed.dtype, device=packed.device)

    def rows_times_weight(start: int, stop: int, first: int, last: int) -> torch.Tensor:
        out = storage[: (stop - start) * (last - first)].view(stop - start, last - first)
        weight_t = weight[first:last].t()
        if bias is None:
            return torch.mm(packed[start:stop], weight_t, out=out)
        return torch.addmm(bias[first:last], packed[start:stop], weight_t, out=out)

    return RowLogits(rows_times_weight, vocabulary, tile)


def full_forward_logits(lm: LoadedModel, batch: Sequence[Sequence[int]],
                        input_ids: torch.Tensor, positions: torch.Tensor, chunk_rows: int,
                        vocabulary_tile: int | None = None) -> RowLogits:
    """Runs the whole model ([batch, length, vocabulary] logits); rows are packed
    later, a chunk at a time, into one reused buffer (``vocabulary_tile`` does not
    apply: the logits exist already, a chunk is one tile)."""
    logits = lm.model(input_ids=input_ids,
                      attention_mask=padding_mask(lm, batch)).logits.flatten(0, 1)
    on_device = to_device(positions, logits.device)
    vocabulary = logits.shape[-1]
    buffer = torch.empty((min(chunk_rows, on_device.shape[0]), vocabulary),
                         dtype=logits.dtype, device=logits.device)
    return RowLogits(
        lambda start, stop, first, last: torch.index_select(
            logits, 0, on_device[start:stop], out=buffer[: stop - start]),
        vocabulary, vocabulary)


@dataclass
class PackedScores:
    """Scores of all scored rows (text after text): the target's logprob per row, and
    where any row asked for alternatives, the top ``k_max`` logprobs and ids per row
    (rows that did not ask hold zeros)."""

    token_logprobs: torch.Tensor  # [rows] float32, CPU
    top_values: torch.Tensor | None  # [rows, k_max] float32, CPU
    top_ids: torch.Tensor | None  # [rows, k_max] long, CPU


def chunked_scores(row_logits: RowLogits, prefixes: PrefixRows, targets: torch.Tensor,
                   row_top_k: torch.Tensor, chunk_rows: int) -> PackedScores:
    """Per chunk of distinct prefix rows, a vocabulary tile at a time: the scored
    tokens' logits, top-k logits and ids where a row asks for them, and the float32
    max and ``log(sum(exp(logits - max)))`` (:func:`tile_log_sum`); the tiles' values
    combined; then each scored row's logprob as
    ``logit - max - log(sum(exp(logits - max)))``, the formula of
    ``torch.log_softmax``."""
    n_rows = targets.shape[0]
    distinct = prefixes.distinct
    row_of = prefixes.row_of
    k_max = int(row_top_k.max()) if n_rows else 0
    # Per distinct row: the most alternatives any row ending that prefix asks for.
    distinct_k = torch.zeros(distinct, dtype=torch.long).scatter_reduce_(
        0, row_of, row_top_k, "amax")
    vocabulary, tile = row_logits.vocabulary, row_logits.tile
    tile_starts = list(range(0, vocabulary, tile))
    tiled = len(tile_starts) > 1
    # Per chunk, on the device (one copy to the CPU at the end, not one per chunk):
    picked: list[torch.Tensor] = []  # the scored tokens' logits, rows in `picked_rows`
    picked_rows: list[torch.Tensor] = []
    maxima: list[torch.Tensor] = []
    log_sums: list[torch.Tensor] = []
    top_distinct: list[torch.Tensor] = []
    top_values: list[torch.Tensor] = []
    top_ids: list[torch.Tensor] = []
    device = torch.device("cpu")  # where the logits are (set by the first chunk)
    for start in range(0, distinct, chunk_rows):
        stop = min(start + chunk_rows, distinct)
        rows = torch.nonzero((row_of >= start) & (row_of < stop))[:, 0]
        row_targets = targets[rows]
        bounds = [0, len(rows)]
        if tiled:  # rows by target, so that each tile's targets are one slice
            rows = rows[torch.argsort(row_targets)]
            row_targets = targets[rows]
            bounds = torch.searchsorted(
                row_targets, torch.tensor([*tile_starts, vocabulary])).tolist()
        columns = row_of[rows] - start
        picked_rows.append(rows)
        wanted = torch.nonzero(distinct_k[start:stop])[:, 0]
        tile_max: list[torch.Tensor] = []
        tile_log_sums: list[torch.Tensor] = []
        tile_values: list[torch.Tensor] = []
        tile_ids: list[torch.Tensor] = []
        for index, first in enumerate(tile_starts):  # [0] where a chunk is one tile
            last = min(first + tile, vocabulary)
            logits = row_logits.of(start, stop, first, last)  # [rows, ids], ours
            if logits.dtype != torch.float32:
                logits = logits.float()
            device = logits.device
            low, high = bounds[index], bounds[index + 1]
            if high > low:
                picked.append(logits[to_device(columns[low:high], device),
                                     to_device(row_targets[low:high] - first, device)])
            if len(wanted):
                rows_wanted = logits if len(wanted) == stop - start else (
                    logits.index_select(0, to_device(wanted, device)))
                values, ids = torch.topk(rows_wanted, min(k_max, logits.shape[1]), dim=1)
                tile_values.append(values)
                tile_ids.append(ids + first if first else ids)
            most, log_sum = tile_log_sum(logits)  # overwrites the logits
            if tiled:  # a tile all -inf for a row adds nothing, not nan
                log_sum = torch.where(most == -torch.inf, 0.0, log_sum)
                most.clamp_(min=torch.finfo(torch.float32).min)
            tile_max.append(most)
            tile_log_sums.append(log_sum)
        if tiled:  # sum_t exp(max_t - max) * sum_t, in logs
            most = torch.stack(tile_max)
            chunk_max = most.amax(0)
            maxima.append(chunk_max)
            log_sums.append(torch.logsumexp(most - chunk_max + torch.stack(tile_log_sums), 0))
        else:
            maxima.append(tile_max[0])
            log_sums.append(tile_log_sums[0])
        if len(wanted):
            values, ids = tile_values[0], tile_ids[0]
            if tiled:  # the best of each tile's best
                values, best = torch.topk(torch.cat(tile_values, 1), min(k_max, vocabulary),
                                          dim=1)
                ids = torch.cat(tile_ids, 1).gather(1, best)
            top_distinct.append(wanted + start)
            top_values.append(values)
            top_ids.append(ids)
    # The rows' logprobs on the device the logits are on (one copy to the CPU later,
    # :func:`copied_to_host`).
    target_logits = torch.empty(n_rows, dtype=torch.float32, device=device)
    if picked:
        target_logits[to_device(torch.cat(picked_rows), device)] = torch.cat(picked)
    row_max = torch.cat(maxima) if maxima else torch.empty(0, device=device)
    row_log_sum = torch.cat(log_sums) if log_sums else torch.empty(0, device=device)
    row_of = to_device(row_of, device)
    token_logprobs = (target_logits - row_max[row_of]) - row_log_sum[row_of]
    if not top_distinct:
        return PackedScores(token_logprobs, None, None)
    k = top_values[0].shape[-1]
    distinct_values = torch.zeros((distinct, k), dtype=torch.float32, device=device)
    distinct_ids = torch.zeros((distinct, k), dtype=torch.long, device=device)
    index = to_device(torch.cat(top_distinct), device)
    distinct_values[index] = ((torch.cat(top_values) - row_max[index, None])
                              - row_log_sum[index, None])
    distinct_ids[index] = torch.cat(top_ids)
    asked = to_device((row_top_k > 0)[:, None], device)
    return PackedScores(token_logprobs,
                        torch.where(asked, distinct_values[row_of], 0.0),
                        torch.where(asked, distinct_ids[row_of], 0))


@dataclass
class PendingScores:
    """Scores on their way to the CPU: :meth:`wait` returns them there once the copy
    (and so all the work queued before it) is done."""

    scores: PackedScores
    copied: torch.cuda.Event | None = None  # None: the scores are on the CPU already

    def wait(self) -> PackedScores:
        if self.copied is not None:
            self.copied.synchronize()
        return self.scores


def copied_to_host(scores: PackedScores) -> PendingScores:
    """``scores`` copied to the CPU; from a CUDA device into pinned memory without
    waiting (the copy is queued behind the work that computes them)."""
    tensors = (scores.token_logprobs, scores.top_values, scores.top_ids)
    device = scores.token_logprobs.device
    if device.type != "cuda":
        return PendingScores(PackedScores(*(t if t is None else t.cpu() for t in tensors)))
    host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            .copy_(t, non_blocking=True) for t in tensors]
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(device))  # the copies' stream (their device's)
    return PendingScores(PackedScores(*host), copied)  # type: ignore[arg-type]


def tile_log_sum(logits: torch.Tensor, *, kernel: bool | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of float32 ``logits`` ([rows, ids], contiguous, overwritten): the
    maximum and ``log(sum(exp(logits - max)))``.

    With ``kernel`` (default: on a CPU) through ``torch.log_softmax``'s kernel, in
    place (it reads each row before it writes it), whose largest output per row is
    exactly ``-log(sum(exp(x - max)))``: its ``exp`` is cheaper than ``exp_``'s on a
    CPU (2 MiB tiles of the tiny model: the whole log-sum-exp in 0.6 of the time).
    Otherwise ``exp(logits - max)`` in place and a sum."""
    most = logits.amax(1)
    if kernel is None:
        kernel = logits.device.type == "cpu"
    if kernel:
        logits = logits.contiguous()  # itself, as every RowLogits gives
        log_softmax = torch.ops.aten._log_softmax.out(logits, 1, False, out=logits)
        return most, log_softmax.amax(1).neg_()
    return most, logits.sub_(most[:, None]).exp_().sum(1).log_()


@dataclass
class LaunchedLogprobs:
    """A batch whose forward pass and scoring are queued on the device:
    :meth:`result` waits for them and splits the scores per text."""

    pending: PendingScores
    n_scored: list[int]
    top_k: list[int]

    def result(self) -> list[TextLogprobs]:
        return split_per_text(self.pending.wait(), self.n_scored, self.top_k)


def launch_token_logprobs(lm: LoadedModel, batch: Sequence[Sequence[int]],
                          top_k: Sequence[int], *, chunk_rows: int | None = None,
                          head_only: bool | None = None,
                          vocabulary_tile: int | None = None) -> LaunchedLogprobs:
    """One right-padded forward pass over ``batch``; per text, the logprob of each
    token after the first (``log_softmax(logits[i-1])[token_i]`` in float32) and, where
    ``top_k`` asks, the top-k alternatives at each of those positions: in
    :meth:`LaunchedLogprobs.result`.

    ``chunk_rows``: distinct rows per chunk (default :func:`default_chunk_rows`).
    ``head_only``: apply the output layer to the packed rows only (default: where
    :func:`head_only_applies`); ``False`` forces the full forward.
    ``vocabulary_tile``: vocabulary ids per tile of the packed head (see
    :func:`head_only_logits`).

    Returns once the work is queued on the device (on a CPU: done). On a GPU nothing
    here waits for the GPU (the full forward's model, given an attention mask, reads
    it on the host as it starts, which waits for the work queued before); so the
    caller may queue the next batch before it asks for this one's result, and the
    GPU computes that batch while the CPU turns this one into rows."""
    if head_only is None:
        head_only = head_only_applies(lm.model)
    input_ids = padded_batch(lm, batch)
    prefixes = distinct_prefix_rows(batch, input_ids.shape[1])
    targets = torch.tensor([t for ids in batch for t in ids[1:]], dtype=torch.long)
    row_top_k = torch.tensor([k for ids, k in zip(batch, top_k, strict=True)
                              for _ in range(len(ids) - 1)], dtype=torch.long)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(lm.model.get_output_embeddings())
    with torch.inference_mode():
        row_logits = (head_only_logits if head_only else full_forward_logits)(
            lm, batch, input_ids, prefixes.positions, chunk_rows, vocabulary_tile)
        scores = chunked_scores(row_logits, prefixes, targets, row_top_k, chunk_rows)
        pending = copied_to_host(scores)
    return LaunchedLogprobs(pending, [len(ids) - 1 for ids in batch], list(top_k))


def split_per_text(scores: PackedScores, n_scored: Sequence[int],
                   top_k: Sequence[int]) -> list[TextLogprobs]:
    """The packed rows back into texts (``n_scored[i]`` rows each, text after text),
    each text's alternatives cut to its own ``top_k``."""
    token_logprobs = scores.token_logprobs.tolist()
    values = scores.top_values.tolist() if scores.top_values is not None else None
    ids = scores.top_ids.tolist() if scores.top_ids is not None else None
    results = []
    start = 0
    for n, k in zip(n_scored, top_k, strict=True):
        stop = start + n
        text = TextLogprobs(token_logprobs[start:stop])
        if k and values is not None and ids is not None:
            text.top_values = [row[:k] for row in values[start:stop]]
            text.top_ids = [row[:k] for row in ids[start:stop]]
        results.append(text)
        start = stop
    return results
