"""Loading Hugging Face causal LMs once per worker process, and keeping a few loaded.

Models load lazily, in the process that runs tasks (never in a prefork parent,
so CUDA is never initialised before a fork). A small LRU cache keeps the most
recently used models; evicting one frees its memory.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import logging
import os
import platform
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerBase,
)

from api_client.errors import ModelLoadError

from .fused_activations import use_fused_activations
from .hf_interrupt import install_layer_checks

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def auto_device() -> str:
    """CUDA if there is one, else Apple MPS, else the CPU."""
    if torch.cuda.is_available():
        return "cuda:0"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def normalize_device(device: str | None) -> str:
    if device is None:
        return auto_device()
    return "cuda:0" if device == "cuda" else device


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return _cpu_name()


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def directory_revision(path: Path) -> str:
    """A content hash of a local model directory: every file's name and bytes."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


@dataclass
class LoadedModel:
    """A model ready to serve, with what a job row records about it."""

    name: str
    model: Any  # a transformers PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    revision: str | None
    dtype: str
    context_length: int | None
    vocab_size: int
    #: Where the weights are when they span devices (device_map="auto"), e.g.
    #: "auto:cuda:0+cuda:1"; None when the whole model is on ``device``.
    placement: str | None = None
    #: Every token id that ends a generated sequence (:func:`stop_token_ids`).
    stop_token_ids: tuple[int, ...] = ()

    @property
    def bos_token_id(self) -> int | None:
        for candidate in (
            self.tokenizer.bos_token_id,
            getattr(self.model.config, "bos_token_id", None),
            self.tokenizer.eos_token_id,
        ):
            if candidate is not None:
                return int(candidate)
        return None

    @property
    def eos_token_id(self) -> int | None:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return None if eos is None else int(eos)

    @cached_property
    def fixed_provenance(self) -> dict[str, Any]:
        """What :meth:`provenance` records that cannot change while the model is loaded
        (looked up once: package metadata and the CPU name are slow to read)."""
        return {
            "model_revision": self.revision,
            "dtype": self.dtype,
            "device": (self.placement or str(self.device))[:32],
            "device_name": device_name(self.device),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "openai_version": _package_version("openai"),
        }

    def provenance(self) -> dict[str, Any]:
        return {
            **self.fixed_provenance,
            "deterministic": torch.are_deterministic_algorithms_enabled(),
        }


def _hf_token() -> str | None:
    """A Hugging Face token for gated models, from the worker's environment only."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def _without_token(text: str) -> str:
    """``text`` with the Hugging Face token (if any) blanked out: it is never stored."""
    token = _hf_token()
    return text.replace(token, "***") if token else text


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def stop_token_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The ids that end generation, as ``model.generate`` stops on them: the model's
    generation config's EOS ids (Llama-3-Instruct lists end-of-text and end-of-turn),
    its config's, and the tokenizer's."""
    generation = getattr(model, "generation_config", None)
    ids = [*_ids(getattr(generation, "eos_token_id", None)),
           *_ids(getattr(model.config, "eos_token_id", None)),
           *_ids(tokenizer.eos_token_id)]
    return tuple(dict.fromkeys(ids))


