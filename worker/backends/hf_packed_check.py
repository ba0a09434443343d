"""Forward passes that skip transformers' check for packed sequences (a GPU wait).

Given no attention mask and no cache, transformers 5.x checks the position ids it
passes to its mask builder for several sequences packed into one row
(``masking_utils.find_packed_sequence_indices``), with a host-side ``.all()``: on a
GPU, a wait for all the work queued before. The packed scoring path
(``hf_batch_logprobs.head_only_logits``) runs the base model that way, with ids and
nothing else, so transformers numbers every row's positions from 0 itself: one
sequence a row, which is what the check would find (it returns None then). Inside
:func:`without_packed_check` it returns None without looking, so queuing batch i + 1
no longer waits for batch i's forward pass to end. Everywhere else (other threads,
other calls) the check runs as before: the switch is a context variable.

If transformers has no such function (another version), nothing is patched and the
check, if any, runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_SKIP: ContextVar[bool] = ContextVar("logprobe_skip_packed_check", default=False)
#: transformers' own check, once :func:`_install` wrapped it (None before, or if absent).
_original: Callable[[Any], Any] | None = None
_install_lock = threading.Lock()


def _find_packed_sequence_indices(position_ids: Any) -> Any:
    """transformers' check, except inside :func:`without_packed_check`."""
    if _SKIP.get() or _original is None:
        return None
    return _original(position_ids)


def _install() -> None:
    """Put :func:`_find_packed_sequence_indices` in transformers' place, once."""
    global _original
    with _install_lock:
        if _original is not None:
            return
        try:
            from transformers import masking_utils
        except ImportError:
            return
        original = getattr(masking_utils, "find_packed_sequence_indices", None)
        if original is None or original is _find_packed_sequence_indices:
            return
        _original = original
        masking_utils.find_packed_sequence_indices = _find_packed_sequence_indices


@contextmanager
def without_packed_check() -> Iterator[None]:
    """Forward passes in this block (this thread) take every row as one sequence
    numbered from 0: only for calls that pass neither position ids nor a mask."""
    _install()
    token = _SKIP.set(True)
    try:
        yield
    finally:
        _SKIP.reset(token)
