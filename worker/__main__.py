"""``python -m worker --backend hf [--gpu N]``: start a Celery worker for one backend.

``logprobe worker`` runs this. GPU pinning happens here, before anything imports
torch: ``--gpu N`` sets ``CUDA_VISIBLE_DEVICES=N`` for this process and its children.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Mapping

from api_client.constants import default_queue

#: OpenAI calls wait on the network, not a GPU: a thread pool of this many by default.
OPENAI_DEFAULT_CONCURRENCY = 8
#: Environment variables that set a process's math-library threads; where none is
#: set, ``--concurrency N`` on the hf backend gives each pool process 1/N of the CPUs.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def pool_math_threads(backend: str, pool: str, concurrency: int, environ: Mapping[str, str],
                      cpus: int) -> int | None:
    """``OMP_NUM_THREADS`` for the pool processes, or None to leave torch's default.

    ``--concurrency N`` on the hf backend's process pool: each process gets an equal
    share of the ``cpus``, at least one (torch's default, a thread per CPU in every
    process, has N processes' threads fight over the same cores), unless the
    environment already sets the threads (:data:`THREAD_VARIABLES`)."""
    if backend != "hf" or pool != "prefork" or concurrency < 2:
        return None
    if any(name in environ for name in THREAD_VARIABLES):
        return None
    return max(1, cpus // concurrency)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="logprobe worker", description=__doc__)
    parser.add_argument("--backend", choices=["hf", "openai"], required=True)
    parser.add_argument("--gpu", type=int,
                        help="serve on this GPU only (sets CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--queues", help="comma-separated queues (default: logprobe.<backend>)")
    parser.add_argument("--concurrency", "-c", type=int,
                        help="worker processes or threads (hf: one per GPU is right, default 1; "
                        "on a CPU, N processes of 1/N of the cores each serve many small "
                        "probes faster than one, at N copies of the model; "
                        f"openai: requests in flight, default {OPENAI_DEFAULT_CONCURRENCY})")
    parser.add_argument("--pool", choices=["prefork", "solo", "threads"],
                        help="default: prefork for hf, threads for openai (I/O bound); on a "
                        "GPU, '--pool threads --concurrency 2' stores one message's rows "
                        "while the next one's batches run (one copy of the model; Celery's "
                        "backstop time limits do not apply, each job's own limit does)")
    parser.add_argument("--max-models", type=int, help="models kept loaded per process (LRU)")
    parser.add_argument("--max-attempts", type=int,
                        help="give a job up after its worker died this many times")
    parser.add_argument("--deterministic", action="store_true",
                        help="torch deterministic algorithms, no TF32, fixed cuBLAS workspace")
    parser.add_argument("--store-at-end", action="store_true",
                        help="store a message's results when all of it is computed, not "
                        "each batch's on a second thread while the next computes "
                        "(LOGPROBE_STORE_WHILE_COMPUTING=0)")
    parser.add_argument("--hostname", "-n",
                        help="worker name (default: <backend>[-gpuN]-<pid>@<host>)")
    parser.add_argument("--loglevel", "-l", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    if args.deterministic:
        os.environ["LOGPROBE_DETERMINISTIC"] = "1"
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.store_at_end:
        os.environ["LOGPROBE_STORE_WHILE_COMPUTING"] = "0"
    if args.max_models is not None:
        os.environ["LOGPROBE_MAX_MODELS"] = str(args.max_models)
    if args.max_attempts is not None:
        os.environ["LOGPROBE_MAX_ATTEMPTS"] = str(args.max_attempts)
    concurrency = args.concurrency or (
        OPENAI_DEFAULT_CONCURRENCY if args.backend == "openai" else 1)
    pool = args.pool or ("threads" if args.backend == "openai" else "prefork")
    threads = pool_math_threads(args.backend, pool, concurrency, os.environ, available_cpus())
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # read when torch is imported
    assert "torch" not in sys.modules, "torch must not be imported before GPU pinning"

    from api_client.errors import ConfigError

    from .app import create_app

    try:
        app = create_app()
    except ConfigError as exc:  # a malformed URL: say what to change, no traceback
        print(f"logprobe worker: {exc}", file=sys.stderr)
        sys.exit(2)
    gpu = f"-gpu{args.gpu}" if args.gpu is not None else ""
    hostname = args.hostname or f"{args.backend}{gpu}-{os.getpid()}@{socket.gethostname()}"
    app.worker_main([
        "worker",
        "--queues", args.queues or default_queue(args.backend),
        "--concurrency", str(concurrency),
        "--pool", pool,
        "--hostname", hostname,
        "--loglevel", args.loglevel,
        "--without-gossip",
        "--without-mingle",
    ])


if __name__ == "__main__":
    main()
