"""The paper's Llama-style model sizes, their parameter count and the vocabulary padding: plain
arithmetic, importable without torch (launch checks, reports)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelPreset:
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int


# The paper's Llama-style sizes (METHOD.md), plus a tiny one for CPU tests and demos.
PRESETS = {
    "tiny": ModelPreset(64, 176, 2, 4, 2),
    "150M": ModelPreset(512, 1792, 6, 8, 8),
    "300M": ModelPreset(768, 2688, 12, 12, 12),
    "600M": ModelPreset(1024, 3584, 24, 16, 8),
    "1.5B": ModelPreset(1536, 5376, 36, 16, 8),
}


def parameter_count(shape, vocab_size: int) -> int:
    """Parameters of the Llama-style model (untied input/output embeddings, no biases) of a preset,
    or of any shape with its fields plus optional `kv_channels` and `gated_linear_unit` overrides."""
    hidden, heads = shape.hidden_size, shape.num_attention_heads
    kv_channels = getattr(shape, "kv_channels", None) or hidden // heads
    query, key_value = kv_channels * heads, kv_channels * (shape.num_query_groups or heads)
    attention = hidden * (query + 2 * key_value) + query * hidden
    mlp = (3 if getattr(shape, "gated_linear_unit", True) else 2) * hidden * shape.ffn_hidden_size
    norms = 2 * hidden
    return shape.num_layers * (attention + mlp + norms) + hidden + 2 * vocab_size * hidden


def padded_vocab_size(vocab_size: int, divisible_by: int = 128) -> int:
    """The vocabulary padded to a multiple of 128. Unlike Megatron-LM (128 x tensor-parallel size)
    the padding does not depend on the layout, so a checkpoint resumes under any tensor-parallel
    size (any power of two up to 128 divides it) with the same logits."""
    return math.ceil(vocab_size / divisible_by) * divisible_by
