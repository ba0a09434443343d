"""The ``logprobe`` command line: workers, submitting, watching, SQL, schema upgrades."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .errors import JobNotFound, JobTimeout, LogprobeError, SpecError
from .schema import JobStatus


def _client(args: argparse.Namespace) -> Any:
    from .client import Client

    return Client(redis_url=args.redis_url, database_url=args.database_url)


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(columns))
    return frame.to_string(index=False) if rows else "(no rows)"


TOKEN_COLUMNS = ["position", "token_id", "token", "logprob", "prob", "generated", "top"]


def token_rows(result: Any, sequence: int = 0, include_prompt: bool = False) -> list[dict]:
    """A job's per-token rows: position, token id, token, logprob, probability, top-5."""
    seq = result.sequences[sequence]
    tokens = [*seq.prompt_tokens, *seq.tokens] if include_prompt else list(seq.tokens)
    rows = [
        {
            "position": t.position,
            "token_id": t.token_id,
            "token": repr(t.token),
            "logprob": t.logprob,
            "prob": None if t.logprob is None else math.exp(t.logprob),
            "generated": t.generated,
            "top": ", ".join(f"{a.token!r}:{a.logprob:.3f}" for a in t.top_logprobs[:5]),
        }
        for t in tokens
    ]
    return rows


def token_table(result: Any, sequence: int = 0, include_prompt: bool = False) -> str:
    """The per-token rows as an aligned text table."""
    return _table(token_rows(result, sequence, include_prompt), TOKEN_COLUMNS)


# --- commands ---------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace, extra: list[str]) -> int:
    # The worker lives in another package that the client must not import: exec it.
    env = dict(os.environ)
    if args.redis_url:
        env["LOGPROBE_REDIS_URL"] = args.redis_url
    if args.database_url:
        env["LOGPROBE_DATABASE_URL"] = args.database_url
    argv = [sys.executable, "-m", "worker", *extra]
    os.execve(sys.executable, argv, env)
    return 0  # not reached


def _spec_fields(text: str | None) -> dict[str, Any]:
    """The fields of a ``--spec`` JSON object ({} when not given)."""
    if text is None:
        return {}
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"--spec is not valid JSON ({exc}); pass an object such as "
                        '\'{"top_logprobs": 5}\'') from None
    if not isinstance(fields, dict):
        raise SpecError(f"--spec must be a JSON object of spec fields, not "
                        f"{type(fields).__name__}")
    return fields


