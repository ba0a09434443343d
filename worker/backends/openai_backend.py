"""The OpenAI backend: legacy completions (score and generate) and chat completions.

Payloads are built by ``openai_payload``, responses parsed by ``openai_parse``
(pure functions); this module makes the calls: through the official ``openai``
client (its own retries off, ``max_retries=0``), under the global rate limit of
``worker.ratelimit``, retrying per ``openai_retry``.

Environment of the worker (never of a job): ``OPENAI_API_KEY`` (required),
``LOGPROBE_OPENAI_BASE_URL`` (or ``OPENAI_BASE_URL``; default the OpenAI API),
``LOGPROBE_OPENAI_TIMEOUT_S`` (per call, default 60), ``LOGPROBE_OPENAI_MAX_ATTEMPTS``
(default 6), ``LOGPROBE_OPENAI_BACKOFF_S`` / ``LOGPROBE_OPENAI_BACKOFF_MAX_S``
(default 1 / 60), ``LOGPROBE_OPENAI_SCORE_MAX_TOKENS`` (0 or 1, default 0), and
the rate-limit variables of ``worker.ratelimit``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import openai

from api_client.errors import BackendError, ConfigError, ProbeInputError
from api_client.settings import Settings
from api_client.specs import GenerateSpec

from ..ratelimit import GlobalRateLimiter, RateLimits
from .base import AnySpec, Backend, ProbeOutput
from .openai_parse import parse_response
from .openai_payload import OpenAIRequest, build_request
from .openai_retry import RETRY_STATUSES, RetryPolicy, retry_after_seconds
from .openai_tokens import offline_encoding

log = logging.getLogger(__name__)

#: Seeds the worker picks for sampled jobs that gave none (OpenAI takes any int;
#: 31 bits suits every OpenAI-compatible server).
PICKED_SEED_MAX = 2**31 - 1


@dataclass(frozen=True)
class OpenAISettings:
    api_key: str
    base_url: str | None
    timeout_s: float
    retry: RetryPolicy
    score_max_tokens: int

    def __repr__(self) -> str:  # never print the key
        return f"OpenAISettings(base_url={self.base_url!r}, timeout_s={self.timeout_s})"

    @classmethod
    def from_env(cls) -> OpenAISettings:
        key = os.environ.get("OPENAI_API_KEY", "").strip()
        if not key:
            raise ConfigError("OPENAI_API_KEY is not set in the OpenAI worker's environment; "
                              "set it there (never in a job spec)")
        score_max_tokens = int(os.environ.get("LOGPROBE_OPENAI_SCORE_MAX_TOKENS", "0"))
        if score_max_tokens not in (0, 1):
            raise ConfigError("LOGPROBE_OPENAI_SCORE_MAX_TOKENS must be 0 or 1")
        return cls(
            api_key=key,
            base_url=os.environ.get("LOGPROBE_OPENAI_BASE_URL")
            or os.environ.get("OPENAI_BASE_URL") or None,
            timeout_s=float(os.environ.get("LOGPROBE_OPENAI_TIMEOUT_S", "60")),
            retry=RetryPolicy(
                max_attempts=max(1, int(os.environ.get("LOGPROBE_OPENAI_MAX_ATTEMPTS", "6"))),
                base_s=float(os.environ.get("LOGPROBE_OPENAI_BACKOFF_S", "1")),
                max_s=float(os.environ.get("LOGPROBE_OPENAI_BACKOFF_MAX_S", "60")),
            ),
            score_max_tokens=score_max_tokens,
        )


#: How OpenAI echoes a key in a 401 message: "sk-abc***************wxyz".
_MASKED_KEY = re.compile(r"\bsk-[A-Za-z0-9_\-]*\*+[A-Za-z0-9_\-]*")


def scrub(text: str, secret: str) -> str:
    """``text`` with the API key, whole or masked, replaced by ``[api key]``."""
    if secret:
        text = text.replace(secret, "[api key]")
    return _MASKED_KEY.sub("[api key]", text)


def _error_fields(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body)
    return error if isinstance(error, dict) else {}


def _error_code(exc: openai.APIStatusError) -> str | None:
    code = getattr(exc, "code", None) or _error_fields(exc).get("code")
    return str(code) if code else None


def describe(exc: BaseException) -> str:
    """One line for the job row: HTTP status, OpenAI error code, message."""
    if isinstance(exc, openai.APIStatusError):
        code = _error_code(exc)
        message = _error_fields(exc).get("message") or getattr(exc, "message", None) or str(exc)
        return f"HTTP {exc.status_code}{f' {code}' if code else ''}: {message}"
    if isinstance(exc, openai.APITimeoutError):
        return "the request timed out"
    if isinstance(exc, openai.APIConnectionError):
        return f"could not connect to the OpenAI API: {exc}"
    return f"{type(exc).__name__}: {exc}"


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, settings: OpenAISettings | None = None,
                 limits: RateLimits | None = None, redis_url: str | None = None) -> None:
        import redis

        self.settings = settings or OpenAISettings.from_env()
        self.client = openai.OpenAI(api_key=self.settings.api_key,
                                    base_url=self.settings.base_url,
                                    timeout=self.settings.timeout_s, max_retries=0)
        url = redis_url or Settings.from_env().resolved_redis_url()
        self.redis = redis.Redis.from_url(url)
        self.limiter = GlobalRateLimiter(self.redis, limits or RateLimits.from_env())

    def run(self, specs: Sequence[AnySpec]) -> list[ProbeOutput | Exception]:
        outputs: list[ProbeOutput | Exception] = []
        for spec in specs:
            try:
                outputs.append(self.run_one(spec))
            except Exception as exc:  # one bad job must not sink the others
                message = scrub(str(exc), self.settings.api_key)
                log.info("job failed: %s: %s", type(exc).__name__, message)
                clean = type(exc)(message) if isinstance(exc, ProbeInputError | BackendError) \
                    else BackendError(scrub(describe(exc), self.settings.api_key))
                outputs.append(clean)
        return outputs

    def run_one(self, spec: AnySpec) -> ProbeOutput:
        seed = None
        if isinstance(spec, GenerateSpec) and spec.do_sample:
            seed = spec.seed if spec.seed is not None else random.randint(0, PICKED_SEED_MAX)
        request = build_request(spec, seed=seed, score_max_tokens=self.settings.score_max_tokens)
        response = self.call(request)
        output = parse_response(response, spec, request, offline_encoding(spec.model), seed)
        output.provenance["openai_version"] = openai.__version__
        return output

    def _send(self, request: OpenAIRequest) -> dict[str, Any]:
        if request.endpoint == "chat":
            result = self.client.chat.completions.create(**request.params)
        else:
            result = self.client.completions.create(**request.params)
        return result.model_dump(mode="json")

    def call(self, request: OpenAIRequest) -> dict[str, Any]:
        """Send one request under the global limit; retry what may succeed later."""
        policy = self.settings.retry
        last: Exception | None = None
        for attempt in range(1, policy.max_attempts + 1):
            ticket = self.limiter.acquire(request.estimated_tokens)
            try:
                response = self._send(request)
            except openai.APIStatusError as exc:
                last = exc
                self._refuse_if_final(exc, request)
                wait = policy.backoff(attempt)
                if exc.status_code == 429:
                    asked = retry_after_seconds(exc.response.headers)
                    pause = asked if asked is not None else wait
                    self.limiter.pause(pause)
                    log.warning("OpenAI 429 (attempt %d/%d): every worker pauses %.2fs",
                                attempt, policy.max_attempts, pause)
                    wait = random.uniform(0.0, min(1.0, policy.base_s))  # + the shared pause
                else:
                    log.warning("OpenAI %s (attempt %d/%d); retrying in %.2fs",
                                self._describe(exc), attempt, policy.max_attempts, wait)
            except (openai.APIConnectionError, openai.APITimeoutError) as exc:
                last = exc
                wait = policy.backoff(attempt)
                log.warning("OpenAI %s (attempt %d/%d); retrying in %.2fs",
                            self._describe(exc), attempt, policy.max_attempts, wait)
            else:
                usage = response.get("usage") or {}
                self.limiter.settle(ticket, usage.get("total_tokens"))
                return response
            if attempt < policy.max_attempts:
                time.sleep(wait)
        assert last is not None
        raise BackendError(f"OpenAI request failed after {policy.max_attempts} attempts; "
                           f"last error: {self._describe(last)}")

    def _describe(self, exc: BaseException) -> str:
        return scrub(describe(exc), self.settings.api_key)

    def _refuse_if_final(self, exc: openai.APIStatusError, request: OpenAIRequest) -> None:
        """Errors that retrying cannot fix become the job's error at once."""
        code = _error_code(exc)
        model = request.params.get("model")
        if exc.status_code == 429 and code == "insufficient_quota":
            raise BackendError(f"OpenAI quota exhausted ({describe(exc)}); check the "
                               "account's billing")
        if exc.status_code in RETRY_STATUSES or exc.status_code >= 500:
            return
        if request.params.get("echo") and (code == "invalid_parameter_combination"
                                           or "echo" in describe(exc).lower()):
            raise ProbeInputError(
                f"model {model} cannot score prompts (echo with logprobs refused: "
                f"{describe(exc)}); use davinci-002 or babbage-002, or the hf backend")
        if exc.status_code == 401:
            raise BackendError("OpenAI rejected the API key (HTTP 401); check OPENAI_API_KEY "
                               "in the OpenAI worker's environment")
        raise ProbeInputError(f"OpenAI refused the request for model {model}: {describe(exc)}")

    def close(self) -> None:
        self.client.close()
        self.redis.close()
