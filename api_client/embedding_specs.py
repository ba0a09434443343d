"""Embedding inputs: feed ``inputs_embeds`` to a model instead of token ids.

An :data:`EmbeddingInput` is part of a probe spec (``ScoreSpec.embedding``,
``GenerateSpec.embedding``) and says where the ``[seq, hidden]`` input embedding
comes from. Only small JSON travels with the job:

- ``source="artifact"``: an array the client uploaded to the artifact store
  (``Client.upload_embedding``); the job carries its URI, sha256, shape and dtype,
  and the worker checks all four (and finiteness) before running.
- ``source="noise"``: the token embeddings of ``text`` plus Gaussian noise,
  ``E(text) + scale * randn(E.shape, generator=Generator().manual_seed(seed))``
  drawn in float32 on the CPU, so the same seed and scale rebuild the same input.
- ``source="interpolate"``: ``(1 - weight) * E(text_a) + weight * E(text_b)``;
  both texts must encode to the same number of tokens (the worker refuses
  otherwise, naming both lengths).

``E(text)`` is the model's input embedding layer applied to the text's token ids,
tokenized as the probe kind tokenizes text (``add_special_tokens=False`` for
score probes, the tokenizer's default for generate prompts).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Array dtypes an uploaded embedding may have (cast to the model's dtype by the worker).
EmbeddingDType = Literal["float16", "float32", "float64"]


class _EmbeddingBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArtifactEmbedding(_EmbeddingBase):
    """An uploaded ``[seq, hidden]`` array, stored as safetensors in the artifact store."""

    source: Literal["artifact"] = "artifact"
    uri: str = Field(min_length=1, description="where the safetensors file lives")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the file's bytes")
    shape: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = Field(
        description="[seq, hidden]"
    )
    dtype: EmbeddingDType


class NoiseEmbedding(_EmbeddingBase):
    """``text``'s own token embeddings plus ``scale`` times seeded standard normal noise."""

    source: Literal["noise"] = "noise"
    text: str = Field(min_length=1)
    scale: float = Field(default=0.0, ge=0, le=1e6)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)


class InterpolateEmbedding(_EmbeddingBase):
    """``(1 - weight) * E(text_a) + weight * E(text_b)``; equal token counts required."""

    source: Literal["interpolate"] = "interpolate"
    text_a: str = Field(min_length=1)
    text_b: str = Field(min_length=1)
    weight: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def check_finite_weight(self) -> InterpolateEmbedding:
        if self.weight != self.weight:  # NaN passes ge/le in some pydantic versions
            raise ValueError("weight must be a number between 0 and 1")
        return self


EmbeddingInput = Annotated[
    ArtifactEmbedding | NoiseEmbedding | InterpolateEmbedding, Field(discriminator="source")
]
AnyEmbedding = ArtifactEmbedding | NoiseEmbedding | InterpolateEmbedding

#: Element types the full-logits artifact may be stored in.
LogitsDType = Literal["float32", "float16"]
