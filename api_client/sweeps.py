"""Sweeps: the cross product of texts, models and seeds, submitted as one unit.

A sweep is a set of job rows sharing a ``sweep_id`` (one SQL query selects it),
sent to the broker in few messages (:mod:`api_client.messages`): jobs of the same
queue and model go together, shortest input first, so that a worker claims and
scores a message's jobs as batches of similar lengths.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from .errors import JobNotFound, JobTimeout, SpecError
from .jobs import JobHandle
from .results import ProbeResult, read_result
from .schema import Job, JobStatus
from .specs import GenerateSpec, ScoreSpec, make_spec

if TYPE_CHECKING:
    import pandas as pd

    from .client import Client

_MAX_POLL_INTERVAL = 0.5


def sweep_specs(
    texts: Iterable[str],
    *,
    models: Iterable[str],
    seeds: Iterable[int] | None = None,
    kind: str | None = None,
    **options: Any,
) -> list[ScoreSpec | GenerateSpec]:
    """Validated specs for every (model, text[, seed]), models outermost."""
    texts, models = as_list("texts", texts), as_list("models", models)
    seed_list = None if seeds is None else as_list("seeds", seeds)
    kind = kind or ("generate" if seed_list is not None else "score")
    if not texts:
        raise SpecError("texts: a sweep needs at least one text")
    if not models:
        raise SpecError("models: a sweep needs at least one model")
    if kind not in ("score", "generate"):
        raise SpecError(f"kind: must be 'score' or 'generate', not {kind!r}")
    if seed_list is not None and kind == "score":
        raise SpecError("seeds: scoring is deterministic and takes no seed; drop seeds or "
                        "pass kind='generate'")
    if seed_list is not None and not seed_list:
        raise SpecError("seeds: give at least one seed, or None")
    field = "text" if kind == "score" else "prompt"
    if seed_list is not None:
        options.setdefault("do_sample", True)
    specs: list[ScoreSpec | GenerateSpec] = []
    for model, text in itertools.product(models, texts):
        for seed in seed_list if seed_list is not None else [None]:
            specs.append(make_spec(kind, model=model, seed=seed, **{field: text}, **options))
    return specs


def as_list(name: str, values: Any) -> list[Any]:
    """``values`` as a list; a single string or number is refused (a string is
    iterable: a sweep over its characters is never what was meant)."""
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise SpecError(f"{name}: pass a list, e.g. {name}=[{values!r}], not a single "
                        f"{type(values).__name__}")
    return list(values)


def input_of(spec: Mapping[str, Any]) -> str | None:
    """A job's text or prompt, from its stored spec JSON (None for token ids,
    embeddings)."""
    return spec.get("text") if spec.get("kind") == "score" else spec.get("prompt")


class SweepHandle:
    """The jobs of one sweep: progress, wait, results. Every query goes to SQL."""

    def __init__(self, client: Client, sweep_id: str, job_ids: Sequence[str] | None = None):
        self.client = client
        self.id = sweep_id
        self._job_ids = list(job_ids) if job_ids is not None else None

    def __repr__(self) -> str:
        return f"SweepHandle({self.id!r})"

    def __len__(self) -> int:
        return len(self.job_ids)

    @property
    def job_ids(self) -> list[str]:
        """The sweep's job ids in submission order (models, then texts, then seeds:
        ``jobs.sweep_index``). Raises :class:`JobNotFound` if no job has this sweep id."""
        if self._job_ids is None:
            with self.client.session() as session:
                self._job_ids = list(session.scalars(
                    select(Job.id).where(Job.sweep_id == self.id)
                    .order_by(Job.sweep_index, Job.created_at, Job.id)
                ))
            if not self._job_ids:
                self._job_ids = None
                raise JobNotFound(f"no jobs with sweep id {self.id!r} in "
                                  f"{self.client.database_url_safe}")
        return self._job_ids

    def jobs(self) -> list[JobHandle]:
        return [JobHandle(self.client, job_id) for job_id in self.job_ids]

    def progress(self) -> dict[str, int]:
        """Jobs per status, plus ``total`` and ``finished``."""
        self.job_ids  # noqa: B018 - raises JobNotFound for an unknown sweep id
        with self.client.session() as session:
            counts: dict[JobStatus, int] = dict(session.execute(  # type: ignore[arg-type]
                select(Job.status, func.count()).where(Job.sweep_id == self.id)
                .group_by(Job.status)
            ).all())
        result = {status.value: int(counts.get(status, 0)) for status in JobStatus}
        result["total"] = sum(result.values())
        result["finished"] = sum(result[s.value] for s in JobStatus if s.finished)
        return result

    def wait(self, timeout: float | None = None) -> dict[str, int]:
        """Block until every job of the sweep has finished; returns :meth:`progress`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = 0.02
        while True:
            progress = self.progress()
            if progress["finished"] >= progress["total"]:
                return progress
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(
                    f"sweep {self.id}: {progress['finished']} of {progress['total']} jobs "
                    f"finished after {timeout:g}s; wait longer, or check that workers "
                    "serve the sweep's queue"
                )
            time.sleep(interval)
            interval = min(interval * 1.5, _MAX_POLL_INTERVAL)

    def results(self, timeout: float | None = None) -> list[ProbeResult | None]:
        """Every job's result in submission order; None for a job that failed or was
        cancelled (its ``jobs.error`` says why)."""
        self.wait(timeout)
        out: list[ProbeResult | None] = []
        with self.client.session() as session:
            jobs = {job.id: job for job in session.scalars(
                select(Job).where(Job.sweep_id == self.id))}
            for job_id in self.job_ids:
                job = jobs[job_id]
                out.append(read_result(session, job)
                           if job.status is JobStatus.SUCCEEDED else None)
        return out

    def frame(self) -> pd.DataFrame:
        """The sweep's job rows in submission order (``sweep_index``, id, model, input:
        the text or prompt, seed, status, loss, ...) as a DataFrame."""
        frame = self.client.sql(
            "SELECT sweep_index, id, model, spec, seed, kind, status, loss, sum_logprob, "
            "num_scored_tokens, batch_size, reused_from, error FROM jobs "
            "WHERE sweep_id = :s ORDER BY sweep_index, created_at, id",
            {"s": self.id},
        )
        specs = frame.pop("spec").map(lambda s: json.loads(s) if isinstance(s, str) else s)
        frame.insert(3, "input", specs.map(input_of))
        return frame
