#!/usr/bin/env python3
"""Does a seeded request give the same text alone as inside a batch? Measured on a real engine.

  python benchmarks/synth_determinism.py [--backend vllm|hf] [--batch 64] [--alone 8] [--max-new-tokens 48]

Generates `--batch` seeded rephrases together, then the first `--alone` of them one at a time,
and the whole batch again; prints how many texts are identical in each comparison, and the first
token where a pair parts ways. vLLM does not promise batch invariance (a batch's shape changes
its kernels' reductions); our resume never regenerates what was written, so either answer is safe.
"""

from __future__ import annotations

import argparse
import itertools
import json

from stdlib_data import stdlib_documents

from megadoc_megatron.synth.backends import HFBackend, Request, Sampling, generate
from megadoc_megatron.synth.default_model import default_model_dir
from megadoc_megatron.synth.prompts import BUILTIN


def first_difference(a: str, b: str) -> int | None:
    words = list(zip(a.split(), b.split()))
    return next((i for i, (x, y) in enumerate(words) if x != y),
                None if len(a.split()) == len(b.split()) else len(words))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("hf", "vllm"), default="vllm")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--alone", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vllm (on CPU: share of RAM)")
    args = parser.parse_args()

    model = str(default_model_dir())
    if args.backend == "vllm":
        from megadoc_megatron.synth.backends import VLLMBackend

        backend = VLLMBackend(model, gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=2048)
    else:
        backend = HFBackend(model, batch_size=args.batch)
    documents = itertools.islice((d for d in stdlib_documents() if 300 <= len(d["text"]) <= 800), args.batch)
    requests = [Request(BUILTIN["wikipedia"].render(document=d["text"]), seed) for seed, d in enumerate(documents)]
    sampling = Sampling(0.7, 0.9, args.max_new_tokens)
    batched = [c.text for c in generate(backend, requests, sampling)]
    again = [c.text for c in generate(backend, requests, sampling)]
    alone = [generate(backend, [request], sampling)[0].text for request in requests[:args.alone]]
    result = {"backend": args.backend, "requests": len(requests), "max_new_tokens": args.max_new_tokens,
              "batch_again_identical": sum(a == b for a, b in zip(batched, again)),
              "alone_identical_to_batched": sum(a == b for a, b in zip(alone, batched)), "alone": len(alone),
              "first_differing_word_alone_vs_batched": [first_difference(a, b) for a, b in zip(alone, batched)]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