def _token_ids(text: str | None) -> list[int] | None:
    """``--token-ids 1,2,3`` as ids."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise SpecError(f"--token-ids {text!r} is not a comma-separated list of integer "
                        "ids, such as 464,2068,7586") from None


#: ``logprobe submit``'s options that only one kind of probe takes (argparse names).
KIND_OPTIONS = {
    "score": ("token_ids", "prepend_bos"),
    "generate": ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed",
                 "num_return_sequences"),
}


def _refuse_other_kinds_options(args: argparse.Namespace) -> None:
    """An option of the other kind of probe is an error, not silently dropped."""
    for kind, options in KIND_OPTIONS.items():
        given = [name for name in options if kind != args.kind
                 and getattr(args, name) is not None]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise SpecError(f"{flags} only appl{'ies' if len(given) == 1 else 'y'} to "
                            f"'logprobe submit {kind}'; drop {'it' if len(given) == 1 else 'them'} "
                            f"or submit a {kind} probe")


def cmd_submit(args: argparse.Namespace) -> int:
    from .specs import make_spec

    _refuse_other_kinds_options(args)
    fields: dict[str, Any] = {"model": args.model, "backend": args.backend,
                              "revision": args.revision, "dtype": args.dtype,
                              "device": args.device, "top_logprobs": args.top_logprobs,
                              "device_map": args.device_map}
    if args.kind == "score":
        fields.update(text=args.text, prepend_bos=args.prepend_bos,
                      token_ids=_token_ids(args.token_ids))
    else:
        fields.update(prompt=args.text, max_new_tokens=args.max_new_tokens,
                      do_sample=args.do_sample, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      num_return_sequences=args.num_return_sequences)
    # Options given on the command line override --spec; options left out (None) keep
    # --spec's values, else the spec's defaults.
    fields = {**_spec_fields(args.spec), **{k: v for k, v in fields.items() if v is not None}}
    spec = make_spec(args.kind, **fields)
    client = _client(args)
    job = client.submit(spec, queue=args.queue, time_limit=args.time_limit)
    print(job.id, flush=True)
    if args.wait is not None:
        result = job.result(timeout=args.wait or None, progress=not args.no_progress)
        _print_result(result)
    return 0


def _print_result(result: Any) -> None:
    if result.loss is not None:
        print(f"loss {result.loss:.6f}")
    for seq in result.sequences:
        if result.kind == "generate":
            print(f"sequence {seq.index}: {seq.text!r} (finish: {seq.finish_reason})")
        print(token_table(result, seq.index))


def cmd_status(args: argparse.Namespace) -> int:
    job = _client(args).job(args.job)
    info = job.info()
    keep = ["id", "kind", "backend", "model", "status", "worker", "attempts", "reused_from",
            "loss", "seed", "model_revision", "device", "dtype", "system_fingerprint",
            "created_at", "started_at", "finished_at", "time_limit", "error"]
    for key in keep:
        if info.get(key) is not None:
            value = info[key].value if hasattr(info[key], "value") else info[key]
            print(f"{key:15} {value}")
    if info.get("partial"):
        print(f"{'partial':15} True (the stored tokens are what it had computed)")
    if info.get("status") is JobStatus.RUNNING or args.progress:
        print(f"{'progress':15} {job.progress().describe()}")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    job = _client(args).job(args.job)
    if args.no_progress:
        status = job.wait(timeout=args.timeout)
    else:
        from .progress import wait_with_bar

        status = wait_with_bar(job, timeout=args.timeout)
    info = job.info()
    print(f"{job.id} {status.value}" + (f": {info['error']}" if info.get("error") else ""))
    return 0 if status is JobStatus.SUCCEEDED else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel every job named (an unknown id is reported, the others still cancelled),
    then, with ``--wait``, wait for them together; exits 1 if any could not be
    cancelled or did not stop in time."""
    client = _client(args)
    statuses: dict[str, JobStatus] = {}
    failed = False
    for job_id in args.jobs:
        try:
            statuses[job_id] = client.job(job_id).cancel()
        except JobNotFound as exc:
            print(f"{job_id} not found: {exc}", file=sys.stderr)
            failed = True
    deadline = None if not args.wait else time.monotonic() + args.wait
    for job_id, status in statuses.items():
        if args.wait is not None and not status.finished:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                status = client.job(job_id).wait(timeout=left)
            except JobTimeout:
                status = client.job(job_id).status()
                failed = True
        note = "" if status.finished else " (cancel requested; it stops at its next step)"
        print(f"{job_id} {status.value}{note}")
    return 1 if failed else 0


