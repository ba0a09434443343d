"""Outputs too big for SQL rows: write them to the artifact store, keep a reference."""

from __future__ import annotations

import logging

from api_client.artifacts import LOGITS_DIR, ArtifactStore

from .backends.base import ProbeOutput

log = logging.getLogger(__name__)


def write_logits(output: ProbeOutput, job_id: str,
                 store: ArtifactStore) -> ProbeOutput | Exception:
    """Store ``output.logits`` as ``logits/<job_id>.safetensors``; its row joins
    ``output.artifacts``. Returns the error instead if the store cannot be written."""
    try:
        ref = store.put_array(LOGITS_DIR, "logits", output.logits, filename=job_id)
    except Exception as exc:  # the job fails; the worker keeps serving
        log.warning("could not store the logits of job %s: %s", job_id, exc)
        return exc
    output.logits = None
    output.artifacts.append({"name": "logits", "uri": ref.uri, "sha256": ref.sha256,
                             "shape": list(ref.shape), "dtype": ref.dtype,
                             "num_bytes": ref.num_bytes})
    return output
