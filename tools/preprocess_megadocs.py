#!/usr/bin/env python3
"""Megatron-style standalone converter: JSONL -> indexed datasets (same code as `megadoc preprocess`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megadoc_megatron.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(stage="preprocess"))