def cmd_requeue(args: argparse.Namespace) -> int:
    ids = _client(args).requeue(older_than=args.older_than, stale_after=args.stale_after,
                                dry_run=args.dry_run)
    verb = "would resubmit" if args.dry_run else "resubmitted"
    print(f"{verb} {len(ids)} job(s)")
    for job_id in ids:
        print(job_id)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    job = _client(args).job(args.job)
    result = job.result(timeout=args.wait) if args.wait else job.result(timeout=0)
    if args.format == "csv":
        import pandas as pd

        rows = token_rows(result, args.sequence, include_prompt=args.prompt)
        print(pd.DataFrame(rows, columns=TOKEN_COLUMNS).to_csv(index=False), end="")
        return 0
    if result.loss is not None:
        print(f"loss {result.loss:.6f}")
    print(token_table(result, args.sequence, include_prompt=args.prompt))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    _print_frame(_client(args).sql(args.query), args.format)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export, format_for, load, portable, read_job_ids

    job_ids = None
    if args.jobs or args.jobs_file:
        job_ids = list(args.jobs or [])
        if args.jobs_file:
            with (sys.stdin if args.jobs_file == "-" else open(args.jobs_file)) as lines:
                job_ids += read_job_ids(lines)
    client = _client(args)
    if args.output is None:  # CSV on stdout
        if format_for(None, args.format) != "csv":
            print("logprobe: Parquet needs an output file (-o FILE)", file=sys.stderr)
            return 2
        frame = load(client, query=args.query, job_ids=job_ids, table=args.table)
        portable(frame).to_csv(sys.stdout, index=False)
        return 0
    frame = export(client, args.output, query=args.query, job_ids=job_ids, table=args.table,
                   format=args.format)
    print(f"wrote {len(frame)} rows to {args.output}", file=sys.stderr)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import write_plot

    if len(args.jobs) > 1 and not args.compare:
        print("logprobe: several jobs: add --compare to overlay them in one plot",
              file=sys.stderr)
        return 2
    client = _client(args)
    results = [client.job(j).result(timeout=args.wait) for j in args.jobs]
    stem = "compare-" + "-".join(j[:8] for j in args.jobs) if args.compare else args.jobs[0]
    outputs = args.output or [f"{stem}.png", f"{stem}.html"]
    for output in outputs:
        print(write_plot(results, output, sequence=args.sequence, width=args.width,
                         height=args.height))
    return 0


def _print_frame(frame: Any, fmt: str) -> None:
    if fmt == "csv":
        print(frame.to_csv(index=False), end="")
    elif fmt == "json":
        print(frame.to_json(orient="records", date_format="iso"))
    else:
        print(frame.to_string(index=False) if len(frame) else "(no rows)")


def cmd_determinism(args: argparse.Namespace) -> int:
    from .determinism import config_hash, report
    from .specs import make_spec

    client = _client(args)
    if args.determinism_command == "report":
        _print_frame(report(client, config_hash=args.config_hash, model=args.model,
                            kind=args.kind), args.format)
        return 0
    fields = _spec_fields(args.spec)
    fields.update(model=args.model)
    if args.text is not None:
        fields["text" if args.kind == "score" else "prompt"] = args.text
    spec = make_spec(args.kind, **fields)
    jobs = client.repeat(spec, args.n, queues=args.queue or None)
    digest = config_hash(spec)
    print(f"config_hash {digest}")
    for job in jobs:
        print(job.id)
    if args.wait is not None:
        for job in jobs:
            job.wait(timeout=args.wait or None)
        _print_frame(report(client, config_hash=digest), args.format)
    return 0


