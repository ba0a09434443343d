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

A chunk's logits are handled vocabulary-major, ``[vocabulary, rows]``: on a CPU the
output layer computes ``weight @ rows.T``, which MKL runs 1.6-2x faster than
``rows @ weight.T`` (one AVX2 core, hidden size 64; at hidden size 768 on two cores
the product and log-softmax take 26% less time per row), and the log-sum-exp
reduces along the vocabulary as fast in either layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .hf_models import LoadedModel
from .hf_prefix_rows import PrefixRows, distinct_prefix_rows

#: Packed rows per chunk of output layer + log-softmax, by device type. A GPU wants
#: big kernels. On a CPU, few rows keep a chunk's float32 logits in cache for the
#: log-softmax (64 x 50,257 x 4 bytes = 13 MB), but the matrix product of the output
#: layer wants more rows as the hidden size grows: see :func:`default_chunk_rows`.
#: A chunk's logits take rows x vocabulary x 4 bytes on top of the forward pass (the
#: log-softmax works in place; in half precision, 2 bytes plus a float32 copy: 6).
DEFAULT_CHUNK_ROWS = {"cpu": 64, "mps": 1024, "cuda": 1024}
#: Most rows per chunk on a CPU, however wide the model.
CPU_MAX_CHUNK_ROWS = 512

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

