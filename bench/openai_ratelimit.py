"""Requests/s achieved under the global OpenAI rate limit, with 2 and 4 workers.

Starts the fake OpenAI server of ``tests/openai_server.py`` (with a per-request
latency), real ``logprobe worker --backend openai`` processes sharing one limit
through Redis, submits more jobs than the limit allows in the measured windows,
and reports what arrived at the server:

- ``first k windows/s``: requests that arrived in the first ``--windows``
  windows after the first request, divided by their length (the limit allows a
  burst of R at once, so this reaches the limit);
- ``sustained/s``: ``k * R / (t[k*R] - t[0])`` where ``t[i]`` is the i-th arrival:
  the long-run rate once every window is full (ideal: ``R / (W + pad)`` with the
  pad of ``LOGPROBE_OPENAI_WINDOW_PAD_S``, 0.25 s);
- ``ratio``: sustained / configured;
- ``max/window``: the most requests in any rolling window (must be <= the limit);
- ``unlimited/s``: the same workers with no limit, to show the limit is what binds.

    python bench/openai_ratelimit.py [--limit 40 --window 5 --windows 3]
        [--redis-url redis://127.0.0.1:6379/1] [--database-url postgresql://...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api_client import Client
from api_client.database import upgrade_schema
from tests.helpers import WorkerProcess
from tests.openai_server import FakeOpenAI


def max_in_rolling_window(times: list[float], window: float) -> int:
    times, best, start = sorted(times), 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


def run(workers: int, jobs: int, *, limit: int, window: float, args: argparse.Namespace,
        database_url: str, log_dir: Path) -> list[float]:
    """Arrival times at the server of ``jobs`` generate requests through ``workers``."""
    with FakeOpenAI(latency_s=args.latency) as server:
        queue = f"logprobe.openai.bench-{uuid.uuid4().hex[:8]}"
        env = {"OPENAI_API_KEY": "sk-bench", "LOGPROBE_OPENAI_BASE_URL": server.url,
               "LOGPROBE_OPENAI_LIMIT_NAME": uuid.uuid4().hex,
               "LOGPROBE_OPENAI_RPM": str(limit), "LOGPROBE_OPENAI_WINDOW_S": str(window)}
        procs = [WorkerProcess(backend="openai", queue=queue, redis_url=args.redis_url,
                               database_url=database_url, log_dir=log_dir / f"{queue}-{i}",
                               extra_args=["-c", str(args.concurrency)], env=env)
                 for i in range(workers)]
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(WorkerProcess.start, procs))
        try:
            with Client(redis_url=args.redis_url, database_url=database_url,
                        queue=queue) as client:
                # first touch of the backend (imports) off the clock
                handles = [client.generate("warm", model="davinci-002", backend="openai",
                                           max_new_tokens=1) for _ in range(workers * 2)]
                for handle in handles:
                    handle.result(timeout=120)
                time.sleep(window + 0.5)  # let the warm-up requests leave the window
                server.clear()
                specs = [{"kind": "generate", "prompt": f"p{i}", "model": "davinci-002",
                          "backend": "openai", "max_new_tokens": 2} for i in range(jobs)]
                handles = client.submit_many(specs)
                for handle in handles:
                    handle.result(timeout=600)
        finally:
            for proc in procs:
                proc.stop()
        return sorted(r.time for r in server.recorded())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=40, help="requests per window")
    parser.add_argument("--window", type=float, default=5.0, help="window length, seconds")
    parser.add_argument("--windows", type=int, default=3, help="windows measured")
    parser.add_argument("--latency", type=float, default=0.05, help="server latency, seconds")
    parser.add_argument("--concurrency", type=int, default=4, help="threads per worker")
    parser.add_argument("--workers", default="2,4")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/1")
    parser.add_argument("--database-url", help="default: a SQLite file in a temp dir")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="logprobe-bench-"))
    database_url = args.database_url or f"sqlite:///{tmp / 'bench.db'}"
    upgrade_schema(database_url)
    configured = args.limit / args.window
    print(f"limit {args.limit} requests per {args.window:g}s window = {configured:.2f} req/s; "
          f"server latency {args.latency * 1000:.0f} ms; {args.concurrency} threads per worker; "
          f"database {database_url.split(':')[0]}")
    header = (f"{'workers':>7} {'limit/s':>8} {'first k windows/s':>17} {'sustained/s':>11} "
              f"{'ratio':>6} {'max/window':>10} {'unlimited/s':>11}")
    print(header)
    print("-" * len(header))
    for workers in [int(w) for w in args.workers.split(",")]:
        arrivals = run(workers, args.limit * (args.windows + 1), limit=args.limit,
                       window=args.window, args=args, database_url=database_url,
                       log_dir=tmp)
        span = args.windows * args.window
        first_windows = sum(1 for t in arrivals if t < arrivals[0] + span) / span
        k_r = args.windows * args.limit
        sustained = k_r / (arrivals[k_r] - arrivals[0])
        peak = max_in_rolling_window(arrivals, args.window)
        free = run(workers, 200, limit=0, window=args.window, args=args,
                   database_url=database_url, log_dir=tmp)
        unlimited = (len(free) - 1) / (free[-1] - free[0])
        print(f"{workers:>7} {configured:>8.2f} {first_windows:>17.2f} {sustained:>11.2f} "
              f"{sustained / configured:>6.2f} {peak:>7}/{args.limit:<2} {unlimited:>11.1f}",
              flush=True)


if __name__ == "__main__":
    main()
