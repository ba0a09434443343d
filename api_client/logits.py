"""Full logits (``return_logits=True``): their shape and the size cap.

Score probes store ``[positions, vocab]``: row *i* holds the logits at input
position *i* (the prediction for position *i + 1*), all positions or the last
``logits_last_n``. Generate probes store ``[sequences, steps, vocab]``: the raw
(unprocessed) logits of every generation step, or the last ``logits_last_n``
steps; steps after a sequence's EOS are the padding HF produced.

The cap (``LOGPROBE_MAX_LOGITS_BYTES``, default 1 GiB) is checked twice: at
submit, when the model is a local directory with a ``config.json`` (its
``vocab_size``) and the rows are known without tokenizing (token ids, an uploaded
embedding, generation steps), and exactly in the worker before the model runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from .embedding_specs import ArtifactEmbedding
from .errors import SpecError
from .specs import GenerateSpec, ScoreSpec

ITEMSIZE = {"float32": 4, "float16": 2}
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


def logits_bytes(rows: int, vocab: int, dtype: str) -> int:
    return rows * vocab * ITEMSIZE[dtype]


def too_big_message(spec: ScoreSpec | GenerateSpec, rows: int, vocab: int, cap: int,
                    exact: bool) -> str:
    size = logits_bytes(rows, vocab, spec.logits_dtype)
    what = "" if exact else "up to "
    return (
        f"return_logits: {what}{rows} rows x {vocab} vocab in {spec.logits_dtype} is "
        f"{what}{size:,} bytes, above the {cap:,}-byte cap (LOGPROBE_MAX_LOGITS_BYTES); "
        "set logits_last_n, logits_dtype='float16', or raise the cap"
    )


def _local_config(model: str) -> dict | None:
    path = Path(model).expanduser() / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def known_rows(spec: ScoreSpec | GenerateSpec, context: int | None) -> int | None:
    """The logits rows ``spec`` asks for where they are known before tokenizing (token
    ids, an uploaded embedding, generation steps, ``logits_last_n``); None for a text,
    whose token count only the model's tokenizer knows."""
    if isinstance(spec, GenerateSpec):
        # As the worker counts them: every step may run (EOS can end it sooner).
        steps = min(spec.max_new_tokens, spec.logits_last_n or spec.max_new_tokens)
        return steps * spec.num_return_sequences
    rows: int | None = None
    if spec.token_ids is not None and spec.embedding is None:
        rows = len(spec.token_ids) + int(spec.prepend_bos)
    elif isinstance(spec.embedding, ArtifactEmbedding):
        rows = spec.embedding.shape[0]
    if rows is not None and context is not None:
        rows = min(rows, context)  # a longer input fails in the worker anyway
    if rows is not None and spec.logits_last_n is not None:
        rows = min(rows, spec.logits_last_n)
    return rows


def check_logits_size_at_submit(spec: ScoreSpec | GenerateSpec, cap: int) -> None:
    """Refuse a ``return_logits`` spec whose logits would exceed ``cap``.

    Only possible for a local model directory (its config.json gives the vocab
    size) and rows known without its tokenizer (:func:`known_rows`); the worker
    checks every spec exactly before the model runs.
    """
    if not spec.return_logits:
        return
    config = _local_config(spec.model)
    if not config or not isinstance(config.get("vocab_size"), int):
        return
    context = next((config[k] for k in _CONTEXT_KEYS if isinstance(config.get(k), int)), None)
    rows = known_rows(spec, context)
    if rows is not None and logits_bytes(rows, config["vocab_size"], spec.logits_dtype) > cap:
        exact = isinstance(spec, ScoreSpec)  # generation: every step that may run
        raise SpecError(too_big_message(spec, rows, config["vocab_size"], cap, exact=exact))
