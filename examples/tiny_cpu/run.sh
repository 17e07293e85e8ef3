#!/usr/bin/env bash
# The tiny CPU example: real text this machine already has (Python's standard-library
# docstrings) -> tokenizer -> Megatron indexed datasets -> a look inside.
# The later stages (synthesis, megadocs, blending, training, evaluation) join as they land.
# Outputs go to $WORK (default examples/tiny_cpu/work).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${WORK:-$here/work}
mkdir -p "$work/data"
# The console script may not be on PATH yet (e.g. before a pyenv rehash): same code either way.
command -v megadoc >/dev/null || megadoc() { python -m megadoc_megatron.cli "$@"; }

python "$here/make_corpus.py" --output-dir "$work"
for split in train heldout; do
  megadoc preprocess --input "$work/$split.jsonl" --output-prefix "$work/data/$split" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$work/tokenizer.model" --append-eod --workers 2
done
megadoc inspect "$work/data/train_text_document" --document 0 --max-chars 400
