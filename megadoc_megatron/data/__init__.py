"""Tokenizers, Megatron indexed datasets, and the JSONL-to-dataset converter."""
