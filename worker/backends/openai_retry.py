"""When and how long to wait before retrying an OpenAI call. Pure functions.

Retried: 429 (rate limited), 408/409, 5xx, connection errors and timeouts, with
exponential backoff and full jitter, capped. A 429 also sets the *shared* pause
(see ``worker.ratelimit``) from ``retry-after-ms`` / ``retry-after`` or, failing
those, the ``x-ratelimit-reset-{requests,tokens}`` headers. Not retried: other
4xx (bad request, unknown model, bad key) and 429 ``insufficient_quota``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts`` calls in all; waits grow as ``base_s * 2**k`` up to ``max_s``."""

    max_attempts: int = 6
    base_s: float = 1.0
    max_s: float = 60.0

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full-jitter backoff before retry number ``attempt`` (1 = the first retry)."""
        ceiling = min(self.max_s, self.base_s * 2 ** (attempt - 1))
        return (rng or random).uniform(ceiling / 2, ceiling)


def parse_duration(value: str) -> float | None:
    """OpenAI's reset durations: ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``, ``"0.5"``."""
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def retry_after_seconds(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """How long the server asked us to wait, from a 429's headers; None if it did not say."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if "retry-after-ms" in lowered:
        try:
            return max(0.0, float(lowered["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    if "retry-after" in lowered:
        raw = lowered["retry-after"].strip()
        try:
            return max(0.0, float(raw))
        except ValueError:
            try:
                when = parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                when = None
            if when is not None:
                if when.tzinfo is None:  # "-0000" (RFC 5322: UTC, source zone unknown)
                    when = when.replace(tzinfo=timezone.utc)
                now = now or datetime.now(timezone.utc)
                return max(0.0, (when - now).total_seconds())
    resets = []
    for kind in ("requests", "tokens"):
        remaining = lowered.get(f"x-ratelimit-remaining-{kind}")
        reset = lowered.get(f"x-ratelimit-reset-{kind}")
        if reset is None or (remaining is not None and remaining.strip() not in ("0", "")):
            continue
        seconds = parse_duration(reset)
        if seconds is not None:
            resets.append(seconds)
    return max(resets) if resets else None
