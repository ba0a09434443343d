"""OpenAI responses -> result records. Pure functions over the response JSON.

The input is the response body as a dict (what the server sent, or
``response.model_dump()``), so these functions are tested against recorded
responses without a network. Everything stored is what the server returned:
token strings, logprobs (``None`` where the API gives null, e.g. the first
echoed prompt token), alternatives in the server's order by logprob.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from api_client.errors import BackendError
from api_client.results import Alternative, SequenceResult, TokenLogprob
from api_client.specs import GenerateSpec, ScoreSpec

from .base import ProbeOutput
from .openai_payload import OpenAIRequest
from .openai_tokens import SingleTokenEncoder, token_id


def _alternatives(top: dict[str, float] | None,
                  encoding: SingleTokenEncoder | None) -> tuple[Alternative, ...]:
    """Legacy ``top_logprobs`` entry (token -> logprob), most likely first."""
    if not top:
        return ()
    ranked = sorted(top.items(), key=lambda item: -item[1])  # stable: ties keep server order
    return tuple(Alternative(token_id(encoding, tok), tok, float(lp)) for tok, lp in ranked)


def _choices(response: dict[str, Any]) -> list[dict[str, Any]]:
    choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
    if not choices:
        raise BackendError("the OpenAI response has no choices")
    return choices


def _logprobs(choice: dict[str, Any]) -> dict[str, Any]:
    logprobs = choice.get("logprobs")
    if not logprobs:
        raise BackendError("the OpenAI response has no logprobs although the request asked "
                           "for them; the server or model does not support logprobs")
    return logprobs


def _usage(response: dict[str, Any]) -> dict[str, int | None]:
    usage = response.get("usage") or {}
    return {"prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens")}


def provenance(response: dict[str, Any], request: OpenAIRequest,
               seed: int | None) -> dict[str, Any]:
    """Job-row columns: the model that answered, fingerprint, usage, the exact request."""
    return {
        "model_revision": response.get("model"),
        "system_fingerprint": response.get("system_fingerprint"),
        "request_params": request.stored_params(),
        "seed": seed,
        "batch_size": 1,
        **_usage(response),
    }


def completion_tokens(logprobs: dict[str, Any], *, start: int, stop: int | None,
                      position0: int, generated: bool, encoding: SingleTokenEncoder | None,
                      ids: Sequence[int] | None = None) -> tuple[TokenLogprob, ...]:
    """Tokens ``start:stop`` of a legacy ``logprobs`` object, numbered from ``position0``."""
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or [None] * len(tokens)
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    stop = len(tokens) if stop is None else stop
    out = []
    for k, i in enumerate(range(start, stop)):
        known_id = ids[k] if ids is not None and k < len(ids) else token_id(encoding, tokens[i])
        out.append(TokenLogprob(
            position=position0 + k,
            token_id=known_id,
            token=tokens[i],
            logprob=None if values[i] is None else float(values[i]),
            generated=generated,
            top_logprobs=_alternatives(tops[i], encoding),
        ))
    return tuple(out)


def _num_prompt_tokens(spec: ScoreSpec, logprobs: dict[str, Any], response: dict[str, Any],
                       request: OpenAIRequest) -> int:
    """How many echoed tokens are the prompt's: as many as the token ids sent; else,
    with ``max_tokens`` 0 (or absent), all of them, as nothing was generated, whatever
    ``text_offset`` says (a server may count offsets in bytes, not characters). With
    ``max_tokens=1`` a generated token follows them, told by ``text_offset``
    (optional in the API's types), else ``usage.prompt_tokens``, else all tokens but
    ``usage.completion_tokens``."""
    tokens = logprobs.get("tokens") or []
    if spec.token_ids is not None:
        return min(len(spec.token_ids), len(tokens))
    if not request.params.get("max_tokens"):
        return len(tokens)  # nothing was generated
    offsets = logprobs.get("text_offset")
    if offsets:
        return sum(1 for offset in offsets if offset < len(spec.text or ""))
    usage = response.get("usage") or {}
    if usage.get("prompt_tokens") is not None:
        return min(int(usage["prompt_tokens"]), len(tokens))
    if usage.get("completion_tokens") is not None:
        return max(0, len(tokens) - int(usage["completion_tokens"]))
    raise BackendError("the OpenAI score response has neither text_offset nor usage, so "
                       "the prompt's tokens cannot be told from the generated one; set "
                       "LOGPROBE_OPENAI_SCORE_MAX_TOKENS=0 if the server accepts it")


def parse_score(response: dict[str, Any], spec: ScoreSpec, request: OpenAIRequest,
                encoding: SingleTokenEncoder | None) -> ProbeOutput:
    """An ``echo=True`` completion: the prompt tokens' logprobs and their mean loss."""
    choice = _choices(response)[0]
    logprobs = _logprobs(choice)
    n = _num_prompt_tokens(spec, logprobs, response, request)
    tokens = completion_tokens(logprobs, start=0, stop=n, position0=0, generated=False,
                               encoding=encoding, ids=spec.token_ids)
    scored = [t.logprob for t in tokens if t.logprob is not None]
    total = math.fsum(scored) if scored else None
    text = spec.text if spec.text is not None else "".join(t.token for t in tokens)
    sequence = SequenceResult(0, text, tokens, (), choice.get("finish_reason"))
    return ProbeOutput(
        sequences=[sequence],
        loss=-total / len(scored) if total is not None else None,
        sum_logprob=total,
        num_scored_tokens=len(scored),
        provenance=provenance(response, request, None),
    )


def _chat_tokens(content: list[dict[str, Any]], position0: int,
                 encoding: SingleTokenEncoder | None) -> tuple[TokenLogprob, ...]:
    out = []
    for k, item in enumerate(content):
        alternatives = tuple(
            Alternative(token_id(encoding, alt["token"], alt.get("bytes")), alt["token"],
                        float(alt["logprob"]))
            for alt in item.get("top_logprobs") or []
        )
        out.append(TokenLogprob(
            position=position0 + k,
            token_id=token_id(encoding, item["token"], item.get("bytes")),
            token=item["token"],
            logprob=float(item["logprob"]),
            generated=True,
            top_logprobs=alternatives,
        ))
    return tuple(out)


def parse_generate(response: dict[str, Any], spec: GenerateSpec, request: OpenAIRequest,
                   encoding: SingleTokenEncoder | None, seed: int | None) -> ProbeOutput:
    """Each choice is one sequence of generated tokens.

    Positions continue after the prompt (``usage.prompt_tokens``, as HF numbers
    them); the prompt's own tokens are not returned by the API and get no rows.
    """
    position0 = _usage(response)["prompt_tokens"] or 0
    sequences = []
    for index, choice in enumerate(_choices(response)):
        logprobs = _logprobs(choice)
        if request.endpoint == "chat":
            text = (choice.get("message") or {}).get("content")
            tokens = _chat_tokens(logprobs.get("content") or [], position0, encoding)
        else:
            text = choice.get("text")
            tokens = completion_tokens(logprobs, start=0, stop=None, position0=position0,
                                       generated=True, encoding=encoding)
        sequences.append(SequenceResult(index, text, tokens, (), choice.get("finish_reason")))
    return ProbeOutput(sequences=sequences, provenance=provenance(response, request, seed))


def parse_response(response: dict[str, Any], spec: ScoreSpec | GenerateSpec,
                   request: OpenAIRequest, encoding: SingleTokenEncoder | None,
                   seed: int | None = None) -> ProbeOutput:
    if isinstance(spec, ScoreSpec):
        return parse_score(response, spec, request, encoding)
    return parse_generate(response, spec, request, encoding, seed)
