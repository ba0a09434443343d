"""The OpenAI backend: legacy completions (score and generate) and chat completions.

Payloads are built by ``openai_payload``, responses parsed by ``openai_parse``
(pure functions); this module makes the calls: through the official ``openai``
client (its own retries off, ``max_retries=0``), under the global rate limit of
``worker.ratelimit``, retrying per ``openai_retry``.

Environment of the worker (never of a job): ``OPENAI_API_KEY`` (required),
``LOGPROBE_OPENAI_BASE_URL`` (or ``OPENAI_BASE_URL``; default the OpenAI API),
``LOGPROBE_OPENAI_CONCURRENCY`` (requests of one message in flight, default 8),
``LOGPROBE_OPENAI_TIMEOUT_S`` + ``LOGPROBE_OPENAI_TIMEOUT_PER_TOKEN_S`` x max_tokens x n
(per call, default 60 + 0.1 s per token), ``LOGPROBE_OPENAI_TIMEOUT_RETRIES`` (times a
timed-out request is sent again, with twice the timeout; default 1),
``LOGPROBE_OPENAI_MAX_ATTEMPTS`` (default 6), ``LOGPROBE_OPENAI_BACKOFF_S`` /
``LOGPROBE_OPENAI_BACKOFF_MAX_S`` (default 1 / 60), ``LOGPROBE_OPENAI_SCORE_MAX_TOKENS``
(0 or 1, default 0), and the rate-limit variables of ``worker.ratelimit``.

Each job checks its control (``worker.control``: cancel flag, time limit) before its
request, and while it waits for the rate limit or a retry: a job stopped there is
never sent (nor billed) and is stored without rows. Before its first wait for the
rate limit, and again right before each request, it also reads its cancel flag in
Redis (one ``EXISTS``): the control learns of a flag only at the monitor's next poll,
and a job cancelled just before its turn must not be sent meanwhile. A request
already sent is waited for, up to the job's time left, and a cancelled job's answer
is stored.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import openai

from api_client.broker import redis_client
from api_client.errors import BackendError, ConfigError, ProbeInputError
from api_client.settings import Settings, mask_url
from api_client.specs import GenerateSpec

from ..control import JobControl, JobStopped, control_for
from ..ratelimit import AdmissionAbandoned, GlobalRateLimiter, RateLimits
from .base import (
    AnySpec,
    Backend,
    OutputsReady,
    ProbeOutput,
    attach_provenance,
    failure_provenance,
)
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
    #: Extra call timeout per requested token (max_tokens x n): a non-streamed
    #: generation sends nothing until it is complete.
    timeout_per_token_s: float = 0.1
    #: How many times a request that timed out is sent again (each with twice the
    #: timeout). The server may have generated, and billed, the answer we gave up on.
    timeout_retries: int = 1
    #: Requests of one message (one ``run``) in flight at once.
    concurrency: int = 8

    def __repr__(self) -> str:  # never print the key
        base_url = self.base_url and mask_url(self.base_url)
        return (f"OpenAISettings(base_url={base_url!r}, timeout_s={self.timeout_s}, "
                f"concurrency={self.concurrency})")

    def call_timeout(self, request: OpenAIRequest) -> float:
        """The first call's timeout: the base plus the time the asked tokens may take."""
        tokens = int(request.params.get("max_tokens") or 0) * int(request.params.get("n") or 1)
        return self.timeout_s + self.timeout_per_token_s * tokens

    @classmethod
    def from_env(cls) -> OpenAISettings:
        key = os.environ.get("OPENAI_API_KEY", "").strip()
        if not key:
            raise ConfigError("OPENAI_API_KEY is not set in the OpenAI worker's environment; "
                              "set it there (never in a job spec)")
        score_max_tokens = int(os.environ.get("LOGPROBE_OPENAI_SCORE_MAX_TOKENS", "0"))
        if score_max_tokens not in (0, 1):
            raise ConfigError("LOGPROBE_OPENAI_SCORE_MAX_TOKENS must be 0 or 1")
        concurrency = int(os.environ.get("LOGPROBE_OPENAI_CONCURRENCY", "8"))
        if concurrency < 1:
            raise ConfigError("LOGPROBE_OPENAI_CONCURRENCY must be >= 1")
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
            timeout_per_token_s=float(os.environ.get("LOGPROBE_OPENAI_TIMEOUT_PER_TOKEN_S",
                                                     "0.1")),
            timeout_retries=max(0, int(os.environ.get("LOGPROBE_OPENAI_TIMEOUT_RETRIES", "1"))),
            concurrency=concurrency,
        )


