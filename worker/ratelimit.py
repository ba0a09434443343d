"""One rate limit for every OpenAI worker process on every host, kept in Redis.

Celery's ``rate_limit`` counts per worker instance; OpenAI counts per
organization. This limiter keeps a sliding-window log in Redis that all workers
share, updated atomically by Lua scripts on the Redis clock (``TIME``), so hosts
with skewed clocks agree:

- **requests per window**: a request is admitted only if fewer than ``rpm``
  requests were admitted in the last ``window_s + pad_s`` seconds, so no rolling
  window of ``window_s`` ever holds more than ``rpm`` (``pad_s`` absorbs the
  delay between admission and arrival at the server);
- **tokens per window**: each request is charged an estimate before it is sent
  (prompt + ``max_tokens``, as OpenAI counts), corrected to the usage the
  response reports (:meth:`GlobalRateLimiter.settle`), or to 0 when the answer
  was an HTTP error (:meth:`GlobalRateLimiter.release_tokens`);
- **pause**: after a 429 any worker sets a shared "pause until" time from
  ``retry-after`` / ``x-ratelimit-reset-*``; every worker waits it out.

Environment (read by :meth:`RateLimits.from_env`):
``LOGPROBE_OPENAI_RPM`` (requests per window, 0 = no limit, default 500),
``LOGPROBE_OPENAI_TPM`` (tokens per window, 0 = no limit, default 0),
``LOGPROBE_OPENAI_WINDOW_S`` (window length, default 60 = "per minute"; tests
use a few seconds), ``LOGPROBE_OPENAI_WINDOW_PAD_S`` (default 0.25),
``LOGPROBE_OPENAI_LIMIT_NAME`` (which shared limit; one per API key or
organization, default ``default``).
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from api_client.constants import REDIS_PREFIX
from api_client.errors import ConfigError

# KEYS: requests zset, tokens zset, pause key.
# ARGV: window (s), rpm, tpm, cost, member.
# Returns "0" when admitted (and recorded), else the seconds to wait (as a string:
# Lua numbers become integers on the way out).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local pause = tonumber(redis.call('GET', KEYS[3]) or '0')
if pause > now then return tostring(pause - now) end
local window = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local wait = 0
if rpm > 0 then
  local n = redis.call('ZCARD', KEYS[1])
  if n >= rpm then
    local first = redis.call('ZRANGE', KEYS[1], n - rpm, n - rpm, 'WITHSCORES')
    wait = math.max(wait, tonumber(first[2]) + window - now)
  end
end
if tpm > 0 then
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local total = 0
  for i = 1, #entries, 2 do
    total = total + tonumber(string.match(entries[i], ':(%d+)$'))
  end
  if total + cost > tpm then
    local need = total + cost - tpm
    local freed = 0
    for i = 1, #entries, 2 do
      freed = freed + tonumber(string.match(entries[i], ':(%d+)$'))
      if freed >= need then
        wait = math.max(wait, tonumber(entries[i + 1]) + window - now)
        break
      end
    end
  end
end
if wait > 0 then return tostring(wait) end
local ttl = math.ceil(window * 1000) + 1000
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
if tpm > 0 then
  redis.call('ZADD', KEYS[2], now, ARGV[5] .. ':' .. ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return '0'
"""

# KEYS: tokens zset. ARGV: old member, new member. Keeps the admission time.
_SETTLE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], score, ARGV[2])
return 1
"""

# KEYS: pause key. ARGV: seconds. Moves "pause until" later, never earlier.
_PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local until_ = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ > current then
  redis.call('SET', KEYS[1], string.format('%.6f', until_), 'PX',
             math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
  return tostring(until_)
end
return tostring(current)
"""


class AdmissionAbandoned(Exception):
    """The caller of :meth:`GlobalRateLimiter.acquire` stopped waiting (its job was
    cancelled or ran out of time); no request was recorded."""


class RateLimitTooSmall(ConfigError):
    """One request costs more tokens than the whole tokens-per-window limit."""


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise ConfigError(f"{name} must be >= 0 (got {raw})")
    return value


