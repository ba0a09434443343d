"""How submitted jobs are cut into broker messages.

A message is one unit of work for one worker process (prefetch 1, acknowledged when
all its jobs are stored), and the worker batches within a message only. Jobs of the
same queue and model go together, in order of input length (:func:`input_length`),
so that a message holds texts of similar length and the worker's padded batches
waste little: messages of texts in random order gave their batches 27% (64 a
message) and 7% (256) more padded tokens than one plan over all the texts (2,048
paragraphs of the GPU benchmark); sorted, none.

How many jobs a message holds trades batching against spreading work. With W workers
on a queue, N jobs spread over all of them only if a message holds at most N / W;
another user's jobs on the same queue wait at most one message per worker. But each
message costs its worker a fixed time during which a GPU idles: the last batch's rows
stored, the acknowledgement, the next message delivered, its jobs claimed and parsed
(0.13-0.15 s at 256 jobs a message, 0.18-0.20 s at 512, on the H100 machine with one
pool process: GPU timelines of 2026-11-28). So:

- ``chunk_size=N`` (on the client or per call): N jobs a message, the last fewer;
- by default, :data:`DEFAULT_CHUNK_SIZE` (64) jobs a message, except Hugging Face
  score jobs (text or token ids, no logits artifact), whose messages hold at least
  64 and, for short inputs, grow to about :data:`MESSAGE_TOKENS` input tokens, at
  most :data:`MAX_MESSAGE_JOBS`. On an H100 (Llama-2-7B shape, at most 64 texts a
  batch) 2,048 paragraphs of ~44 tokens scored end to end at 0.76x the bare forward
  pass at 256 a message and 0.80x at 512 with one pool process, 0.82x and 0.84x with
  ``--pool threads --concurrency 2``, in one run (an earlier run: 0.58x at 64 a
  message; docs/throughput.md, "On a GPU"). Texts of 512 tokens or more stay at 64,
  generation and OpenAI jobs too (an OpenAI worker runs a message's requests one
  after another on one of its threads).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .broker import default_job_time_limit
from .errors import SpecError
from .specs import GenerateSpec, ScoreSpec

#: Jobs per broker message by default (``Client(chunk_size=...)`` sets a fixed number).
DEFAULT_CHUNK_SIZE = 64
#: Input tokens a default message of Hugging Face score jobs grows to (four CUDA
#: batches' worth): the number of jobs past :data:`DEFAULT_CHUNK_SIZE` depends on it.
MESSAGE_TOKENS = 32_768
#: Most jobs in a default message of Hugging Face score jobs.
MAX_MESSAGE_JOBS = 512
#: A default message's last message with fewer jobs than this joins the one before.
SMALLEST_TAIL = DEFAULT_CHUNK_SIZE // 4
#: Characters per token when a text's tokens are guessed (English under a BPE).
CHARS_PER_TOKEN = 4

AnySpecOrJSON = ScoreSpec | GenerateSpec | Mapping[str, Any]


def chunk_messages(
    rows: Sequence[Mapping[str, Any]], chunk_size: int | None = None
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """``(queue, [{"id", "spec", "time_limit"}, ...])`` per message, from job rows'
    column values: same queue and model, ordered by input length when there is more
    than one message (a single message keeps submission order). ``chunk_size``: jobs
    a message, or None for the default sizes (the module's docstring). A job without
    a time limit of its own gets the default
    (:func:`~api_client.broker.default_job_time_limit`)."""
    if chunk_size is not None and chunk_size < 1:
        raise SpecError(f"chunk_size must be at least 1, got {chunk_size}")
    default_limit = default_job_time_limit()
    groups: dict[tuple[str, str, bool], list[dict[str, Any]]] = {}
    for row in rows:
        grows = chunk_size is None and grows_with_short_inputs(row["spec"])
        groups.setdefault((row["queue"], row["model"], grows), []).append(
            {"id": row["id"], "spec": row["spec"],
             "time_limit": row.get("time_limit") or default_limit})
    size = chunk_size or DEFAULT_CHUNK_SIZE
    for (queue, _model, grows), items in groups.items():
        ordered = sorted(items, key=lambda item: input_length(item["spec"]))
        messages = (by_tokens(ordered) if grows else
                    [ordered[start : start + size] for start in range(0, len(ordered), size)])
        if len(messages) == 1:
            messages = [items]
        for message in messages:
            yield queue, message


def by_tokens(items: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``items`` cut in order: a message ends at :data:`MAX_MESSAGE_JOBS` jobs, or once
    it holds :data:`DEFAULT_CHUNK_SIZE` jobs and :data:`MESSAGE_TOKENS` input tokens.
    A last message of fewer than :data:`SMALLEST_TAIL` jobs joins the one before (the
    two split in halves if together they are more than :data:`MAX_MESSAGE_JOBS`): a
    message costs its worker the same fixed time however few jobs it holds."""
    messages: list[list[dict[str, Any]]] = []
    message: list[dict[str, Any]] = []
    tokens = 0
    for item in items:
        message.append(item)
        tokens += estimated_tokens(item["spec"])
        if len(message) >= MAX_MESSAGE_JOBS or (
                len(message) >= DEFAULT_CHUNK_SIZE and tokens >= MESSAGE_TOKENS):
            messages.append(message)
            message, tokens = [], 0
    if message:
        messages.append(message)
    if len(messages) >= 2 and len(messages[-1]) < SMALLEST_TAIL:
        last = messages.pop(-2) + messages.pop()
        half = len(last) // 2 if len(last) > MAX_MESSAGE_JOBS else len(last)
        messages += [part for part in (last[:half], last[half:]) if part]
    return messages


def _field(spec: AnySpecOrJSON, name: str) -> Any:
    return spec.get(name) if isinstance(spec, Mapping) else getattr(spec, name, None)


def grows_with_short_inputs(spec: AnySpecOrJSON) -> bool:
    """Whether a default message of such jobs grows past :data:`DEFAULT_CHUNK_SIZE`:
    the jobs the Hugging Face worker scores in batches (``HFBackend.run``): score
    jobs of text or token ids with no logits artifact."""
    return (_field(spec, "kind") == "score" and (_field(spec, "backend") or "hf") == "hf"
            and not _field(spec, "return_logits") and _field(spec, "embedding") is None)


def estimated_tokens(spec: AnySpecOrJSON) -> int:
    """A job's input tokens: its token ids, or its text's characters over
    :data:`CHARS_PER_TOKEN` (an input of neither counts as a full share of a default
    message)."""
    kind, length = input_length(spec)
    if kind == 0:
        return length
    if kind == 1:
        return max(1, -(-length // CHARS_PER_TOKEN))
    return -(-MESSAGE_TOKENS // DEFAULT_CHUNK_SIZE)


def input_length(spec: AnySpecOrJSON) -> tuple[int, int]:
    """How long a job's input is, to sort jobs by: ``(0, token ids)`` where the spec
    gives ids, ``(1, characters)`` of its text or prompt, ``(2, 0)`` otherwise
    (embeddings, chat messages). Ids and characters are not compared with each other.
    ``spec``: a spec object, or its JSON dict (jobs read back from SQL)."""
    token_ids = _field(spec, "token_ids")
    if token_ids:
        return 0, len(token_ids)
    text = _field(spec, "text") or _field(spec, "prompt")
    if isinstance(text, str):
        return 1, len(text)
    return 2, 0
