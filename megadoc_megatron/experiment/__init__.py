"""`megadoc run` and `megadoc sweep`: the whole method from one YAML experiment config."""