#: Logits of the packed rows ``[start, stop)``, vocabulary-major (``[vocabulary,
#: stop - start]``, possibly a transposed view), on the device the output layer uses;
#: a tensor the caller may overwrite.
LogitsOfRows = Callable[[int, int], torch.Tensor]


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
    device type; on a CPU, hidden size / 2 rows within 64..512 (measured on a 2-core
    CPU: a 2-layer model of hidden size 64 is fastest at 32-64 rows, GPT-2 124M,
    hidden size 768, at 256-1024)."""
    device_type = head_device(head).type
    rows = DEFAULT_CHUNK_ROWS.get(device_type, DEFAULT_CHUNK_ROWS["cuda"])
    if device_type == "cpu":
        rows = max(rows, min(head.weight.shape[-1] // 2, CPU_MAX_CHUNK_ROWS))
    return rows


def padded_batch(lm: LoadedModel, batch: Sequence[Sequence[int]]) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """``batch`` right-padded (with EOS where the model has it, else 0) as
    ``(input_ids, attention_mask)``."""
    longest = max(len(ids) for ids in batch)
    # Any id the model embeds will do (padding is masked): EOS, unless the tokenizer's
    # EOS lies outside the model's vocabulary (a tokenizer larger than the model).
    eos = lm.eos_token_id
    pad = eos if eos is not None and eos < lm.vocab_size else 0
    # One tensor from padded lists, one comparison for the mask: a tensor and two
    # slice assignments per text cost a 64-text batch of tiny probes ~1 ms.
    input_ids = torch.tensor([[*ids, *[pad] * (longest - len(ids))] for ids in batch],
                             dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids in batch], dtype=torch.long)
    mask = (torch.arange(longest)[None, :] < lengths[:, None]).long()
    return input_ids.to(lm.device), mask.to(lm.device)


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


def head_only_logits(lm: LoadedModel, input_ids: torch.Tensor, mask: torch.Tensor,
                     positions: torch.Tensor, chunk_rows: int,
                     vocabulary_major: bool | None = None) -> LogitsOfRows:
    """Runs the base model; the output layer is applied later, to packed rows only.

    A plain ``nn.Linear`` head writes every chunk into one reused buffer (fresh
    vocabulary-sized tensors cost page faults on a CPU), computed as
    ``weight @ rows.T`` where ``vocabulary_major`` (default: on a CPU, see the
    module's docstring), else as ``rows @ weight.T``.
    """
    hidden = lm.model.base_model(
        input_ids=input_ids, attention_mask=mask, use_cache=False
    ).last_hidden_state
    head = lm.model.get_output_embeddings()
    packed = hidden.flatten(0, 1).index_select(0, positions.to(hidden.device))
    packed = packed.to(head_device(head))
    if not is_plain_linear(head):
        return lambda start, stop: head(packed[start:stop]).t()
    weight, bias = head.weight, head.bias
    vocabulary = weight.shape[0]
    storage = torch.empty(min(chunk_rows, packed.shape[0]) * vocabulary,
                          dtype=packed.dtype, device=packed.device)
    if vocabulary_major is None:
        vocabulary_major = packed.device.type == "cpu"
    if vocabulary_major:
        bias_column = bias[:, None] if bias is not None else None

        def weight_times_rows(start: int, stop: int) -> torch.Tensor:
            out = storage[: (stop - start) * vocabulary].view(vocabulary, stop - start)
            rows_t = packed[start:stop].t()
            if bias_column is None:
                return torch.mm(weight, rows_t, out=out)
            return torch.addmm(bias_column, weight, rows_t, out=out)

        return weight_times_rows
    weight_t = weight.t()

    def rows_times_weight(start: int, stop: int) -> torch.Tensor:
        out = storage[: (stop - start) * vocabulary].view(stop - start, vocabulary)
        if bias is None:
            return torch.mm(packed[start:stop], weight_t, out=out).t()
        return torch.addmm(bias, packed[start:stop], weight_t, out=out).t()

    return rows_times_weight


def full_forward_logits(lm: LoadedModel, input_ids: torch.Tensor, mask: torch.Tensor,
                        positions: torch.Tensor, chunk_rows: int,
                        vocabulary_major: bool | None = None) -> LogitsOfRows:
    """Runs the whole model ([batch, length, vocabulary] logits); rows are packed
    later, a chunk at a time, into one reused buffer (``vocabulary_major`` does not
    apply: the logits exist already)."""
    logits = lm.model(input_ids=input_ids, attention_mask=mask).logits.flatten(0, 1)
    on_device = positions.to(logits.device)
    buffer = torch.empty((min(chunk_rows, on_device.shape[0]), logits.shape[-1]),
                         dtype=logits.dtype, device=logits.device)
    return lambda start, stop: torch.index_select(logits, 0, on_device[start:stop],
                                                  out=buffer[: stop - start]).t()


@dataclass
class PackedScores:
    """Scores of all scored rows (text after text): the target's logprob per row, and
    where any row asked for alternatives, the top ``k_max`` logprobs and ids per row
    (rows that did not ask hold zeros)."""

    token_logprobs: torch.Tensor  # [rows] float32, CPU
    top_values: torch.Tensor | None  # [rows, k_max] float32, CPU
    top_ids: torch.Tensor | None  # [rows, k_max] long, CPU


def chunked_scores(logits_of: LogitsOfRows, prefixes: PrefixRows, targets: torch.Tensor,
                   row_top_k: torch.Tensor, chunk_rows: int) -> PackedScores:
    """Per chunk of distinct prefix rows: logits -> the scored tokens' logits, top-k
    logits and ids where a row asks for them, and the float32 log-sum-exp; then each
    scored row's logprob as ``logit - max - log(sum(exp(logits - max)))``, the
    formula of ``torch.log_softmax``."""
    n_rows = targets.shape[0]
    distinct = prefixes.distinct
    row_of = prefixes.row_of
    k_max = int(row_top_k.max()) if n_rows else 0
    # Per distinct row: the most alternatives any row ending that prefix asks for.
    distinct_k = torch.zeros(distinct, dtype=torch.long).scatter_reduce_(
        0, row_of, row_top_k, "amax")
    # Per chunk, on the device (one copy to the CPU at the end, not one per chunk):
    picked: list[torch.Tensor] = []  # the scored tokens' logits, rows in `picked_rows`
    picked_rows: list[torch.Tensor] = []
    maxima: list[torch.Tensor] = []
    log_sums: list[torch.Tensor] = []
    top_distinct: list[torch.Tensor] = []
    top_values: list[torch.Tensor] = []
    top_ids: list[torch.Tensor] = []
    for start in range(0, distinct, chunk_rows):
        stop = min(start + chunk_rows, distinct)
        logits = logits_of(start, stop)  # [vocabulary, stop - start], ours to overwrite
        if logits.dtype != torch.float32:
            logits = logits.float()
        device = logits.device
        rows = torch.nonzero((row_of >= start) & (row_of < stop))[:, 0]
        picked_rows.append(rows)
        picked.append(logits[targets[rows].to(device), (row_of[rows] - start).to(device)])
        wanted = torch.nonzero(distinct_k[start:stop])[:, 0]
        if len(wanted):
            columns = logits if len(wanted) == stop - start else logits.index_select(
                1, wanted.to(device))
            values, ids = torch.topk(columns, min(k_max, columns.shape[0]), dim=0)
            top_distinct.append(wanted + start)
            top_values.append(values.t())
            top_ids.append(ids.t())
        chunk_max = logits.amax(0)
        maxima.append(chunk_max)
        # exp(logits - max) in place: one chunk-sized buffer, no second one.
        log_sums.append(logits.sub_(chunk_max).exp_().sum(0).log_())
    target_logits = torch.empty(n_rows, dtype=torch.float32)
    if picked:
        target_logits[torch.cat(picked_rows)] = torch.cat(picked).cpu()
    row_max = torch.cat(maxima).cpu() if maxima else torch.empty(0)
    row_log_sum = torch.cat(log_sums).cpu() if log_sums else torch.empty(0)
    token_logprobs = (target_logits - row_max[row_of]) - row_log_sum[row_of]
    if not top_distinct:
        return PackedScores(token_logprobs, None, None)
    k = top_values[0].shape[-1]
    distinct_values = torch.zeros((distinct, k), dtype=torch.float32)
    distinct_ids = torch.zeros((distinct, k), dtype=torch.long)
    index = torch.cat(top_distinct)
    distinct_values[index] = ((torch.cat(top_values).cpu() - row_max[index, None])
                              - row_log_sum[index, None])
    distinct_ids[index] = torch.cat(top_ids).cpu()
    asked = (row_top_k > 0)[:, None]
    return PackedScores(token_logprobs,
                        torch.where(asked, distinct_values[row_of], 0.0),
                        torch.where(asked, distinct_ids[row_of], 0))


def batch_token_logprobs(lm: LoadedModel, batch: Sequence[Sequence[int]],
                         top_k: Sequence[int], *, chunk_rows: int | None = None,
                         head_only: bool | None = None,
                         vocabulary_major: bool | None = None) -> list[TextLogprobs]:
    """One right-padded forward pass over ``batch``; per text, the logprob of each
    token after the first (``log_softmax(logits[i-1])[token_i]`` in float32) and, where
    ``top_k`` asks, the top-k alternatives at each of those positions.

    ``chunk_rows``: distinct rows per chunk (default :func:`default_chunk_rows`).
    ``head_only``: apply the output layer to the packed rows only (default: where
    :func:`head_only_applies`); ``False`` forces the full forward.
    ``vocabulary_major``: how the packed head computes (see :func:`head_only_logits`).
    """
    if head_only is None:
        head_only = head_only_applies(lm.model)
    input_ids, mask = padded_batch(lm, batch)
    prefixes = distinct_prefix_rows(batch, input_ids.shape[1])
    targets = torch.tensor([t for ids in batch for t in ids[1:]], dtype=torch.long)
    row_top_k = torch.tensor([k for ids, k in zip(batch, top_k, strict=True)
                              for _ in range(len(ids) - 1)], dtype=torch.long)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(lm.model.get_output_embeddings())
    with torch.inference_mode():
        logits_of = (head_only_logits if head_only else full_forward_logits)(
            lm, input_ids, mask, prefixes.positions, chunk_rows, vocabulary_major)
        scores = chunked_scores(logits_of, prefixes, targets, row_top_k, chunk_rows)
    return split_per_text(scores, [len(ids) - 1 for ids in batch], top_k)


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
