"""Stopping a running ``generate`` cooperatively: cancel flag and time limit.

``transformers`` calls every stopping criterion once per decoding step; this one
reports the step count as progress and asks the job's control whether to stop,
which reads an event and the clock only (Redis is polled by the control's
monitor thread). So a cancelled generation stops at the next step, and never by
killing a process.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..control import JobControl


class JobStoppingCriteria(StoppingCriteria):
    """Stop every sequence once the job is cancelled or out of time."""

    def __init__(self, control: JobControl, prompt_length: int) -> None:
        self.control = control
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.control.advance(int(input_ids.shape[1]) - self.prompt_length)
        stop = self.control.should_stop()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool,
                          device=input_ids.device)  # type: ignore[return-value]


def job_stopping_criteria(control: JobControl | None, prompt_length: int,
                          max_new_tokens: int) -> StoppingCriteriaList | None:
    """The criteria to pass to ``generate`` for the job of ``control`` (None: no job)."""
    if control is None:
        return None
    control.begin(max_new_tokens, "tokens")
    return StoppingCriteriaList([JobStoppingCriteria(control, prompt_length)])