@dataclass(frozen=True)
class RateLimits:
    """The shared limits; 0 disables a limit."""

    requests_per_window: int = 500
    tokens_per_window: int = 0
    window_s: float = 60.0
    pad_s: float = 0.25
    name: str = "default"

    @classmethod
    def from_env(cls) -> RateLimits:
        window = _env_number("LOGPROBE_OPENAI_WINDOW_S", 60.0)
        if window <= 0:
            raise ConfigError("LOGPROBE_OPENAI_WINDOW_S must be > 0")
        return cls(
            requests_per_window=int(_env_number("LOGPROBE_OPENAI_RPM", 500)),
            tokens_per_window=int(_env_number("LOGPROBE_OPENAI_TPM", 0)),
            window_s=window,
            pad_s=_env_number("LOGPROBE_OPENAI_WINDOW_PAD_S", 0.25),
            name=os.environ.get("LOGPROBE_OPENAI_LIMIT_NAME", "default") or "default",
        )


@dataclass(frozen=True)
class Ticket:
    """An admitted request; ``member`` identifies its token charge for :meth:`settle`."""

    member: str
    tokens: int
    waited_s: float


class GlobalRateLimiter:
    """Admit requests under limits shared by all processes using the same Redis."""

    def __init__(self, redis: Any, limits: RateLimits) -> None:
        self.redis = redis
        self.limits = limits
        # {name} is a Redis Cluster hash tag: the script's keys share one slot.
        base = f"{REDIS_PREFIX}:openai:ratelimit:{{{limits.name}}}"
        self.requests_key = f"{base}:requests"
        self.tokens_key = f"{base}:tokens"
        self.pause_key = f"{base}:pause_until"
        self._acquire = redis.register_script(_ACQUIRE)
        self._settle = redis.register_script(_SETTLE)
        self._pause = redis.register_script(_PAUSE)

    def try_acquire(self, tokens: int = 0) -> tuple[float, str]:
        """One atomic attempt: (0, member) when admitted, else (seconds to wait, "")."""
        member = uuid.uuid4().hex
        limits = self.limits
        wait = float(self._acquire(
            keys=[self.requests_key, self.tokens_key, self.pause_key],
            args=[limits.window_s + limits.pad_s, limits.requests_per_window,
                  limits.tokens_per_window, int(tokens), member],
        ))
        return (0.0, member) if wait <= 0 else (wait, "")

    def acquire(self, tokens: int = 0, *, timeout: float | None = None,
                sleep: Callable[[float], bool] | None = None) -> Ticket:
        """Block until a request costing ``tokens`` may be sent; record it.

        Safe from many threads at once (each attempt is one atomic script; the Redis
        client is thread-safe). Waits go through ``sleep(seconds)`` when given (a
        job's :meth:`~worker.control.JobControl.wait`): when it returns True the
        caller no longer wants the slot and :class:`AdmissionAbandoned` is raised,
        with nothing recorded."""
        if 0 < self.limits.tokens_per_window < tokens:
            raise RateLimitTooSmall(
                f"this request needs about {tokens} tokens, more than the whole limit of "
                f"{self.limits.tokens_per_window} per {self.limits.window_s:g}s "
                "(LOGPROBE_OPENAI_TPM); lower max_new_tokens or raise the limit"
            )
        start = time.monotonic()
        while True:
            wait, member = self.try_acquire(tokens)
            if not wait:
                return Ticket(member, int(tokens), time.monotonic() - start)
            if timeout is not None and time.monotonic() - start + wait > timeout:
                raise TimeoutError(f"rate limit: no slot within {timeout:g}s")
            # A little jitter so waiting workers do not all wake in the same instant.
            pause = min(wait, 5.0) + random.uniform(0.0, 0.01)
            if sleep is None:
                time.sleep(pause)
            elif sleep(pause):
                raise AdmissionAbandoned("the caller stopped waiting for the rate limit")

    def settle(self, ticket: Ticket, actual_tokens: int | None) -> None:
        """Replace a request's estimated token charge by what it actually used."""
        if self.limits.tokens_per_window <= 0 or actual_tokens is None:
            return
        self._settle(keys=[self.tokens_key],
                     args=[f"{ticket.member}:{ticket.tokens}",
                           f"{ticket.member}:{int(actual_tokens)}"])

    def release_tokens(self, ticket: Ticket) -> None:
        """Drop a request's token charge (it was answered with an error and generated
        nothing); the request itself stays counted against the requests limit."""
        self.settle(ticket, 0)

    def pause(self, seconds: float) -> float:
        """Make every worker wait ``seconds`` from now (never shortens a longer pause)."""
        return float(self._pause(keys=[self.pause_key], args=[max(0.0, float(seconds))]))

    def paused_for(self) -> float:
        """Seconds left of the shared pause (0 when none)."""
        value = self.redis.get(self.pause_key)
        if value is None:
            return 0.0
        seconds, micros = self.redis.time()
        return max(0.0, float(value) - (seconds + micros / 1_000_000))
