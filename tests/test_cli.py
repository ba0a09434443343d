"""The `logprobe` command line against a real worker, Redis and database."""

from __future__ import annotations

import csv
import io
import math
import subprocess

from api_client import JobStatus
from tests.helpers import logprobe_command, subprocess_env

TEXT = " to make it easier to"


def run_cli(worker, *args: str) -> str:
    out = subprocess.run(
        logprobe_command("--redis-url", worker.redis_url, "--database-url", worker.database_url,
                         *args),
        capture_output=True, text=True, env=subprocess_env(), timeout=180,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_db_upgrade_creates_the_schema(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    subprocess.run(logprobe_command("--database-url", url, "db", "upgrade"), check=True,
                   env=subprocess_env(), capture_output=True)
    import sqlite3

    with sqlite3.connect(tmp_path / "fresh.db") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"jobs", "tokens", "top_logprobs", "sequences", "alembic_version"} <= tables


def test_submit_status_show_sql(hf_worker, client, tiny_gpt2) -> None:
    out = run_cli(hf_worker, "submit", "score", TEXT, "--model", tiny_gpt2, "--queue",
                  hf_worker.queue, "--top-logprobs", "2", "--wait", "120")
    job_id = out.splitlines()[0].strip()
    result = client.job(job_id).result(timeout=1)
    assert f"loss {result.loss:.6f}" in out

    status = run_cli(hf_worker, "status", job_id)
    assert "succeeded" in status and tiny_gpt2 in status
    assert "reused_from" not in status
    # The same probe again is answered from the first one's rows: status says so.
    copy = client.score(TEXT, model=tiny_gpt2, top_logprobs=2, queue=hf_worker.queue)
    assert copy.wait(timeout=120) is JobStatus.SUCCEEDED
    assert f"reused_from     {job_id}" in run_cli(hf_worker, "status", copy.id)

    table = run_cli(hf_worker, "show", job_id).splitlines()
    assert table[0] == f"loss {result.loss:.6f}"
    assert table[1].split()[:5] == ["position", "token_id", "token", "logprob", "prob"]
    assert len(table) == 2 + len(result.tokens)

    shown = list(csv.DictReader(io.StringIO(run_cli(hf_worker, "show", job_id,
                                                        "--format", "csv"))))
    assert [int(r["token_id"]) for r in shown] == [284, 787, 340, 4577, 284]
    assert [r["token"] for r in shown] == [repr(t.token) for t in result.tokens]
    assert shown[0]["logprob"] == ""
    for row, token in zip(shown[1:], result.tokens[1:], strict=True):
        assert float(row["logprob"]) == token.logprob
        assert math.isclose(float(row["prob"]), math.exp(token.logprob), rel_tol=1e-12)
        assert len(row["top"].split(", ")) == 2

    csv_out = run_cli(hf_worker, "sql", f"SELECT position, token_id, logprob FROM tokens "
                      f"WHERE job_id = '{job_id}' ORDER BY position", "--format", "csv")
    records = list(csv.DictReader(io.StringIO(csv_out)))
    assert [int(r["token_id"]) for r in records] == [284, 787, 340, 4577, 284]
    assert float(records[2]["logprob"]) == result.tokens[2].logprob


def test_submit_generate_and_bad_spec(hf_worker, client, tiny_gpt2) -> None:
    out = run_cli(hf_worker, "submit", "generate", "Finn writes code", "--model", tiny_gpt2,
                  "--queue", hf_worker.queue, "--max-new-tokens", "5", "--wait", "120")
    job_id = out.splitlines()[0].strip()
    result = client.job(job_id).result(timeout=1)
    assert f"sequence 0: {result.sequences[0].text!r}" in out

    bad = subprocess.run(
        logprobe_command("--redis-url", hf_worker.redis_url, "--database-url",
                         hf_worker.database_url, "submit", "generate", "x", "--model", tiny_gpt2,
                         "--seed", "4"),
        capture_output=True, text=True, env=subprocess_env(), timeout=60,
    )
    assert bad.returncode == 2
    assert "seed only applies when sampling; set do_sample=True" in bad.stderr

    def refused(*args: str) -> str:
        out = subprocess.run(
            logprobe_command("--redis-url", hf_worker.redis_url, "--database-url",
                             hf_worker.database_url, "submit", *args, "--model", tiny_gpt2),
            capture_output=True, text=True, env=subprocess_env(), timeout=60)
        assert out.returncode == 2 and not out.stdout, (out.stdout, out.stderr)
        return out.stderr

    # An option of the other kind of probe is refused, not dropped from the spec.
    assert ("--do-sample, --seed only apply to 'logprobe submit generate'"
            in refused("score", "x y", "--seed", "3", "--do-sample"))
    assert ("--prepend-bos only applies to 'logprobe submit score'"
            in refused("generate", "x", "--prepend-bos"))


def test_cancel_goes_on_past_an_unknown_job(hf_worker, client, tiny_gpt2) -> None:
    """``logprobe cancel A B``: an id that is not there is reported and the others are
    still cancelled (exit status 1)."""
    queued = client.submit({"kind": "score", "text": "x y", "model": tiny_gpt2},
                           queue="logprobe.test.nobody-serves-this")
    out = subprocess.run(
        logprobe_command("--redis-url", hf_worker.redis_url, "--database-url",
                         hf_worker.database_url, "cancel", "0" * 32, queued.id, "--wait", "5"),
        capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert f"{'0' * 32} not found" in out.stderr
    assert f"{queued.id} cancelled" in out.stdout
    assert queued.status() is JobStatus.CANCELLED


def test_submit_merges_spec_json_with_options(hf_worker, client, tiny_gpt2) -> None:
    """--spec values stand unless an option is given; options given as 0 count; a model
    directory given relative to the shell's directory is stored absolute."""
    from pathlib import Path

    model = Path(tiny_gpt2)
    spec_json = '{"max_new_tokens": 7, "num_return_sequences": 2, "do_sample": true}'

    def submit(*args: str) -> dict:
        out = subprocess.run(
            logprobe_command("--redis-url", hf_worker.redis_url, "--database-url",
                             hf_worker.database_url, "submit", "generate", "Finn", "--queue",
                             hf_worker.queue, *args),
            capture_output=True, text=True, env=subprocess_env(), timeout=60,
            cwd=model.parent,
        )
        assert out.returncode == 0, out.stderr
        return client.job(out.stdout.split()[0]).info()["spec"]

    spec = submit("--model", f"./{model.name}", "--spec", spec_json, "--seed", "0")
    assert (spec["max_new_tokens"], spec["num_return_sequences"], spec["do_sample"],
            spec["seed"], spec["backend"]) == (7, 2, True, 0, "hf")
    assert spec["model"] == str(model.resolve())
    spec = submit("--model", tiny_gpt2, "--spec", spec_json, "--max-new-tokens", "3")
    assert (spec["max_new_tokens"], spec["num_return_sequences"]) == (3, 2)

    for args, message in [(["--spec", "{max_new_tokens: 7}"], "--spec is not valid JSON"),
                          (["--spec", "[1]"], "--spec must be a JSON object"),
                          (["--token-ids", "1,x"], "not a comma-separated list")]:
        kind = "score" if "--token-ids" in args else "generate"
        bad = subprocess.run(
            logprobe_command("--redis-url", hf_worker.redis_url, "--database-url",
                             hf_worker.database_url, "submit", kind, "--model", tiny_gpt2,
                             *args),
            capture_output=True, text=True, env=subprocess_env(), timeout=60,
        )
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr


def test_global_options_after_the_command(tmp_path, monkeypatch) -> None:
    """``--redis-url`` / ``--database-url`` work after the command too
    (``logprobe sql QUERY --database-url URL``), and ``logprobe worker --backend hf
    --redis-url URL`` hands them to the worker in its environment, not its arguments."""
    import sqlite3

    from api_client import cli

    db = tmp_path / "after.db"
    url = f"sqlite:///{db}"
    subprocess.run(logprobe_command("db", "upgrade", "--database-url", url), check=True,
                   env=subprocess_env(LOGPROBE_DATABASE_URL=""), capture_output=True,
                   timeout=120)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone() == (0,)
    out = subprocess.run(
        logprobe_command("sql", "SELECT COUNT(*) AS n FROM jobs", "--format", "csv",
                         "--database-url", url),
        capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["n", "0"]

    execs: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(cli.os, "execve", lambda path, argv, env: execs.append((argv, env)))
    cli.main(["worker", "--backend", "hf", "--redis-url", "redis://127.0.0.1:1/5",
              "--database-url", url, "--queues", "q1"])
    cli.main(["--redis-url", "redis://127.0.0.1:1/6", "worker", "--backend", "hf"])
    (argv, env), (argv2, env2) = execs
    assert argv[-5:] == ["-m", "worker", "--backend", "hf", "--queues", "q1"][-5:]
    assert "--redis-url" not in argv and "--database-url" not in argv
    assert (env["LOGPROBE_REDIS_URL"], env["LOGPROBE_DATABASE_URL"]) == (
        "redis://127.0.0.1:1/5", url)
    assert argv2[-3:] == ["worker", "--backend", "hf"]
    assert env2["LOGPROBE_REDIS_URL"] == "redis://127.0.0.1:1/6"
