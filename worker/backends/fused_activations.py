"""Fused kernels in place of activation functions that transformers writes as Python math.

GPT-2 (and GPT-J, GPT-Neo, CodeGen, ...) use ``gelu_new``: the tanh approximation
of GELU written as seven elementwise torch operations, each a pass over the
[tokens, 4 x hidden] activations. ``torch.nn.functional.gelu(x, approximate="tanh")``
is the same function in one pass (transformers ships it as ``GELUTanh``, "equivalent
to NewGELU and FastGELU ... not an exact numerical match due to rounding errors").
On a 2-core CPU it makes a GPT-2 124M scoring pass 1.05-1.16x faster (3.50 -> 2.93 s
for 64 paragraphs in one comparison); logprobs move by float32 rounding (at most
2.7e-5 on logprobs of about -11 through 12 random layers, 2e-6 typically).

Only modules of exactly these classes, with no hooks on them (accelerate's
placement, user hooks), are replaced, so a model whose activation differs in any
way keeps its own; and only in float32 models. In float16 and bfloat16 the stock
module rounds after each of its seven operations and the kernel once, which moves a
tiny GPT-2's logprobs by up to 4e-3 (bfloat16) and 5e-2 (float16) and changes
sampled tokens: the results would no longer be the Hugging Face model's.
"""

from __future__ import annotations

import torch
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

#: Activation classes computing ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``
#: in Python operations.
PYTHON_TANH_GELU = (NewGELUActivation, FastGELUActivation)


def use_fused_activations(model: torch.nn.Module) -> int:
    """Replace every Python tanh-GELU submodule of a float32 ``model`` by the fused
    kernel. Returns how many were replaced (none in a model of another dtype)."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) in PYTHON_TANH_GELU and not child._forward_hooks
                    and not child._forward_pre_hooks and not hasattr(child, "_hf_hook")):
                setattr(parent, name, GELUTanh())
                replaced += 1
    return replaced
