"""Probe spec -> OpenAI request parameters. Pure functions, no network.

The parameters built here are sent verbatim as keyword arguments of
``client.completions.create`` / ``client.chat.completions.create`` and stored
verbatim in ``jobs.request_params`` (with ``"endpoint"`` added), so a stored job
says exactly what was asked. The API key is never part of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from api_client.specs import GenerateSpec, ScoreSpec

Endpoint = Literal["completions", "chat"]

#: ``max_tokens`` of a score request: echo=True returns the prompt's logprobs and
#: nothing is generated (``LOGPROBE_OPENAI_SCORE_MAX_TOKENS=1`` for servers that
#: refuse 0; the extra generated token is then dropped by the parser).
DEFAULT_SCORE_MAX_TOKENS = 0


@dataclass(frozen=True)
class OpenAIRequest:
    """One API call: which endpoint, its exact parameters, and its token cost estimate."""

    endpoint: Endpoint
    params: dict[str, Any]
    #: Tokens charged against the tokens-per-minute limit before the call (prompt
    #: estimate + max_tokens per choice, the way OpenAI itself counts); settled to
    #: ``usage.total_tokens`` after it.
    estimated_tokens: int

    def stored_params(self) -> dict[str, Any]:
        """What goes into ``jobs.request_params``."""
        return {"endpoint": self.endpoint, **self.params}


def estimate_prompt_tokens(prompt: str | list[int]) -> int:
    """A cheap upper-side estimate of prompt tokens (~4 bytes per token)."""
    if isinstance(prompt, list):
        return len(prompt)
    return max(1, math.ceil(len(prompt.encode("utf-8")) / 4))


def score_request(spec: ScoreSpec, *, max_tokens: int = DEFAULT_SCORE_MAX_TOKENS
                  ) -> OpenAIRequest:
    """Legacy completions with ``echo=True``: the prompt's tokens and their logprobs."""
    prompt: str | list[int] = spec.text if spec.text is not None else list(spec.token_ids or [])
    params: dict[str, Any] = {
        "model": spec.model,
        "prompt": prompt,
        "echo": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": spec.top_logprobs,
    }
    return OpenAIRequest("completions", params, estimate_prompt_tokens(prompt) + max_tokens)


def sampling_params(spec: GenerateSpec, seed: int | None) -> dict[str, Any]:
    """``do_sample=False`` is temperature 0 (greedy); sampling sends the seed it runs with."""
    if not spec.do_sample:
        return {"temperature": 0}
    params: dict[str, Any] = {
        "temperature": spec.temperature if spec.temperature is not None else 1.0,
    }
    if spec.top_p is not None:
        params["top_p"] = spec.top_p
    if seed is not None:
        params["seed"] = seed
    return params


def generate_request(spec: GenerateSpec, *, seed: int | None) -> OpenAIRequest:
    """Legacy completions (default) or chat completions, with per-token logprobs."""
    api: Endpoint = spec.openai_api or "completions"
    params: dict[str, Any] = {"model": spec.model}
    if api == "chat":
        params["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        params["prompt"] = spec.prompt
    params["max_tokens"] = spec.max_new_tokens
    params.update(sampling_params(spec, seed))
    if spec.num_return_sequences > 1:
        params["n"] = spec.num_return_sequences
    if api == "chat":
        params["logprobs"] = True
        params["top_logprobs"] = spec.top_logprobs
    else:
        params["logprobs"] = spec.top_logprobs
    estimate = estimate_prompt_tokens(spec.prompt) + spec.max_new_tokens * spec.num_return_sequences
    return OpenAIRequest(api, params, estimate)


def build_request(spec: ScoreSpec | GenerateSpec, *, seed: int | None = None,
                  score_max_tokens: int = DEFAULT_SCORE_MAX_TOKENS) -> OpenAIRequest:
    if isinstance(spec, ScoreSpec):
        return score_request(spec, max_tokens=score_max_tokens)
    return generate_request(spec, seed=seed)
