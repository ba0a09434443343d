"""Input embeddings for HF probes: build them from a spec, or load and verify an upload.

Every source yields a ``[1, seq, hidden]`` tensor in the model's dtype and device:
- ``artifact``: the uploaded safetensors file, checked against the spec (sha256,
  dtype, shape) and the model (hidden size, context length), and for NaN/inf;
- ``noise``: ``E(text) + scale * randn`` with a CPU float32 generator seeded by
  ``seed`` (rebuildable from the job's spec);
- ``interpolate``: ``(1 - weight) * E(text_a) + weight * E(text_b)``, in float32,
  for texts with equal token counts.
Every mismatch raises :class:`ProbeInputError` naming the field and what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from api_client.artifacts import ArtifactStore, decode, read_bytes, sha256_hex
from api_client.embedding_specs import (
    AnyEmbedding,
    ArtifactEmbedding,
    InterpolateEmbedding,
    NoiseEmbedding,
)
from api_client.errors import ProbeInputError
from api_client.settings import Settings

from .hf_common import check_ids
from .hf_models import LoadedModel

ProbeKind = Literal["score", "generate"]


@dataclass
class BuiltEmbedding:
    """An input embedding ready for ``model(inputs_embeds=...)``."""

    embeds: torch.Tensor  # [1, seq, hidden], model dtype, model device
    ids: list[int] | None = None  # the token ids it was built from (noise source)
    artifacts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return int(self.embeds.shape[1])


def hidden_size(lm: LoadedModel) -> int:
    return int(lm.model.get_input_embeddings().weight.shape[1])


def text_ids(lm: LoadedModel, text: str, kind: ProbeKind, what: str) -> list[int]:
    """Token ids of ``text`` as the probe kind tokenizes text (see ``hf_score``/``hf_generate``)."""
    if kind == "score":
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = lm.tokenizer(text)["input_ids"]
    if not ids:
        raise ProbeInputError(f"embedding.{what} encodes to no tokens; pass a non-empty text")
    check_ids(lm, ids, f"embedding.{what}")
    return list(ids)


def token_embeddings(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    """``E(ids)``: the input embedding layer applied to ``ids``, as float32 on the CPU."""
    with torch.inference_mode():
        table = lm.model.get_input_embeddings()
        return table(torch.tensor(ids, device=lm.device)).float().cpu()


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise from a CPU generator seeded with ``seed`` (float32)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _values(count: int) -> str:
    return "1 value overflows" if count == 1 else f"{count} values overflow"


def _to_model(lm: LoadedModel, values: torch.Tensor) -> torch.Tensor:
    """``values`` ([seq, hidden]) as the model's ``[1, seq, hidden]`` input; refused
    where they overflow the model's dtype (float16 holds at most 65,504)."""
    cast = values.to(dtype=lm.model.dtype)
    overflow = ~torch.isfinite(cast)
    if overflow.any():
        raise ProbeInputError(
            f"embedding: {_values(int(overflow.sum()))} {lm.dtype}, the model's "
            f"dtype (|x| at most {torch.finfo(cast.dtype).max:g}; the first at position "
            f"{int(overflow.nonzero()[0, 0])}); scale them down or load the model with "
            "dtype='bfloat16' or 'float32'"
        )
    return cast.to(device=lm.device).unsqueeze(0)


def build_embedding(lm: LoadedModel, spec: AnyEmbedding, kind: ProbeKind,
                    extra_positions: int = 0) -> BuiltEmbedding:
    """The embedding ``spec`` describes, checked against the model.

    ``extra_positions``: positions the probe adds (``max_new_tokens``) that must
    fit the context too.
    """
    if isinstance(spec, ArtifactEmbedding):
        built = load_artifact_embedding(lm, spec)
    elif isinstance(spec, NoiseEmbedding):
        ids = text_ids(lm, spec.text, kind, "text")
        base = token_embeddings(lm, ids)
        values = base + spec.scale * seeded_noise(tuple(base.shape), spec.seed)
        built = BuiltEmbedding(_to_model(lm, values), ids=ids)
    else:
        built = interpolate(lm, spec, kind)
    check_context(lm, built.length, extra_positions)
    return built


