"""`megadoc blend`: weights that realize a mixing weight and exact epochs (weights.py), and
megatron-core's datasets drawn from them (datasets.py)."""
