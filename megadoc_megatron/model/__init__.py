"""Llama-style GPT on megatron-core: size presets, layer specs (Transformer Engine or portable), builder."""

from megadoc_megatron.model.gpt import (PRESETS, ModelPreset, build_gpt, document_packing, layer_spec, padded_vocab_size,
                                        parameter_count, transformer_config)

__all__ = ["PRESETS", "ModelPreset", "build_gpt", "document_packing", "layer_spec", "padded_vocab_size", "parameter_count", "transformer_config"]
