#!/usr/bin/env bash
# The tiny CPU example, end to end: real text this machine already has (Python's standard-library
# docstrings) -> rephrases and rationales from SmolLM2-135M-Instruct -> simple, stitched and
# stretched megadocs -> Megatron datasets and blends -> tiny GPTs on megatron-core -> i.i.d. and
# long-context losses -> report (table and plots). Outputs go to $WORK (default examples/tiny_cpu/work);
# extra arguments go to `megadoc run` (e.g. --dry-run, --recipes real stitch_g2), or with `sweep`
# first, to `megadoc sweep` (e.g. `run.sh sweep --execute local`).
# Other examples run through this script with their own EXPERIMENT (config) and CORPUS_FLAGS (of
# make_corpus.py; examples/gpu_demo/run.sh); PYTHON is the interpreter (default: python, else python3).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mkdir -p "${WORK:-$here/work}" && cd "${WORK:-$here/work}" && pwd)
python=${PYTHON:-$(command -v python || command -v python3)}
# The console script may not be on PATH yet (e.g. before a pyenv rehash): same code either way.
command -v megadoc >/dev/null || megadoc() { "$python" -m megadoc_megatron.cli "$@"; }

# shellcheck disable=SC2086  # CORPUS_FLAGS holds several flags
"$python" "$here/make_corpus.py" --output-dir "$work/corpus" ${CORPUS_FLAGS:---max-chars 1500 --heldout-fraction 0.3 \
  --max-train-documents ${TRAIN_DOCUMENTS:-24} --long-min-chars 2000}
command=run
if [[ "${1:-}" == sweep ]]; then command=sweep; shift; fi
megadoc "$command" "${EXPERIMENT:-$here/experiment.yaml}" --set work_dir="$work" \
  --set corpus.train="$work/corpus/train.jsonl" --set corpus.heldout="$work/corpus/heldout.jsonl" \
  --set corpus.long_heldout="$work/corpus/heldout_long.jsonl" --set tokenizer.model="$work/corpus/tokenizer.model" "$@"
