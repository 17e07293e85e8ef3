"""megadoc-megatron: synthetic-data pre-training (rephrases and megadocs) on megatron-core."""

__version__ = "0.1.0"