class _Unwatched:
    """The control of a job run outside a worker's runner (a notebook, a unit test):
    never cancelled, no time limit."""

    def begin(self, total: int, unit: str = "tokens") -> None:
        pass

    def advance(self, done: int) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def stop_before_sending(self) -> bool:
        return False

    def remaining(self) -> float:
        return math.inf

    def wait(self, seconds: float) -> bool:
        time.sleep(seconds)
        return False


_UNWATCHED = _Unwatched()


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
        self.settings = settings or OpenAISettings.from_env()
        # The openai client's HTTP library (httpx; httpx2 from openai 3) logs each
        # request's URL at INFO ("HTTP Request: POST https://..."): a line per request,
        # and the base URL's credentials (a proxy's) in the worker's log.
        for http_library in ("httpx", "httpx2"):
            logging.getLogger(http_library).setLevel(logging.WARNING)
        self.client = openai.OpenAI(api_key=self.settings.api_key,
                                    base_url=self.settings.base_url,
                                    timeout=self.settings.timeout_s, max_retries=0)
        url = redis_url or Settings.from_env().resolved_redis_url()
        self.redis = redis_client(url)
        self.limiter = GlobalRateLimiter(self.redis, limits or RateLimits.from_env())

    def run(self, specs: Sequence[AnySpec], on_ready: OutputsReady | None = None
            ) -> list[ProbeOutput | Exception]:
        """The jobs' requests, up to ``concurrency`` in flight (each still admitted by
        the global rate limit); outputs in the order of ``specs``, all at the end
        (``on_ready`` is not called: the requests wait on the network, not on the
        worker's CPU)."""
        # The controls are found in this thread's context, not in the pool's threads.
        controls = [control_for(spec) for spec in specs]
        workers = min(self.settings.concurrency, len(specs))
        if workers <= 1:
            return [self._run_guarded(spec, c) for spec, c in zip(specs, controls, strict=True)]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai") as pool:
            return list(pool.map(self._run_guarded, specs, controls))

    def _run_guarded(self, spec: AnySpec,
                     control: JobControl | None) -> ProbeOutput | Exception:
        """One job's output, or the exception it ended with (one bad job must not sink
        the others; never the key in it)."""
        try:
            return self.run_one(spec, control)
        except JobStopped as stopped:
            log.info("job stopped (%s) %s", control.stop_reason if control else "?",
                     stopped.when)
            return stopped
        except Exception as exc:
            message = scrub(str(exc), self.settings.api_key)
            log.info("job failed: %s: %s", type(exc).__name__, message)
            failed = type(exc)(message) if isinstance(exc, ProbeInputError | BackendError) \
                else BackendError(scrub(describe(exc), self.settings.api_key))
            attach_provenance(failed, **failure_provenance(exc))  # what it sent, if it did
            return failed

    def run_one(self, spec: AnySpec, control: JobControl | None = None) -> ProbeOutput:
        """Send ``spec``'s request and parse the answer. Raises :class:`JobStopped` if
        ``control`` says stop before the request is sent or while it waits to be."""
        gate = control or _UNWATCHED
        gate.begin(1, "requests")  # its time limit counts from here, not from the claim
        if gate.stop_before_sending():  # before it waits its turn at the rate limit
            raise JobStopped("before its OpenAI request was sent")
        seed = None
        if isinstance(spec, GenerateSpec) and spec.do_sample:
            seed = spec.seed if spec.seed is not None else random.randint(0, PICKED_SEED_MAX)
        request = build_request(spec, seed=seed, score_max_tokens=self.settings.score_max_tokens)
        response = self.call(request, gate)
        gate.advance(1)
        output = parse_response(response, spec, request, offline_encoding(spec.model), seed)
        output.provenance["openai_version"] = openai.__version__
        return output

    def _send(self, request: OpenAIRequest, timeout: float) -> dict[str, Any]:
        if request.endpoint == "chat":
            result = self.client.chat.completions.create(**request.params, timeout=timeout)
        else:
            result = self.client.completions.create(**request.params, timeout=timeout)
        return result.model_dump(mode="json")

    def call(self, request: OpenAIRequest,
             control: JobControl | _Unwatched = _UNWATCHED) -> dict[str, Any]:
        """Send one request under the global limit; retry what may succeed later.

        ``control`` is asked before every call and during every wait; a job stopped
        there raises :class:`JobStopped`. A call's timeout grows with the tokens asked
        for and never outlasts the job's time left. A timed-out call is sent again at
        most ``timeout_retries`` times, with twice the timeout: its generation may
        have been billed although its answer never arrived.

        Every attempt is charged its token estimate in the shared window. An attempt
        answered with an HTTP error (429, 4xx, 5xx) generated nothing, so its charge is
        released at once: otherwise its retry would wait for a phantom charge to leave
        the window rather than for ``retry-after``. A timeout or a dropped connection
        keeps its charge, as the server may have generated the answer."""
        sent = False  # whether a send was attempted (the request may have gone out)

        def send(timeout: float) -> dict[str, Any]:
            nonlocal sent
            sent = True
            return self._send(request, timeout)

        try:
            return self._with_retries(request, control, send)
        except BaseException as exc:
            if sent:  # a failed or stopped job still records what it sent, or tried to
                attach_provenance(exc, request_params=request.stored_params(),
                                  seed=request.params.get("seed"))
            raise

    def _with_retries(self, request: OpenAIRequest, control: JobControl | _Unwatched,
                      send: Callable[[float], dict[str, Any]]) -> dict[str, Any]:
        """:meth:`call`'s attempts: ``send(timeout)`` sends ``request`` once."""
        policy = self.settings.retry
        timeout = self.settings.call_timeout(request)
        timeouts: list[float] = []
        last: Exception | None = None
        for attempt in range(1, policy.max_attempts + 1):
            try:
                ticket = self.limiter.acquire(request.estimated_tokens, sleep=control.wait)
            except AdmissionAbandoned:
                raise JobStopped("while waiting for the shared OpenAI rate limit") from None
            if control.stop_before_sending():
                self.limiter.release_tokens(ticket)  # admitted, never sent: no tokens
                raise JobStopped("before its OpenAI request was sent" if attempt == 1 else
                                 f"before its OpenAI request was sent again after "
                                 f"{self._describe(last)}")
            left = control.remaining()
            try:
                response = send(max(0.001, min(timeout, left)))
            except openai.APITimeoutError as exc:  # before APIConnectionError: it is one
                last = exc
                if left <= timeout:  # the job's time ran out, not the call's
                    control.wait(control.remaining() + 0.01)
                    if control.should_stop():
                        raise JobStopped("while its OpenAI request was unanswered") from None
                timeouts.append(timeout)
                if control.should_stop():  # cancelled while the request was unanswered
                    raise JobStopped("while its OpenAI request was unanswered") from None
                if len(timeouts) > self.settings.timeout_retries:
                    raise BackendError(self._timed_out(timeouts)) from None
                timeout *= 2
                wait = policy.backoff(attempt)
                log.warning("OpenAI request timed out after %.1fs (attempt %d/%d); sending "
                            "it once more with a %.1fs timeout in %.2fs", timeouts[-1], attempt,
                            policy.max_attempts, timeout, wait)
            except openai.APIStatusError as exc:
                last = exc
                # An error answer generated nothing: its tokens leave the shared window
                # (the request stays counted, as OpenAI counts failed requests).
                self.limiter.release_tokens(ticket)
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
            except openai.APIConnectionError as exc:
                last = exc
                wait = policy.backoff(attempt)
                log.warning("OpenAI %s (attempt %d/%d); retrying in %.2fs",
                            self._describe(exc), attempt, policy.max_attempts, wait)
            else:
                usage = response.get("usage") or {}
                self.limiter.settle(ticket, usage.get("total_tokens"))
                return response
            if attempt < policy.max_attempts and control.wait(wait):
                raise JobStopped(f"while waiting to retry its OpenAI request after "
                                 f"{self._describe(last)}")
        assert last is not None
        raise BackendError(f"OpenAI request failed after {policy.max_attempts} attempts; "
                           f"last error: {self._describe(last)}")

    @staticmethod
    def _timed_out(timeouts: list[float]) -> str:
        times = "time" if len(timeouts) == 1 else "times"
        waited = ", then ".join(f"{t:g} s" for t in timeouts)
        return (f"OpenAI request timed out {len(timeouts)} {times} (no answer within "
                f"{waited}); not resent again, as a timed-out generation may still be "
                "billed. Raise LOGPROBE_OPENAI_TIMEOUT_S or LOGPROBE_OPENAI_TIMEOUT_PER_TOKEN_S "
                "on the worker, or lower max_new_tokens")

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