def cmd_logits(args: argparse.Namespace) -> int:
    job = _client(args).job(args.job)
    values = job.logits(timeout=args.wait)
    ref = job.artifacts()["logits"]
    print(f"uri     {ref.uri}\nshape   {list(ref.shape)}\ndtype   {ref.dtype}\n"
          f"sha256  {ref.sha256}\nbytes   {ref.num_bytes}")
    if args.out:
        import numpy as np

        np.save(args.out, values, allow_pickle=False)
        print(f"saved   {args.out}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from .database import upgrade_schema
    from .settings import Settings

    settings = Settings.from_env(database_url=args.database_url)
    url = settings.resolved_database_url()
    upgrade_schema(url, args.revision)
    return 0


# --- parser -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logprobe", description="Probe language models "
                                     "through a job queue; results land in SQL.")
    redis_help = "broker URL (default: $LOGPROBE_REDIS_URL, else the embedded Redis)"
    database_help = ("results database (default: $LOGPROBE_DATABASE_URL, else "
                     "$LOGPROBE_HOME/logprobe.db, ~/.logprobe by default)")
    parser.add_argument("--redis-url", help=redis_help)
    parser.add_argument("--database-url", help=database_help)
    # The global options are accepted after the command too (`logprobe sql Q
    # --database-url URL`); SUPPRESS keeps a value given before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--redis-url", default=argparse.SUPPRESS, help=redis_help)
    common.add_argument("--database-url", default=argparse.SUPPRESS, help=database_help)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(subs: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return subs.add_parser(name, parents=[common], **kwargs)

    command(sub, "worker", add_help=False,
            help="start a worker (options: `logprobe worker --help`)")

    submit = command(sub, "submit", help="submit a probe; prints its job id")
    submit.add_argument("kind", choices=["score", "generate"])
    submit.add_argument("text", nargs="?", help="text to score, or prompt to continue")
    submit.add_argument("--model", "-m", required=True)
    submit.add_argument("--backend", choices=["hf", "openai"], help="default: hf")
    submit.add_argument("--revision")
    submit.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    submit.add_argument("--device")
    submit.add_argument("--queue")
    submit.add_argument("--top-logprobs", type=int, help="default: 0")
    submit.add_argument("--token-ids", help="comma-separated ids to score instead of text")
    submit.add_argument("--prepend-bos", action="store_true", default=None)
    submit.add_argument("--max-new-tokens", type=int, help="default: 16")
    submit.add_argument("--do-sample", action="store_true", default=None)
    submit.add_argument("--temperature", type=float)
    submit.add_argument("--top-k", type=int)
    submit.add_argument("--top-p", type=float)
    submit.add_argument("--seed", type=int)
    submit.add_argument("--num-return-sequences", type=int, help="default: 1")
    submit.add_argument("--device-map", choices=["auto"],
                        help="spread a big model over all the worker's GPUs (accelerate)")
    submit.add_argument("--time-limit", type=int,
                        help="seconds the job may run (default $LOGPROBE_JOB_TIME_LIMIT or 6 h)")
    submit.add_argument("--no-progress", action="store_true",
                        help="with --wait: no progress bar")
    submit.add_argument("--spec", help="a JSON object of further spec fields")
    submit.add_argument("--wait", type=float, nargs="?", const=0,
                        help="wait for the result (optionally at most this many seconds) "
                        "and print it")

    status = command(sub, "status", help="a job's status, provenance and error")
    status.add_argument("job")
    status.add_argument("--progress", action="store_true",
                        help="show the last reported progress even if not running")

    wait = command(sub, "wait", help="wait for a job, with a progress bar")
    wait.add_argument("job")
    wait.add_argument("--timeout", type=float, help="give up after this many seconds")
    wait.add_argument("--no-progress", action="store_true", help="no progress bar")

    cancel = command(sub, "cancel", help="cancel jobs: queued ones never start, running "
                     "ones stop at the next decoding step (results kept, partial)")
    cancel.add_argument("jobs", nargs="+", metavar="JOB")
    cancel.add_argument("--wait", type=float, nargs="?", const=0,
                        help="wait until a running job has stopped (at most this many seconds)")

    requeue = command(sub, "requeue", help="resubmit jobs SQL says are queued/running but "
                      "the broker lost (e.g. after Redis lost its data)")
    requeue.add_argument("--older-than", type=float, default=60.0,
                         help="only jobs submitted at least this many seconds ago (default 60)")
    requeue.add_argument("--stale-after", type=float, default=30.0,
                         help="a running job whose worker reported within this many seconds "
                         "is alive and left alone (default 30)")
    requeue.add_argument("--dry-run", action="store_true", help="list them, resubmit nothing")

    show = command(sub, "show", help="a finished job's per-token table")
    show.add_argument("job")
    show.add_argument("--sequence", type=int, default=0)
    show.add_argument("--prompt", action="store_true", help="include a generation's prompt")
    show.add_argument("--wait", type=float, help="wait up to this many seconds for the job")
    show.add_argument("--format", choices=["table", "csv"], default="table")

    sql = command(sub, "sql", help="run a SQL query on the results database")
    sql.add_argument("query")
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")

    export = command(sub, "export", help="write a query's rows, or jobs' rows, to "
                     "CSV or Parquet")
    what = export.add_mutually_exclusive_group(required=True)
    what.add_argument("--query", "-q", help="a SQL query (any table or view)")
    what.add_argument("--jobs", nargs="+", metavar="JOB", help="job ids")
    what.add_argument("--jobs-file", metavar="FILE",
                      help="job ids, one per line (`-` for stdin), e.g. saved submit output")
    export.add_argument("--table", default="token_view",
                        help="where job rows come from: token_view (default), tokens, "
                        "top_logprobs, sequences, jobs")
    export.add_argument("--format", choices=["csv", "parquet"],
                        help="default: from the output file's suffix, else csv")
    export.add_argument("--output", "-o", help="output file (default: CSV on stdout)")

    plot = command(sub, "plot", help="draw a job's per-token logprobs (PNG and/or HTML)")
    plot.add_argument("jobs", nargs="+", metavar="JOB")
    plot.add_argument("--compare", action="store_true",
                      help="overlay several jobs (the same text across models)")
    plot.add_argument("--output", "-o", action="append",
                      help="a .png or .html file; repeatable (default: JOB.png and JOB.html)")
    plot.add_argument("--sequence", type=int, default=0)
    plot.add_argument("--width", type=int, help="pixels (default: fits the tokens)")
    plot.add_argument("--height", type=int, help="pixels (default: 420)")
    plot.add_argument("--wait", type=float, default=0,
                      help="wait up to this many seconds for unfinished jobs")
    logits = command(sub, "logits", help="a job's full-logits artifact (return_logits)")
    logits.add_argument("job")
    logits.add_argument("--out", help="also save the array to this .npy file")
    logits.add_argument("--wait", type=float, help="wait up to this many seconds for the job")

    det = command(sub, "determinism", help="repeat probes and compare their runs")
    det_sub = det.add_subparsers(dest="determinism_command", required=True)
    det_report = command(
        det_sub, "report", help="the determinism_report view: one row per probe configuration")
    det_report.add_argument("--config-hash", help="only this configuration")
    det_report.add_argument("--model", help="only this model")
    det_report.add_argument("--kind", choices=["score", "generate"])
    det_report.add_argument("--format", choices=["table", "csv", "json"], default="table")
    det_repeat = command(
        det_sub, "repeat", help="submit one probe N times (to each --queue); prints the config "
        "hash and job ids")
    det_repeat.add_argument("kind", choices=["score", "generate"])
    det_repeat.add_argument("text", nargs="?", help="text to score, or prompt to continue")
    det_repeat.add_argument("--model", "-m", required=True)
    det_repeat.add_argument("-n", type=int, default=5, help="runs per queue (default 5)")
    det_repeat.add_argument("--queue", action="append",
                            help="a queue to send the N runs to (repeatable)")
    det_repeat.add_argument("--spec", help="a JSON object of further spec fields")
    det_repeat.add_argument("--wait", type=float, nargs="?", const=0,
                            help="wait for the runs (optionally at most this many seconds "
                            "each) and print the report row")
    det_repeat.add_argument("--format", choices=["table", "csv", "json"], default="table")

    db = command(sub, "db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = command(db_sub, "upgrade", help="alembic upgrade (default: head)")
    upgrade.add_argument("revision", nargs="?", default="head")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "worker":  # its options belong to `python -m worker`
        return cmd_worker(args, extra)
    args = parser.parse_args(argv)
    commands = {"submit": cmd_submit, "status": cmd_status, "show": cmd_show,
                "sql": cmd_sql, "db": cmd_db, "export": cmd_export, "plot": cmd_plot,
                "determinism": cmd_determinism, "logits": cmd_logits, "wait": cmd_wait,
                "cancel": cmd_cancel, "requeue": cmd_requeue}
    try:
        return commands[args.command](args)
    except LogprobeError as exc:
        print(f"logprobe: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
