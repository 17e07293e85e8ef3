"""Llama-style GPT on megatron-core: size presets (presets.py, no torch), the model with its
layer specs, Transformer Engine or portable (gpt.py), and the model of a training config (build.py)."""

import importlib.util


def transformer_engine_available() -> bool:
    """Whether Transformer Engine is installed (found without importing it, or torch: launch checks)."""
    return importlib.util.find_spec("transformer_engine") is not None
