"""Probe specs: the wire format of a job.

A spec is validated where it is made (at submit, in the client) and again in the
worker. It is plain JSON on the wire and is stored verbatim in ``jobs.spec``.
Constraints live in the field types; rules that tie fields together are named
validators, so an invalid spec is refused with a message that names the field.
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from typing_extensions import Self

from .embedding_specs import AnyEmbedding, ArtifactEmbedding, EmbeddingInput, LogitsDType
from .errors import SpecError

Backend = Literal["hf", "openai"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
#: Which OpenAI endpoint a probe uses: legacy ``/v1/completions`` or chat completions.
OpenAIApi = Literal["completions", "chat"]

#: The largest number of alternatives stored per position (OpenAI chat allows 20).
MAX_TOP_LOGPROBS = 20
#: Seeds are stored in a signed 64-bit column and fed to torch.manual_seed.
MAX_SEED = 2**63 - 1
#: The most alternatives each OpenAI endpoint returns per position.
OPENAI_MAX_TOP_LOGPROBS = {"completions": 5, "chat": 20}
#: OpenAI's sampling temperature range is 0..2.
OPENAI_MAX_TEMPERATURE = 2.0
#: Longest model name or directory (the ``jobs.model`` column).
MAX_MODEL_LENGTH = 512
#: What a model given as a local directory starts with (else it is a hub name, or a
#: directory relative to where the probe is made if one exists there).
PATH_PREFIXES = ("/", "./", "../", "~")
#: A Hugging Face hub model id: ``name`` or ``owner/name`` (letters, digits, ``-_.``).
HUB_MODEL_ID = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)?")


def is_model_path(model: str) -> bool:
    return model.startswith(PATH_PREFIXES) or model in (".", "..")


def _is_true(value: Any) -> bool:
    """``value`` as the spec's bool field would read it (``"false"`` is False)."""
    try:
        return _BOOL.validate_python(value)
    except ValidationError:
        return False  # the field's own validation says what is wrong


def token_id_list(token_ids: Any) -> list[Any] | None:
    """Token ids as a plain list: from a list, a numpy array or a torch tensor, or a
    tokenizer's ``[1, n]`` batch of one; the spec checks the values."""
    if token_ids is None:
        return None
    if hasattr(token_ids, "tolist"):  # numpy array, torch tensor (duck-typed)
        token_ids = token_ids.tolist()
    ids = list(token_ids) if isinstance(token_ids, Iterable) else token_ids
    if isinstance(ids, list) and len(ids) == 1 and isinstance(ids[0], list):
        ids = ids[0]  # return_tensors="pt"/"np" gives a batch of one
    if isinstance(ids, list):
        return [int(i) if isinstance(i, numbers.Integral) else i for i in ids]
    return ids


