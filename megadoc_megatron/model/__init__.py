"""Llama-style GPT on megatron-core: size presets (presets.py, no torch), the model with its
layer specs, Transformer Engine or portable (gpt.py), and the model of a training config (build.py)."""
