"""Per-process worker options, from the environment that ``python -m worker`` sets."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_on(name: str) -> bool:
    """A flag that is on unless set to 0/false/no/off."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class WorkerOptions:
    max_models: int = 1
    max_attempts: int = 3
    deterministic: bool = False
    #: Fused kernels for activations transformers writes in Python (GPT-2's GELU).
    fused_activations: bool = True
    #: Store each finished batch's results on a second thread while the backend
    #: computes the next (runner.EarlyStore); off: all of a message's at its end.
    store_while_computing: bool = True

    @classmethod
    def from_env(cls) -> WorkerOptions:
        return cls(
            max_models=int(os.environ.get("LOGPROBE_MAX_MODELS", "1")),
            max_attempts=int(os.environ.get("LOGPROBE_MAX_ATTEMPTS", "3")),
            deterministic=_env_flag("LOGPROBE_DETERMINISTIC"),
            fused_activations=_env_on("LOGPROBE_FUSED_ACTIVATIONS"),
            store_while_computing=_env_on("LOGPROBE_STORE_WHILE_COMPUTING"),
        )