class _ProbeBase(BaseModel):
    """What every probe names: where it runs and on which model."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    backend: Backend = "hf"
    model: str = Field(min_length=1, max_length=MAX_MODEL_LENGTH,
                       description="hub name (`gpt2`) or a local model directory")
    revision: str | None = Field(
        default=None, min_length=1, description="hub branch, tag or commit to load"
    )
    dtype: DType | None = Field(default=None, description="weights dtype; float32 when "
                                "left out (hf); None on openai")
    device: str | None = Field(
        default=None,
        pattern=r"^(cpu|mps|cuda(:\d+)?)$",
        description="cpu, mps, cuda or cuda:N; None = the worker picks (cuda, mps, cpu)",
    )
    openai_api: OpenAIApi | None = Field(
        default=None,
        description="backend 'openai' only: 'completions' (/v1/completions, the default) "
        "or 'chat' (chat completions; generate probes only)",
    )
    device_map: Literal["auto"] | None = Field(
        default=None,
        description='"auto": spread a model too big for one GPU over every GPU the worker '
        "sees (then CPU memory), with accelerate; instead of device",
    )
    reuse: bool | None = Field(
        default=None,
        description="answer from an identical finished job's rows instead of recomputing; "
        "None = yes for score, greedy and seeded probes, no for unseeded sampling",
    )

    @model_validator(mode="before")
    @classmethod
    def fill_backend_defaults(cls, data: Any) -> Any:
        """Spell out what an unset option means on its backend (hf: float32 weights;
        openai: the completions endpoint), so a probe that names the default and one
        that leaves it out are the same spec: one ``config_hash``, one ``spec_hash``."""
        if not isinstance(data, dict):
            return data
        backend = data.get("backend") or "hf"
        if backend == "hf" and data.get("dtype") is None:
            return {**data, "dtype": "float32"}
        if backend == "openai" and data.get("openai_api") is None:
            return {**data, "openai_api": "completions"}
        return data

    @field_validator("model")
    @classmethod
    def absolute_model_path(cls, model: str, info: ValidationInfo) -> str:
        """A directory given relative to where the probe is submitted (``./m``, ``~/m``,
        or ``checkpoints/m`` where that directory exists here, as ``from_pretrained``
        reads it) is stored absolute: a worker elsewhere must not read it relative to
        its own working directory, nor take it for a hub name."""
        if is_model_path(model) or (info.data.get("backend", "hf") == "hf"
                                    and Path(model).is_dir()):
            return os.path.abspath(os.path.expanduser(model))
        return model

    @model_validator(mode="after")
    def check_local_model_exists(self) -> _ProbeBase:
        """A model given as a path must exist; a hub name must be one (whether the hub
        has it, the worker finds out)."""
        if is_model_path(self.model):
            if not Path(self.model).is_dir():
                raise ValueError(
                    f"model directory {self.model!r} does not exist; pass an existing "
                    "directory or a hub name such as 'gpt2'"
                )
            if self.revision is not None:
                raise ValueError(
                    f"revision applies to hub models; {self.model!r} is a local directory "
                    "(it has one version); drop revision"
                )
        elif self.backend == "hf" and not HUB_MODEL_ID.fullmatch(self.model):
            raise ValueError(
                f"model {self.model!r} is neither an existing directory nor a hub model id "
                "('gpt2', 'meta-llama/Llama-2-7b-hf': letters, digits, '-', '_', '.'); "
                "check for spaces, or give the directory's path"
            )
        return self

    @model_validator(mode="after")
    def check_device_map(self) -> _ProbeBase:
        if self.device_map is not None and self.device is not None:
            raise ValueError(
                "device_map='auto' places the model itself; drop device, or drop device_map "
                "to run on one device"
            )
        if self.device_map is not None and self.backend != "hf":
            raise ValueError("device_map applies to the 'hf' backend only; drop it")
        return self

    @model_validator(mode="after")
    def check_backend_options(self) -> _ProbeBase:
        if self.backend == "openai" and (self.dtype or self.device or self.revision):
            raise ValueError(
                "dtype, device and revision apply to the 'hf' backend only; drop them "
                "for backend='openai'"
            )
        if self.openai_api is not None and self.backend != "openai":
            raise ValueError("openai_api applies to backend='openai' only; drop it")
        if self.backend == "openai" and self.reuse:
            raise ValueError(
                "reuse applies to backend='hf' only: OpenAI's answers are not reproducible "
                "(its seed is best effort), so every OpenAI probe is sent; drop reuse"
            )
        return self

    def model_copy(self, *, update: Mapping[str, Any] | None = None,
                   deep: bool = False) -> Self:
        """A copy; with ``update``, validated as a new spec (pydantic's own ``model_copy``
        does not validate, so a copy could hold what no spec may hold, and miss the
        defaults its options imply). Raises :class:`SpecError`."""
        if not update:
            return super().model_copy(deep=deep)
        data = self.model_dump()
        if update.get("kind", data.get("kind")) != data.get("kind"):
            raise SpecError(f"kind: a copy of a {type(self).__name__} stays one; make a new "
                            "spec for another kind")
        return parse_spec({**data, **update})  # type: ignore[return-value]

    @model_validator(mode="after")
    def check_openai_limits(self) -> _ProbeBase:
        """What the OpenAI endpoints cannot do is refused at submit, not by the API."""
        if self.backend != "openai":
            return self
        api = self.openai_api or "completions"
        limit = OPENAI_MAX_TOP_LOGPROBS[api]
        if getattr(self, "top_logprobs", 0) > limit:
            raise ValueError(
                f"top_logprobs is at most {limit} on OpenAI {api} "
                f"(got {getattr(self, 'top_logprobs', 0)})"
                + ("; use openai_api='chat' for up to 20" if api == "completions" else "")
            )
        if getattr(self, "kind", None) == "score" and api == "chat":
            raise ValueError("chat completions return no prompt logprobs, so they cannot "
                             "score a text; use openai_api='completions'")
        if getattr(self, "prepend_bos", False):
            raise ValueError("prepend_bos is not available on backend='openai'; put the "
                             "model's end-of-text token id first in token_ids instead")
        if getattr(self, "top_k", None) is not None:
            raise ValueError("top_k is not an OpenAI sampling parameter; use top_p or "
                             "temperature with backend='openai'")
        temperature = getattr(self, "temperature", None)
        if temperature is not None and temperature > OPENAI_MAX_TEMPERATURE:
            raise ValueError(f"temperature is at most {OPENAI_MAX_TEMPERATURE:g} on OpenAI "
                             f"(got {temperature:g})")
        return self

    @model_validator(mode="after")
    def check_tensor_options(self) -> _ProbeBase:
        """Embedding inputs and full logits: hf only; logits options need return_logits."""
        embedding: AnyEmbedding | None = getattr(self, "embedding", None)
        return_logits: bool = getattr(self, "return_logits", False)
        if self.backend != "hf" and (embedding is not None or return_logits):
            raise ValueError(
                "embedding and return_logits need the 'hf' backend (OpenAI serves neither "
                "input embeddings nor full logits); set backend='hf' or drop them"
            )
        if not return_logits and getattr(self, "logits_last_n", None) is not None:
            raise ValueError("logits_last_n only applies with return_logits=True")
        return self


class ScoreSpec(_ProbeBase):
    """Score a text: its loss and the log-probability of every token.

    Exactly one of ``text`` and ``token_ids`` is given. Token *i* gets
    ``log_softmax(logits[i-1])[token_i]``; the first token has no logprob unless
    ``prepend_bos`` puts the BOS token before it. ``loss`` is the mean negative
    logprob of the scored tokens, i.e. ``model(ids, labels=ids).loss``.
    """

    kind: Literal["score"] = "score"
    text: str | None = Field(default=None, min_length=1)
    token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1)
    prepend_bos: bool = Field(
        default=False, description="score the first token too, given the BOS token"
    )
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    embedding: EmbeddingInput | None = Field(
        default=None,
        description="score inputs_embeds instead of text; token_ids are then the optional "
        "target ids (one per position) that logprobs and the loss are computed for",
    )
    return_logits: bool = Field(default=False, description="store the full logits artifact")
    logits_last_n: int | None = Field(default=None, ge=1,
                                      description="store only the last N positions' logits")
    logits_dtype: LogitsDType = "float32"

    @model_validator(mode="after")
    def check_one_input(self) -> ScoreSpec:
        if self.embedding is not None:
            return self._check_embedding_input(self.embedding)
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("give exactly one of text and token_ids")
        if self.token_ids is not None and len(self.token_ids) < 2 and not self.prepend_bos:
            raise ValueError(
                "token_ids has one token, which has nothing before it to be scored "
                "against; pass prepend_bos=True or at least two tokens"
            )
        return self

    def _check_embedding_input(self, embedding: AnyEmbedding) -> ScoreSpec:
        if self.text is not None:
            raise ValueError(
                "give either text or embedding, not both (with an embedding, token_ids "
                "are the optional target ids of its positions)"
            )
        if self.prepend_bos:
            raise ValueError(
                "prepend_bos does not apply to an embedding input; put the BOS token's "
                "embedding into the array instead"
            )
        if (
            isinstance(embedding, ArtifactEmbedding)
            and self.token_ids is not None
            and len(self.token_ids) != embedding.shape[0]
        ):
            raise ValueError(
                f"token_ids has {len(self.token_ids)} ids but the embedding has "
                f"{embedding.shape[0]} positions; give one target id per position"
            )
        return self


class GenerateSpec(_ProbeBase):
    """Continue a prompt; record each generated token's logprob and alternatives.

    Greedy (``do_sample=False``) picks the most likely token; sampling uses
    ``temperature``/``top_k``/``top_p`` and a seed (the worker picks and records
    one when none is given). Logprobs equal
    ``model.compute_transition_scores(..., normalize_logits=True)``.
    """

    kind: Literal["generate"] = "generate"
    prompt: str | None = Field(default=None, min_length=1)
    max_new_tokens: int = Field(default=16, ge=1, le=100_000)
    do_sample: bool = False
    temperature: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    num_return_sequences: int = Field(default=1, ge=1, le=64)
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    embedding: EmbeddingInput | None = Field(
        default=None, description="continue these inputs_embeds instead of a text prompt"
    )
    return_logits: bool = Field(
        default=False, description="store the raw logits of every generation step"
    )
    logits_last_n: int | None = Field(default=None, ge=1,
                                      description="store only the last N steps' logits")
    logits_dtype: LogitsDType = "float32"

    @model_validator(mode="before")
    @classmethod
    def fill_sampling_defaults(cls, data: Any) -> Any:
        """Sampling with temperature and top_p left out is temperature 1.0 (and, on hf,
        top_p 1.0): spelled out, so naming those defaults gives the same spec."""
        if not isinstance(data, dict) or not _is_true(data.get("do_sample")):
            return data
        filled = {**data}
        if filled.get("temperature") is None:
            filled["temperature"] = 1.0
        if (filled.get("backend") or "hf") == "hf" and filled.get("top_p") is None:
            filled["top_p"] = 1.0
        return filled

    @model_validator(mode="after")
    def check_one_prompt(self) -> GenerateSpec:
        if (self.prompt is None) == (self.embedding is None):
            raise ValueError(
                "give exactly one of prompt and embedding (an embedding input replaces "
                "the prompt)"
            )
        return self

    @model_validator(mode="after")
    def check_sampling(self) -> GenerateSpec:
        if not self.do_sample:
            given = [
                name for name in ("temperature", "top_k", "top_p", "seed")
                if getattr(self, name) is not None
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} when "
                    "sampling; set do_sample=True "
                    "or drop them (do_sample=False is greedy decoding)"
                )
            if self.num_return_sequences > 1:
                raise ValueError(
                    "num_return_sequences > 1 needs do_sample=True: greedy decoding "
                    "returns the same sequence every time"
                )
        return self


ProbeSpec = Annotated[ScoreSpec | GenerateSpec, Field(discriminator="kind")]
_BOOL: TypeAdapter[bool] = TypeAdapter(bool)
_PROBE_ADAPTER: TypeAdapter[ScoreSpec | GenerateSpec] = TypeAdapter(ProbeSpec)


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False):
        loc = ".".join(str(p) for p in item["loc"] if p not in ("score", "generate"))
        msg = item["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid probe spec: " + "; ".join(parts)


def parse_spec(data: dict[str, Any] | ScoreSpec | GenerateSpec) -> ScoreSpec | GenerateSpec:
    """Validate a spec given as a dict (wire format) or a spec object (validated when
    it was made, or copied with ``model_copy``; ``model_construct`` skips validation
    by design and is taken as it is).

    Raises :class:`SpecError` naming each offending field.
    """
    if isinstance(data, ScoreSpec | GenerateSpec):
        return data
    try:
        return _PROBE_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise SpecError(_describe(exc)) from None


def make_spec(kind: str, **fields: Any) -> ScoreSpec | GenerateSpec:
    """Build a spec from keyword arguments, with :class:`SpecError` on bad input."""
    return parse_spec({"kind": kind, **{k: v for k, v in fields.items() if v is not None}})
