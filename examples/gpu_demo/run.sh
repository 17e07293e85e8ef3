#!/usr/bin/env bash
# The GPU demo, end to end on one GPU: the CPU demo's pipeline (examples/tiny_cpu/run.sh) on 120
# standard-library docstrings with experiment.yaml beside this script. Outputs go to $WORK (default
# examples/gpu_demo/work); TRAIN_DOCUMENTS changes the number of training documents; extra arguments
# go to `megadoc run` (e.g. --dry-run --tokens-per-second 1500 --mfu 0.03).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export WORK=${WORK:-$here/work} EXPERIMENT=$here/experiment.yaml
export CORPUS_FLAGS="--max-chars 4000 --heldout-fraction 0.25 --max-train-documents ${TRAIN_DOCUMENTS:-120} \
--long-min-chars 4000"
exec bash "$here/../tiny_cpu/run.sh" "$@"