def interpolate(lm: LoadedModel, spec: InterpolateEmbedding, kind: ProbeKind) -> BuiltEmbedding:
    ids_a = text_ids(lm, spec.text_a, kind, "text_a")
    ids_b = text_ids(lm, spec.text_b, kind, "text_b")
    if len(ids_a) != len(ids_b):
        raise ProbeInputError(
            f"embedding: text_a encodes to {len(ids_a)} tokens and text_b to {len(ids_b)}; "
            "interpolation is position by position and needs texts with the same number "
            "of tokens"
        )
    a, b = token_embeddings(lm, ids_a), token_embeddings(lm, ids_b)
    return BuiltEmbedding(_to_model(lm, (1.0 - spec.weight) * a + spec.weight * b))


def check_context(lm: LoadedModel, length: int, extra: int) -> None:
    if lm.context_length is not None and length + extra > lm.context_length:
        needed = f"{length} positions" + (f" + max_new_tokens {extra}" if extra else "")
        raise ProbeInputError(
            f"embedding: needs {needed}, more than the {lm.context_length}-token context "
            f"of {lm.name!r}; shorten it" + (" or lower max_new_tokens" if extra else "")
        )


def load_artifact_embedding(lm: LoadedModel, spec: ArtifactEmbedding) -> BuiltEmbedding:
    """Fetch an uploaded embedding and check it against its spec and the model."""
    store = ArtifactStore.from_settings(Settings.from_env())
    if not store.contains(spec.uri):
        raise ProbeInputError(
            f"embedding: uri {spec.uri} is outside this worker's artifact store "
            f"({store.url}); upload with Client.upload_embedding and give clients and "
            "workers the same LOGPROBE_ARTIFACTS_URL"
        )
    data = read_bytes(spec.uri)
    digest = sha256_hex(data)
    if digest != spec.sha256:
        raise ProbeInputError(
            f"embedding: sha256 mismatch: the file at {spec.uri} has sha256 {digest}, the "
            f"spec says {spec.sha256}; the file changed after upload, upload it again"
        )
    arrays = decode(data)
    if len(arrays) != 1:
        raise ProbeInputError(
            f"embedding: the file holds {len(arrays)} tensors ({', '.join(sorted(arrays))}); "
            "upload exactly one [seq, hidden] array"
        )
    values = next(iter(arrays.values()))
    if str(values.dtype) != spec.dtype:
        raise ProbeInputError(
            f"embedding: dtype mismatch: the file holds {values.dtype}, the spec says "
            f"dtype={spec.dtype!r}; upload a float16/float32/float64 array with "
            "Client.upload_embedding, which records the right dtype"
        )
    if values.ndim == 3 and values.shape[0] == 1:
        values = values[0]
    if tuple(values.shape) != tuple(spec.shape):
        raise ProbeInputError(
            f"embedding: shape mismatch: the file holds {list(values.shape)}, the spec says "
            f"shape={list(spec.shape)}"
        )
    hidden = hidden_size(lm)
    if values.shape[1] != hidden:
        raise ProbeInputError(
            f"embedding: hidden size mismatch: the array is [seq={values.shape[0]}, "
            f"hidden={values.shape[1]}] but {lm.name!r} has hidden size {hidden}; pass "
            f"[seq, {hidden}]"
        )
    finite = np.isfinite(values)
    if not finite.all():
        position = int(np.argwhere(~finite)[0][0])
        raise ProbeInputError(
            f"embedding: {int((~finite).sum())} values are NaN or infinite (the first at "
            f"position {position}); pass finite values"
        )
    tensor = torch.from_numpy(values.astype(np.float32, copy=True))
    row = {"name": "input_embeds", "uri": spec.uri, "sha256": digest,
           "shape": list(values.shape), "dtype": str(values.dtype), "num_bytes": len(data)}
    return BuiltEmbedding(_to_model(lm, tensor), artifacts=[row])
