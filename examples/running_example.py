"""The running example: "Finn writes code" on GPT-2, scored and continued greedily.

    python examples/running_example.py [--model gpt2|DIR] [--tiny] [--no-worker]

It submits two probe jobs through the queue, a worker process runs them, the
results land in SQL, and this script prints them as tables read back from SQL.
With no LOGPROBE_* URLs set it uses the embedded default (a SQLite file and an
embedded Redis under ~/.logprobe). Unless --no-worker is given it starts a worker
for the duration of the example. Without hub access (or with --tiny) it builds a
tiny GPT-2-shaped model with the real GPT-2 tokenizer and random weights instead.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from api_client import Client  # noqa: E402
from api_client.cli import token_table  # noqa: E402
from api_client.settings import mask_url  # noqa: E402

TEXT = "Finn writes code"


def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.getaddrinfo("huggingface.co", 443)
        return True
    except OSError:
        return False


def tiny_model(home: Path) -> str:
    path = home / "models" / "tiny-gpt2"
    if not (path / "config.json").exists():
        from tests.tiny_models import build_gpt2

        build_gpt2(path)
    return str(path)


def start_worker(client: Client, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), TRANSFORMERS_VERBOSITY="error")
    env["LOGPROBE_REDIS_URL"] = client.settings.resolved_redis_url()
    env["LOGPROBE_DATABASE_URL"] = client.settings.resolved_database_url()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "worker", "--backend", "hf",
                               "--loglevel", "warning"], stdout=log, stderr=subprocess.STDOUT,
                              env=env, cwd=REPO)
    print(f"started a worker (pid {worker.pid}, log {log_path})")
    return worker


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2", help="hub name or local model directory")
    parser.add_argument("--tiny", action="store_true", help="use a tiny offline GPT-2 model")
    parser.add_argument("--no-worker", action="store_true", help="use the running workers")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()

    client = Client()
    model = args.model
    if args.tiny or (model == "gpt2" and not hub_reachable()):
        if not args.tiny:
            print("huggingface.co is not reachable: using a tiny offline GPT-2-shaped model "
                  "(real GPT-2 tokenizer, random weights)")
        model = tiny_model(client.settings.home)
    print(f"database: {client.database_url_safe}")
    print(f"broker:   {mask_url(client.settings.resolved_redis_url())}")

    worker = None if args.no_worker else start_worker(
        client, client.settings.home / "logs" / "example-worker.log")
    try:
        started = time.monotonic()
        score_job = client.score(TEXT, model=model, top_logprobs=3)
        gen_job = client.generate(TEXT, model=model, max_new_tokens=5, do_sample=False,
                                  top_logprobs=3)
        print(f"submitted jobs {score_job.id} (score) and {gen_job.id} (generate)")
        scored = score_job.result(timeout=args.timeout)
        generated = gen_job.result(timeout=args.timeout)
        print(f"both finished in {time.monotonic() - started:.1f}s\n")

        print(f"== score: {TEXT!r} on {model}")
        print(f"loss = {scored.loss:.6f}  (mean NLL of tokens 1..n-1, = model(ids, "
              "labels=ids).loss)")
        print(token_table(scored))
        seq = generated.sequences[0]
        print(f"\n== greedy continuation, 5 tokens: {TEXT!r} + {seq.text!r}")
        print(token_table(generated))
        print("\n== the same, queried with SQL:")
        print(client.sql(
            "SELECT j.kind, t.position, t.token_id, t.token, t.logprob, t.generated "
            "FROM tokens t JOIN jobs j ON j.id = t.job_id "
            "WHERE j.id IN (:a, :b) AND t.logprob IS NOT NULL ORDER BY j.kind DESC, t.position",
            {"a": score_job.id, "b": gen_job.id},
        ).to_string(index=False))
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
