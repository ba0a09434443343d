"""The global rate limiter against a real Redis, from many threads at once."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis as redis_lib

from tests.helpers import max_in_rolling_window
from worker.ratelimit import (
    AdmissionAbandoned,
    GlobalRateLimiter,
    RateLimits,
    RateLimitTooSmall,
)


@pytest.fixture
def redis(redis_url: str):
    connection = redis_lib.Redis.from_url(redis_url)
    yield connection
    connection.close()


def limiter(redis, **limits) -> GlobalRateLimiter:
    return GlobalRateLimiter(redis, RateLimits(name=uuid.uuid4().hex, **limits))


def hammer(limit: GlobalRateLimiter, threads: int, seconds: float, tokens: int = 0
           ) -> list[float]:
    admitted: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run() -> None:
        while time.monotonic() < stop:
            limit.acquire(tokens)
            with lock:
                admitted.append(time.monotonic())

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [t for t in admitted if t < stop]


def test_requests_per_window_hold_in_every_rolling_window(redis) -> None:
    limit = limiter(redis, requests_per_window=5, window_s=0.5, pad_s=0.02)
    admitted = hammer(limit, threads=6, seconds=1.8)
    assert max_in_rolling_window(admitted, 0.5) <= 5
    # 5 at once, then 5 per 0.52 s: at least 3 full windows in 1.8 s
    assert len(admitted) >= 15


def test_tokens_per_window_and_settling(redis) -> None:
    limit = limiter(redis, requests_per_window=0, tokens_per_window=10, window_s=0.5, pad_s=0.0)
    first = limit.acquire(4)
    limit.acquire(4)
    assert limit.try_acquire(4)[0] > 0  # 8 + 4 > 10
    limit.settle(first, 1)  # it used 1 token, not 4: 5 + 4 fits
    assert limit.try_acquire(4)[0] == 0
    with pytest.raises(RateLimitTooSmall, match="more than the whole limit of 10"):
        limit.acquire(11)


def test_pause_stops_everyone_and_never_shortens(redis) -> None:
    limit = limiter(redis, requests_per_window=100, window_s=60)
    other_worker = GlobalRateLimiter(redis, limit.limits)  # same name, another "process"
    limit.pause(0.6)
    limit.pause(0.1)
    wait, _ = other_worker.try_acquire()
    assert 0.4 < wait <= 0.6
    assert 0.4 < other_worker.paused_for() <= 0.6
    start = time.monotonic()
    other_worker.acquire()
    assert time.monotonic() - start >= 0.4


def test_a_waiter_that_stops_waiting_records_no_request(redis) -> None:
    limit = limiter(redis, requests_per_window=1, window_s=60)
    limit.acquire()
    asked: list[float] = []

    def stop_after_first(seconds: float) -> bool:  # as a cancelled job's control.wait
        asked.append(seconds)
        return True

    start = time.monotonic()
    with pytest.raises(AdmissionAbandoned):
        limit.acquire(sleep=stop_after_first)
    assert time.monotonic() - start < 1.0 and len(asked) == 1 and asked[0] > 1.0
    assert redis.zcard(limit.requests_key) == 1  # only the first request
