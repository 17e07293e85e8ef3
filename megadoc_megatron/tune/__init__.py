"""`megadoc synth tune`: GRPO tuning of a generator on weighted rewards (grpo.py, rewards.py), the refresh
rounds of `megadoc run`."""
