"""SQL views, exports and plots over jobs that a real worker ran.

The module's worker runs on SQLite and on PostgreSQL (``client`` is parametrized);
the jobs score two texts with the tiny GPT-2 and LLaMA models, one text twice and
once with ``prepend_bos``, plus one generation.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import math
import os
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from api_client import ProbeResult
from api_client.plot import default_size, layout
from tests.helpers import REPO_ROOT, logprobe_command, subprocess_env

T1 = "The quick brown fox jumps over the lazy dog."
T2 = "Colorless green ideas sleep furiously & <loudly>."
TOL = 1e-6


@dataclass
class Jobs:
    gpt2_t1: ProbeResult
    gpt2_t1_again: ProbeResult
    gpt2_t1_bos: ProbeResult
    gpt2_t2: ProbeResult
    llama_t1: ProbeResult
    llama_t2: ProbeResult
    generated: ProbeResult

    @property
    def scored(self) -> list[ProbeResult]:
        return [self.gpt2_t1, self.gpt2_t1_again, self.gpt2_t1_bos, self.gpt2_t2,
                self.llama_t1, self.llama_t2]


@pytest.fixture(scope="module")
def jobs(client, tiny_gpt2: str, tiny_llama: str) -> Jobs:
    handles = [
        client.score(T1, model=tiny_gpt2, top_logprobs=3),
        client.score(T1, model=tiny_gpt2, top_logprobs=3),
        client.score(T1, model=tiny_gpt2, prepend_bos=True),
        client.score(T2, model=tiny_gpt2, top_logprobs=3),
        client.score(T1, model=tiny_llama, top_logprobs=3),
        client.score(T2, model=tiny_llama, top_logprobs=3),
        client.generate(T2, model=tiny_gpt2, max_new_tokens=4, top_logprobs=2),
    ]
    return Jobs(*(h.result(timeout=180) for h in handles))


def _url(client) -> str:
    return client.engine.url.render_as_string(hide_password=False).replace("+psycopg", "")


def run_cli(client, *args: str, stdin: str | None = None, cwd: Path | None = None) -> str:
    """``logprobe ARGS`` in this process (the real argparse entry point); its stdout."""
    from api_client.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_stdin, old_cwd = sys.stdin, os.getcwd()
    try:
        sys.stdin = io.StringIO(stdin or "")
        os.chdir(cwd or REPO_ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--database-url", _url(client), *args])
    finally:
        sys.stdin = old_stdin
        os.chdir(old_cwd)
    assert code == 0, err.getvalue()
    return out.getvalue()


# --- views ----------------------------------------------------------------------


def test_token_view_rows_are_the_jobs_tokens(client, jobs: Jobs) -> None:
    res = jobs.gpt2_t1
    frame = client.sql("SELECT * FROM token_view WHERE job_id = :j ORDER BY position",
                       {"j": res.job_id})
    assert frame["position"].tolist() == [t.position for t in res.tokens]
    assert frame["token_id"].tolist() == [t.token_id for t in res.tokens]
    assert frame["token"].tolist() == [t.token for t in res.tokens]
    assert set(frame["model"]) == {res.model} and set(frame["kind"]) == {"score"}
    assert set(frame["status"]) == {"succeeded"} and set(frame["sequence_text"]) == {T1}
    assert math.isnan(frame["logprob"][0]) and math.isnan(frame["top_token_id"][0])
    for row, tok in zip(frame.iloc[1:].itertuples(), res.tokens[1:], strict=True):
        assert row.logprob == pytest.approx(tok.logprob, abs=TOL)
        assert row.surprisal_bits == pytest.approx(-tok.logprob / math.log(2), abs=TOL)
        assert row.top_token == tok.top_logprobs[0].token
        assert row.top_logprob == pytest.approx(tok.top_logprobs[0].logprob, abs=TOL)
        assert row.is_top == int(tok.top_logprobs[0].token_id == tok.token_id)
    gen = client.sql("SELECT generated, COUNT(*) AS n FROM token_view WHERE job_id = :j "
                     "GROUP BY generated ORDER BY generated", {"j": jobs.generated.job_id})
    seq = jobs.generated.sequences[0]
    assert gen["n"].tolist() == [len(seq.prompt_tokens), len(seq.tokens)]


def test_loss_by_model_groups_repeats_and_separates_prepend_bos(client, jobs: Jobs) -> None:
    frame = client.sql("SELECT * FROM loss_by_model ORDER BY model, text, prepend_bos")
    assert len(frame) == 5  # the generation has no loss and is not a row
    rows = {(r.model, r.text, bool(r.prepend_bos)): r for r in frame.itertuples()}
    repeat = rows[(jobs.gpt2_t1.model, T1, False)]
    assert repeat.n_jobs == 2
    assert repeat.loss == pytest.approx((jobs.gpt2_t1.loss + jobs.gpt2_t1_again.loss) / 2,
                                        abs=TOL)
    assert repeat.min_loss == pytest.approx(repeat.max_loss, abs=TOL)  # deterministic
    assert repeat.num_scored_tokens == len(jobs.gpt2_t1.tokens) - 1
    bos = rows[(jobs.gpt2_t1.model, T1, True)]
    assert bos.n_jobs == 1 and bos.loss == pytest.approx(jobs.gpt2_t1_bos.loss, abs=TOL)
    assert bos.num_scored_tokens == len(jobs.gpt2_t1_bos.tokens) - 1
    for res in (jobs.gpt2_t2, jobs.llama_t1, jobs.llama_t2):
        row = rows[(res.model, res.text, False)]
        assert row.loss == pytest.approx(res.loss, abs=TOL)
        assert row.sum_logprob == pytest.approx(res.sum_logprob, abs=1e-5)
        assert row.dtype == "float32" and row.backend == "hf"


def test_text_across_models_puts_models_side_by_side(client, jobs: Jobs) -> None:
    frame = client.sql("SELECT * FROM text_across_models ORDER BY text")
    # T1 with BOS was scored by one model only: no pair.
    assert frame["text"].tolist() == sorted([T1, T2])
    for row in frame.itertuples():
        gpt2 = jobs.gpt2_t1 if row.text == T1 else jobs.gpt2_t2
        llama = jobs.llama_t1 if row.text == T1 else jobs.llama_t2
        assert (row.model_a, row.model_b) == (gpt2.model, llama.model)
        assert row.loss_a == pytest.approx(gpt2.loss, abs=TOL)
        assert row.loss_b == pytest.approx(llama.loss, abs=TOL)
        assert row.loss_diff == pytest.approx(llama.loss - gpt2.loss, abs=TOL)
        assert row.n_jobs_a == (2 if row.text == T1 else 1)


def test_docs_sql_examples_run(client, jobs: Jobs) -> None:
    """Every ```sql block in docs/deployment.md runs and returns rows."""
    docs = (REPO_ROOT / "docs" / "deployment.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", docs, re.S)
    assert len(blocks) >= 4
    model = jobs.gpt2_t1.model
    for sql in blocks:
        sql = sql.replace("'gpt2'", f"'{model}'").replace("'JOB_ID'", f"'{jobs.gpt2_t1.job_id}'")
        assert len(client.sql(sql.strip().rstrip(";"))) > 0, sql


def test_views_from_the_command_line_tools(client, jobs: Jobs) -> None:
    """`logprobe sql`, and `sqlite3` or `psql`, read the views."""
    query = "SELECT model, n_jobs, loss FROM loss_by_model WHERE text = 'The quick brown fox " \
            "jumps over the lazy dog.' AND prepend_bos = " + \
            ("false" if client.engine.dialect.name == "postgresql" else "0") + " ORDER BY model"
    proc = subprocess.run(logprobe_command("--database-url", _url(client), "sql", query,
                                           "--format", "csv"),
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lines = out.strip().splitlines()
    assert lines[0] == "model,n_jobs,loss"
    assert [line.split(",")[1] for line in lines[1:]] == ["2", "1"]
    url = _url(client)
    if url.startswith("sqlite"):
        argv = ["sqlite3", "-csv", url.removeprefix("sqlite:///"), query]
    else:
        argv = ["psql", url, "-A", "-F", ",", "-t", "-c", query]
    native = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rows = [line.split(",") for line in native.strip().splitlines()]
    assert [r[0].strip('"') for r in rows] == [jobs.gpt2_t1.model, jobs.llama_t1.model]
    assert float(rows[1][2]) == pytest.approx(jobs.llama_t1.loss, abs=1e-6)


# --- exports --------------------------------------------------------------------


def test_export_jobs_to_parquet_and_csv(client, jobs: Jobs, tmp_path: Path) -> None:
    ids = [jobs.gpt2_t1.job_id, jobs.llama_t2.job_id]
    parquet = tmp_path / "tokens.parquet"
    run_cli(client, "export", "--jobs", *ids, "-o", str(parquet))
    assert parquet.read_bytes()[:4] == b"PAR1"
    frame = pd.read_parquet(parquet)
    expected = [(r.job_id, t.position, t.token) for r in (jobs.gpt2_t1, jobs.llama_t2)
                for t in r.tokens]
    assert sorted(zip(frame.job_id, frame.position, frame.token, strict=True)) == \
        sorted(expected)
    got = frame.set_index(["job_id", "position"])["logprob"]
    for tok in jobs.llama_t2.tokens[1:]:
        assert got[(jobs.llama_t2.job_id, tok.position)] == pytest.approx(tok.logprob, abs=TOL)

    # Job ids from a file on stdin (submit's output), CSV on stdout.
    out = run_cli(client, "export", "--jobs-file", "-", "--table", "jobs", "--format", "csv",
                  stdin="\n".join(ids) + "\n# a comment\n")
    exported = pd.read_csv(io.StringIO(out))
    assert sorted(exported["id"]) == sorted(ids)
    spec = exported.set_index("id").loc[jobs.gpt2_t1.job_id, "spec"]
    assert json.loads(spec)["text"] == T1  # JSON columns are JSON text


def test_export_query_to_csv_and_parquet(client, jobs: Jobs, tmp_path: Path) -> None:
    query = "SELECT model, text, loss FROM loss_by_model WHERE n_jobs = 2"
    csv = tmp_path / "loss.csv"
    run_cli(client, "export", "--query", query, "-o", str(csv))
    frame = pd.read_csv(csv)
    assert frame["model"].tolist() == [jobs.gpt2_t1.model]
    assert frame["loss"][0] == pytest.approx(jobs.gpt2_t1.loss, abs=TOL)
    from api_client.export import export

    out = export(client, tmp_path / "q.parquet", query="SELECT * FROM text_across_models")
    back = pd.read_parquet(tmp_path / "q.parquet")
    assert list(back.columns) == list(out.columns) and len(back) == 2
    assert back["loss_diff"].tolist() == pytest.approx(out["loss_diff"].tolist())
    assert back["model_a"].tolist() == out["model_a"].tolist()


# --- plots ----------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    from PIL import Image

    with Image.open(path) as image:  # decodes every chunk, CRCs included
        image.load()
        assert image.size == (width, height)
    return width, height


def check_html(page: str, results: list[ProbeResult]) -> None:
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    assert "<script" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    for res in results:
        assert res.job_id in page
        seq = res.sequences[0]
        for tok in (*seq.prompt_tokens, *seq.tokens):
            assert html.escape(tok.token) in page, tok.token
            for alt in tok.top_logprobs:  # shown on hover
                assert html.escape(repr(alt.token)) in page
    bars = sum(1 for r in results for t in (*r.sequences[0].prompt_tokens, *r.sequences[0].tokens)
               if t.logprob is not None)
    assert page.count('<rect class="bar"') == bars


def test_plot_command_writes_png_and_html(client, jobs: Jobs, tmp_path: Path) -> None:
    res = jobs.gpt2_t2
    out = run_cli(client, "plot", res.job_id, cwd=tmp_path)
    png, page = tmp_path / f"{res.job_id}.png", tmp_path / f"{res.job_id}.html"
    assert out.split() == [png.name, page.name]
    assert png_size(png) == default_size(layout([res]))
    check_html(page.read_text(), [res])
    text = page.read_text()  # "&" and "<" in tokens are escaped, never raw markup
    assert "&amp;" in text and "&lt;" in text and "<loud" not in text

    run_cli(client, "plot", res.job_id, "-o", str(tmp_path / "wide.png"), "--width", "1200",
            "--height", "300")
    assert png_size(tmp_path / "wide.png") == (1200, 300)


def test_job_plot_in_python(client, jobs: Jobs, tmp_path: Path) -> None:
    job = client.job(jobs.generated.job_id)
    path = job.plot(tmp_path / "gen.png", width=800, height=500)
    assert png_size(path) == (800, 500)
    check_html(job.plot(tmp_path / "gen.html").read_text(), [jobs.generated])
    figure = job.plot()
    assert tuple(figure.get_size_inches() * figure.dpi) == default_size(layout([jobs.generated]))


def test_plot_compare_overlays_models(client, jobs: Jobs, tmp_path: Path) -> None:
    pair = [jobs.gpt2_t1, jobs.llama_t1]  # one tokenizer: grouped bars per token
    run_cli(client, "plot", "--compare", *(r.job_id for r in pair),
            "-o", str(tmp_path / "cmp.png"), "-o", str(tmp_path / "cmp.html"))
    assert png_size(tmp_path / "cmp.png") == default_size(layout(pair))
    page = (tmp_path / "cmp.html").read_text()
    check_html(page, pair)
    assert "x axis: tokens" in page
    for res in pair:
        assert f"(loss {res.loss:.4f})" in page
    # Different tokenizations (BOS prepended) overlay on a character axis.
    mixed = layout([jobs.gpt2_t1, jobs.gpt2_t1_bos])
    assert mixed.x_unit == "character"
    assert [b.token.token for b in mixed.series[1].bars][1:] == [t.token for t in
                                                                jobs.gpt2_t1.tokens]
    ends = [b.x1 for b in mixed.series[0].bars]
    assert ends[-1] == pytest.approx(len(T1) - 0.05)
    # BOS is not part of the text: it moves nothing, and the same tokens line up.
    assert [(b.x0, b.x1) for b in mixed.series[1].bars[1:]] == \
        [(b.x0, b.x1) for b in mixed.series[0].bars]


def test_plot_several_jobs_needs_compare(client, jobs: Jobs) -> None:
    from api_client.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--database-url", _url(client), "plot", jobs.gpt2_t1.job_id,
                     jobs.llama_t1.job_id])
    assert code == 2 and "--compare" in err.getvalue()


def test_views_survive_a_sqlite_batch_migration(tmp_path: Path) -> None:
    """A later revision that rebuilds `jobs` (SQLite batch mode) keeps rows and views."""
    import shutil

    import sqlalchemy as sa
    from alembic import command

    from api_client.database import alembic_config, make_engine, migrations_dir, upgrade_schema

    scripts = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), scripts)
    head = subprocess.run([sys.executable, "-c", "from alembic.script import ScriptDirectory;"
                           f"print(ScriptDirectory({str(scripts)!r}).get_current_head())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (scripts / "versions" / "9999_rebuild.py").write_text(
        f'revision = "9999"\ndown_revision = "{head}"\nbranch_labels = depends_on = None\n'
        "import sqlalchemy as sa\nfrom alembic import op\n\n\ndef upgrade():\n"
        '    with op.batch_alter_table("jobs", recreate="always") as batch:\n'
        '        batch.add_column(sa.Column("extra", sa.Integer))\n')
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_schema(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO jobs (id, kind, backend, model, status, spec, queue) "
                             "VALUES ('j', 'score', 'hf', 'm', 'succeeded', '{}', 'q')")
        conn.exec_driver_sql("INSERT INTO sequences VALUES ('j', 0, 'hi', NULL, 1, 0, NULL)")
        conn.exec_driver_sql("INSERT INTO tokens VALUES ('j', 0, 0, 5, 'hi', NULL, 0)")
    config = alembic_config(url)
    config.set_main_option("script_location", str(scripts))
    command.upgrade(config, "head")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM tokens")).scalar() == 1
        assert conn.execute(sa.text("SELECT token FROM token_view")).scalar() == "hi"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()
