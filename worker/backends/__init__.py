"""Backends by name, imported lazily so that ``import worker`` does not import torch."""

from __future__ import annotations

import importlib
import threading
from typing import Any

from .base import Backend, ProbeOutput

#: name -> "module:class"
BACKENDS = {
    "hf": "worker.backends.hf:HFBackend",
    "openai": "worker.backends.openai_backend:OpenAIBackend",
}

_instances: dict[str, Backend] = {}
_lock = threading.Lock()  # the openai worker runs tasks in threads


def get_backend(name: str, **options: Any) -> Backend:
    """The process-wide instance of backend ``name`` (created on first use)."""
    with _lock:
        return _get_backend(name, **options)


def _get_backend(name: str, **options: Any) -> Backend:
    if name not in _instances:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
        module_name, class_name = BACKENDS[name].split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        _instances[name] = cls(**options)
    return _instances[name]


__all__ = ["BACKENDS", "Backend", "ProbeOutput", "get_backend"]
