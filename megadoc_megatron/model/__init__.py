"""Llama-style GPT on megatron-core: size presets (presets.py, no torch) and the model with its
layer specs, Transformer Engine or portable (gpt.py)."""
