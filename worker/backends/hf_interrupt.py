"""Stopping a forward pass between layers when its jobs are cancelled or out of time.

A score probe is one forward pass, and a long text on a big model on a CPU takes
minutes of it; generation's prompt is one too. :func:`install_layer_checks` puts a
pre-hook on every decoder layer of a loaded model; while a backend runs jobs inside
:func:`stop_when`, each layer first asks whether *all* of those jobs should stop
(cancelled, or past their time limit) and if so raises :class:`JobStopped`, which
the runner stores as a cancelled or timed-out job with no rows. Outside
:func:`stop_when` the hooks do nothing. A check reads an event and the clock (the
monitor thread does the Redis work): a few microseconds a layer.

A batch stops only when every job in it should: one cancelled probe of a batch of
64 does not throw away the other 63 (it finishes and is stored, as before).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from ..control import JobControl, JobStopped

#: What a stopped forward pass was doing (``JobStopped.when``).
DURING_FORWARD = "during its forward pass"

_check: ContextVar[Callable[[], bool] | None] = ContextVar("logprobe_layer_check",
                                                            default=None)


def _before_layer(_module: torch.nn.Module, _args: Any) -> None:
    check = _check.get()
    if check is not None and check():
        raise JobStopped(DURING_FORWARD)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder blocks: the ModuleList with one entry per hidden layer."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if not count:
        return []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return list(module)
    return []


def install_layer_checks(model: torch.nn.Module) -> int:
    """Hook every decoder layer of ``model``; returns how many were hooked."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.register_forward_pre_hook(_before_layer)
    return len(layers)


def all_should_stop(controls: Sequence[JobControl | None]) -> Callable[[], bool]:
    """A check that is true once every job of ``controls`` should stop; it then sets
    each job's ``stop_reason`` (jobs run outside a worker, with no control, never stop)."""
    watched = [c for c in controls if c is not None]

    def check() -> bool:
        if len(watched) < len(controls) or not all(c.stop_requested() for c in watched):
            return False
        for control in watched:
            control.should_stop()
        return True

    return check


@contextmanager
def stop_when(check: Callable[[], bool]) -> Iterator[None]:
    """Forward passes inside the block stop at the next layer once ``check()`` is true."""
    token = _check.set(check)
    try:
        yield
    finally:
        _check.reset(token)
