"""Result reuse: which probes are identical, and when an identical result may be reused.

Two jobs are identical when their specs are equal (less the ``reuse`` flag
itself) and they ran on the same resolved model revision, dtype, seed, device
(CPU or GPU model) and deterministic setting. The client stores :func:`spec_hash`
on every job row (``jobs.spec_hash``) so the worker finds an identical finished job
with one indexed query; the revision, dtype, device and determinism are known only
to the worker. ``client.repeat`` submits with ``reuse=False``: its runs are meant
to be computed again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from .determinism import canonical_json
from .specs import GenerateSpec, ScoreSpec


def spec_hash(spec: ScoreSpec | GenerateSpec) -> str:
    """sha256 of the spec's canonical JSON, without the ``reuse`` flag."""
    return spec_hash_of(spec.model_dump(mode="json"))


def spec_hash_of(spec_json: Mapping[str, Any]) -> str:
    """:func:`spec_hash` of a spec already dumped (``model_dump(mode="json")``)."""
    data = {k: v for k, v in spec_json.items() if k != "reuse"}
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def reuse_allowed(spec: ScoreSpec | GenerateSpec) -> bool:
    """The spec's ``reuse`` flag, or the default: on unless the probe samples unseeded.

    Score probes, greedy generation and seeded sampling give the same answer every
    time they run on the same model, revision, dtype and settings; an unseeded
    sample is meant to be a fresh draw, so it is recomputed unless ``reuse=True``.
    """
    if spec.reuse is not None:
        return spec.reuse
    if isinstance(spec, GenerateSpec) and spec.do_sample:
        return spec.seed is not None
    return True
