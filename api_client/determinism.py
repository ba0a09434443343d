"""Repeat-and-compare: probe configurations, output hashes and the determinism report.

A *probe configuration* is what a probe asks, independent of where and how often
it runs: ``jobs.config_hash`` = sha256 of the spec's canonical JSON (keys
sorted, no whitespace) without ``seed``, ``device`` and ``reuse``. Runs of one
configuration that differ in seed, device, library versions, model revision,
batch size or ``system_fingerprint`` therefore land in the same report row,
with a flag that says what differed. ``jobs.output_hash`` = sha256 of the output
token ids of every sequence (generated tokens for generate probes, the scored
tokens for score probes; a token's text where its id is unknown), so
``COUNT(DISTINCT output_hash)`` counts distinct outputs. The ``determinism_report``
view (migrations 0003, 0008) aggregates both, over the jobs that computed their
result: a job answered from an identical job's rows (``reused_from``) is a copy, not
a run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .specs import GenerateSpec, ScoreSpec

if TYPE_CHECKING:
    import pandas as pd

    from .results import SequenceResult

#: Spec fields that say how a probe runs, not what it asks: the report compares runs
#: across them (migration 0008 added ``reuse``).
RUN_FIELDS = frozenset({"seed", "device", "reuse"})

#: The SQL view (created by migration 0003) with one row per configuration.
REPORT_VIEW = "determinism_report"

REPORT_COLUMNS = (
    "config_hash", "kind", "model", "runs", "distinct_outputs", "max_abs_dlogprob",
    "max_abs_dloss", "deterministic", "seed_differs", "revision_differs",
    "library_versions_differ", "device_differs", "fingerprint_differs", "batch_size_differs",
    "dtype_differs", "all_deterministic_mode", "min_batch_size", "max_batch_size",
    "first_submitted", "last_finished",
)


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def config_hash(spec: ScoreSpec | GenerateSpec) -> str:
    """The probe configuration of ``spec``: sha256 of its JSON without the RUN_FIELDS."""
    return config_hash_of(spec.model_dump(mode="json"))


def config_hash_of(spec_json: Mapping[str, Any]) -> str:
    """:func:`config_hash` of a spec already dumped (``model_dump(mode="json")``)."""
    data = {k: v for k, v in spec_json.items() if k not in RUN_FIELDS}
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def output_hash(sequences: Iterable[SequenceResult]) -> str:
    """sha256 of the output tokens of each sequence, in order: each token's id, or its
    text where the id is unknown (OpenAI tokens when the worker lacks the model's
    tiktoken encoding), so that different texts never share a hash (migration 0009)."""
    keys = [[t.token if t.token_id is None else t.token_id for t in seq.tokens]
            for seq in sequences]
    # surrogatepass: a lone surrogate from a server's broken escape hashes too.
    return hashlib.sha256(canonical_json(keys).encode("utf-8", "surrogatepass")).hexdigest()


def report_query(*, config_hash: str | None = None, model: str | None = None,
                 kind: str | None = None) -> tuple[str, dict[str, Any]]:
    """A SELECT on the report view with optional filters (bound parameters)."""
    where, params = [], {}
    for column, value in (("config_hash", config_hash), ("model", model), ("kind", kind)):
        if value is not None:
            where.append(f"{column} = :{column}")
            params[column] = value
    query = f"SELECT * FROM {REPORT_VIEW}"
    if where:
        query += " WHERE " + " AND ".join(where)
    return query + " ORDER BY first_submitted", params


def report(client: Any, **filters: str | None) -> pd.DataFrame:
    """The determinism report as a DataFrame (see :func:`report_query` for filters)."""
    query, params = report_query(**filters)
    return client.sql(query, params)