def load_model(name: str, revision: str | None, dtype: str | None, device: str,
               device_map: str | None = None, *, fused_activations: bool = True) -> LoadedModel:
    """Load ``name`` (a hub name or a local directory) for serving.

    ``fused_activations``: replace Python-written activations by their fused kernels
    (:mod:`.fused_activations`; float32 models only, results equal within float32
    rounding)."""
    torch_dtype = _DTYPES.get(dtype or "float32", "auto")
    local_dir = Path(name).expanduser()
    source = str(local_dir) if local_dir.is_dir() else name
    placement_options: dict[str, Any] = {"device_map": device_map} if device_map else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, token=_hf_token())
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=torch_dtype, token=_hf_token(), **placement_options
        )
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelLoadError(
            f"could not load model {name!r}"
            + (f" at revision {revision!r}" if revision else "")
            + f": {_without_token(str(exc))}. Pass a hub name this worker can download or a "
            "local model directory that `AutoModelForCausalLM.from_pretrained` accepts"
        ) from None
    placement = None
    if device_map:
        # accelerate placed the layers; inputs go where the embeddings are.
        target = model.get_input_embeddings().weight.device
        devices = sorted({str(d) for d in getattr(model, "hf_device_map", {}).values()})
        placement = f"{device_map}:" + "+".join(
            f"cuda:{d}" if d.isdigit() else d for d in devices or [str(target)]
        )
    else:
        target = torch.device(device)
        model.to(target)
    model.eval()
    stop_ids = stop_token_ids(model, tokenizer)
    # generate() fills every option a GenerationConfig leaves unset from the model's
    # generation_config.json (repetition_penalty, no_repeat_ngram_size, min_new_tokens,
    # ...): a probe decodes exactly as its spec says, so the model's file is set aside.
    model.generation_config = GenerationConfig()
    install_layer_checks(model)  # cancel / time limit between layers (hf_interrupt)
    if fused_activations and (replaced := use_fused_activations(model)):
        log.info("%s: %d activations use the fused tanh-GELU kernel", name, replaced)
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    revision_id = getattr(config, "_commit_hash", None) if not local_dir.is_dir() else None
    if revision_id is None and local_dir.is_dir():
        revision_id = directory_revision(local_dir)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        device=target,
        revision=revision_id or revision,
        dtype=str(model.dtype).removeprefix("torch."),
        context_length=int(context) if context else None,
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        placement=placement,
        stop_token_ids=stop_ids,
    )


class ModelCache:
    """The models this worker process keeps loaded, least recently used evicted first.

    Thread-safe: under ``--pool threads`` jobs that ask for a model being loaded wait
    for that one load (two concurrent ``from_pretrained`` calls of one model fail in
    transformers with "Cannot copy out of meta tensor")."""

    def __init__(self, max_models: int = 1, *, fused_activations: bool = True) -> None:
        if max_models < 1:
            raise ValueError("max_models must be at least 1")
        self.max_models = max_models
        self.fused_activations = fused_activations
        self._models: OrderedDict[tuple[str, str | None, str, str], LoadedModel] = OrderedDict()
        self._lock = threading.RLock()

    def get(self, name: str, revision: str | None, dtype: str | None,
            device: str | None, *, device_map: str | None = None) -> LoadedModel:
        key = (name, revision, dtype or "float32",
               f"map:{device_map}" if device_map else normalize_device(device))
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            while len(self._models) >= self.max_models:
                self._evict_oldest()
            log.info("loading model %s (revision=%s, dtype=%s, device=%s; %d CPU threads)",
                     *key, torch.get_num_threads())
            loaded = load_model(name, revision, dtype, key[3], device_map=device_map,
                                fused_activations=self.fused_activations)
            self._models[key] = loaded
            _freeze_heap()
            return loaded

    def _evict_oldest(self) -> None:
        key, loaded = self._models.popitem(last=False)
        log.info("evicting model %s to make room", key[0])
        on_cuda = loaded.device.type == "cuda" or bool(loaded.placement)
        del loaded
        gc.unfreeze()  # so that the collector can reach the evicted model's cycles
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
        if self._models:
            _freeze_heap()

    def clear(self) -> None:
        with self._lock:
            while self._models:
                self._evict_oldest()

    def __len__(self) -> int:
        return len(self._models)


def _freeze_heap() -> None:
    """Collect, then move every object alive now (the loaded models, transformers,
    torch) out of the cyclic collector's sight (``gc.freeze``). Its full passes then
    skip them: a worker allocates many small objects per job, and a full pass over a
    loaded GPT-2 124M's heap took ~200 ms, landing inside some job."""
    gc.collect()
    gc.freeze()
