"""Cost before compute for `megadoc run CONFIG --dry-run`: GPU-hours of every synth and train stage.

Generation: the plan of `megadoc synth ... --dry-run` (synth/cost.py) for the stage's own command line,
with the generator's tokenizer, priced at --tokens-per-second (output tokens/s per GPU).

Training: FLOPs = 6 N D, with N = all parameters of the model as it will be built (preset and
model.overrides, the training tokenizer's vocabulary padded to 128), embeddings included: input
and output embeddings are untied, as Hoffmann et al. (2022) count them and as the presets are
named; the non-embedding count (Kaplan et al. 2020) is shown beside it. D = iterations x global
batch x sequence length: the blend's iterations once blend.json exists, else a token budget's,
else estimated as `megadoc blend` computes them from the real training tokens (the preprocessed
dataset's, or the corpus tokenized at plan time) and the recipe's E and w. GPU-hours = FLOPs /
(MFU x peak FLOP/s per GPU) / 3600.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

from megadoc_megatron.errors import InputError

DEFAULT_MFU, DEFAULT_GPU_TFLOPS = 0.4, 989.0  # 989: H100 SXM dense BF16
SHAPE_FIELDS = ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                "kv_channels", "gated_linear_unit")
# TransformerConfig fields that add parameters the count below leaves out
UNCOUNTED = ("add_bias_linear", "add_qkv_bias", "qk_layernorm", "normalization", "num_moe_experts",
             "moe_ffn_hidden_size", "multi_latent_attention", "mtp_num_layers")


def model_shape(model) -> SimpleNamespace:
    """The shape of a `train.model` section: its preset with the overrides that change shapes."""
    from megadoc_megatron.model.presets import PRESETS

    if model.preset not in PRESETS:
        raise InputError(f"unknown model preset {model.preset!r}", fix=f"use one of {', '.join(PRESETS)}")
    shape = {**dataclasses.asdict(PRESETS[model.preset]), "kv_channels": None, "gated_linear_unit": True}
    shape.update({k: v for k, v in model.overrides.items() if k in SHAPE_FIELDS})
    return SimpleNamespace(**shape)


def parameter_counts(model, vocab_size: int) -> dict:
    """Parameters of the GPT megatron-core builds: total, non-embedding and embedding (input and output)."""
    from megadoc_megatron.model.presets import padded_vocab_size, parameter_count

    shape, padded = model_shape(model), padded_vocab_size(vocab_size)
    total, embedding = parameter_count(shape, padded), 2 * padded * shape.hidden_size
    return {"total": total, "non_embedding": total - embedding, "embedding": embedding,
            "uncounted_overrides": sorted(k for k in model.overrides if k in UNCOUNTED)}


def real_train_tokens(experiment, plan, tokenizer) -> tuple[int, str]:
    """Tokens of the real training split as `megadoc blend` counts them (EOD after each non-empty
    document): from the preprocessed dataset when it exists, else by tokenizing the corpus."""
    from megadoc_megatron.data.dataset_info import dataset_prefix
    from megadoc_megatron.data.indexed import read_index
    from megadoc_megatron.jsonl import expand_inputs, read_documents

    stage = next(s for s in plan.graph.stages if s.name == "preprocess-train")
    if stage.done:
        prefix = dataset_prefix(stage.folder / "real", experiment.corpus.text_key)
        return int(read_index(prefix).sequence_lengths.sum()), "the preprocessed real dataset"
    texts = [text for _, text in read_documents(expand_inputs([experiment.corpus.train]), experiment.corpus.id_key,
                                                experiment.corpus.text_key)]
    tokens = 0
    for start in range(0, len(texts), 1024):
        tokens += sum(len(ids) + 1 for ids in tokenizer.encode_batch(texts[start:start + 1024]) if ids)
    return tokens, "the corpus tokenized at plan time"


def train_iterations(experiment, recipe, stage, config, real_tokens) -> tuple[int, str, bool]:
    """(iterations, where they come from, whether that is an estimate) of a train stage."""
    from megadoc_megatron.blend.weights import Blend, iterations_for_real_samples, samples_for_epochs

    sequence, batch = experiment.blend.seq_length, experiment.blend.global_batch_size
    blend_file = stage.folder / "blend" / "blend.json"
    if config.train_iters:
        return config.train_iters, "train.train_iters", False
    if blend_file.is_file():
        return Blend.load(blend_file).train_iters, "blend.json", False
    if recipe.train_tokens is not None:
        return math.ceil(recipe.train_tokens / (sequence * batch)), "the token budget", False
    tokens, source = real_tokens()
    if recipe.share < 1:
        tokens, source = round(tokens * recipe.share), f"{recipe.share:g} of {source}"
    samples = samples_for_epochs(tokens, recipe.epochs, sequence)
    return iterations_for_real_samples(samples, recipe.synthetic_weight, batch), f"E and w over {source}", True


def train_cost(experiment, recipe, stage, real_tokens, vocab_size: int, mfu: float, gpu_tflops: float) -> dict:
    from megadoc_megatron.model.presets import padded_vocab_size
    from megadoc_megatron.train.config import config_from_dict
    from megadoc_megatron.train.metrics import training_flops

    config = config_from_dict(json.loads(stage.files["train.yaml"]), experiment.source)
    counts = parameter_counts(config.model, vocab_size)
    iterations, source, estimated = train_iterations(experiment, recipe, stage, config, real_tokens)
    sequence, batch = experiment.blend.seq_length, experiment.blend.global_batch_size
    tokens = iterations * batch * sequence
    flops = 6 * counts["total"] * tokens
    per_gpu = mfu * gpu_tflops * 1e12
    megatron = training_flops(model_shape(config.model), padded_vocab_size(vocab_size), sequence, batch) * iterations
    basis = "upper bound" if recipe.refresh.rounds else "estimate" if estimated else "known"
    hours, done = flops / per_gpu / 3600, iterations if stage.done else _checkpoint_iteration(stage) or 0
    return {"stage": stage.name, "kind": "train", "done": stage.done, "parameters": counts,
            "iterations": iterations, "tokens": tokens, "tokens_basis": basis, "tokens_source": source,
            "flops": flops, "gpu_hours": hours,
            "gpu_hours_left": hours * max(iterations - done, 0) / iterations if done else hours,
            "megatron_flops": megatron, "megatron_gpu_hours": megatron / per_gpu / 3600}


def _checkpoint_iteration(stage) -> int | None:
    from megadoc_megatron.train.checkpoint import latest_iteration

    return latest_iteration(stage.folder / "ckpt")


def synth_cost(stage, parser, base_tokenizer: str, tokens_per_second: float | None, tokenizers: dict) -> dict:
    """The stage's `megadoc synth` command line planned as `--dry-run` would (a tuned generator that is
    not made yet is planned with the tokenizer of the generator it is tuned from)."""
    from megadoc_megatron.synth.backends import load_chat_tokenizer
    from megadoc_megatron.synth.command import build_config, resolve_model
    from megadoc_megatron.synth.cost import add_costs, gpu_hours, plan_synthesis

    args = parser.parse_args(stage.argv(stage.commands[0]))
    if args.model and not Path(args.tokenizer or args.model).is_dir():
        args.tokenizer = base_tokenizer
    _, model_name, folder = resolve_model(args)
    if folder not in tokenizers:
        tokenizers[folder] = load_chat_tokenizer(folder)
    plan = add_costs(plan_synthesis(build_config(args, model_name, folder), tokenizers[folder], args.input,
                                     args.output), tokens_per_second, "--tokens-per-second")
    basis = "estimate" if plan["output_tokens"]["estimate"] is not None else "upper_bound"
    priced = tokens_per_second is not None
    return {"stage": stage.name, "kind": "synth", "done": stage.done, "plan": plan,
            "output_tokens": plan["output_tokens"][basis], "output_basis": basis.replace("_", " "),
            "gpu_hours": gpu_hours(plan["output_tokens"][basis], tokens_per_second) if priced else None,
            "gpu_hours_left": plan["gpu_hours"][basis] if priced else None}


def base_tokenizer(experiment) -> str:
    """The tokenizer folder of the experiment's generator (the one refresh rounds tune from)."""
    from megadoc_megatron.synth.default_model import default_model_dir

    generator = experiment.generator
    return str(generator.get("tokenizer") or generator.get("model") or default_model_dir())


def experiment_costs(experiment, plan, tokens_per_second: float | None = None, mfu: float = DEFAULT_MFU,
                     gpu_tflops: float = DEFAULT_GPU_TFLOPS) -> dict:
    """A row per synth and train stage (or its error), and the totals."""
    from megadoc_megatron.cli import build_parser
    from megadoc_megatron.data.tokenizer import load_tokenizer

    if not 0 < mfu <= 1 or gpu_tflops <= 0 or (tokens_per_second is not None and tokens_per_second <= 0):
        raise InputError("--mfu must lie in (0, 1], --gpu-tflops and --tokens-per-second must be positive",
                         fix="e.g. --mfu 0.4 --gpu-tflops 989 --tokens-per-second 7000")
    from megadoc_megatron.experiment.config import baseline_recipes
    from megadoc_megatron.experiment.plan import run_name

    recipes = {f"train-{run_name(r.name, seed)}{f'-r{n}' if n else ''}": r
               for r in baseline_recipes(experiment) + experiment.recipes for seed in range(experiment.seeds)
               for n in range(r.refresh.rounds + 1)}
    parser, tokenizers, cache = build_parser(), {}, {}

    def training_tokenizer():
        if "training" not in cache:
            cache["training"] = load_tokenizer(experiment.tokenizer.type, experiment.tokenizer.model)
        return cache["training"]

    def real_tokens():
        if "real" not in cache:
            cache["real"] = real_train_tokens(experiment, plan, training_tokenizer())
        return cache["real"]

    rows = []
    for stage in plan.graph.stages:
        try:
            if stage.name.startswith("synth-"):
                rows.append(synth_cost(stage, parser, base_tokenizer(experiment), tokens_per_second, tokenizers))
            elif stage.name in recipes:
                rows.append(train_cost(experiment, recipes[stage.name], stage, real_tokens,
                                       training_tokenizer().vocab_size, mfu, gpu_tflops))
        except InputError as error:
            rows.append({"stage": stage.name, "kind": "synth" if stage.name.startswith("synth-") else "train",
                         "done": stage.done, "error": str(error)})
    return {"rows": rows, "tokens_per_second": tokens_per_second, "mfu": mfu, "gpu_tflops": gpu_tflops,
            "totals": totals(rows)}


def totals(rows: list[dict]) -> dict:
    """GPU-hours per kind and in all, whole and left (None where some row has no figure)."""
    def add(kind: str, key: str):
        values = [r.get(key) for r in rows if kind in (r["kind"], "all")]
        return None if any(v is None for v in values) else sum(values)
    return {kind: {"gpu_hours": add(kind, "gpu_hours"), "gpu_hours_left": add(kind, "gpu_hours_left")}
            for kind in ("synth", "train", "all")}


def _count(value: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:,.0f}"


def _hours(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}" if value >= 10 else f"{value:.3g}"


def _table(rows: list[dict], width: int, columns) -> list[str]:
    """A line per row: its stage, status and `columns(row)`, or why its cost is unknown."""
    return [f"  {row['stage']:<{width}} {'done' if row['done'] else 'to run':<7} "
            + (f"cost unknown: {row['error']}" if "error" in row else columns(row)) for row in rows]


def _synth_columns(row: dict) -> str:
    plan = row["plan"]
    return (f"{plan['documents']:>10,} {plan['pairs']:>10,} {plan['requests']:>10,} "
            f"{_count(plan['prompt_tokens']):>11} {_count(row['output_tokens']):>11} {row['output_basis']:<12} "
            f"{_hours(row['gpu_hours']):>8} {_hours(row['gpu_hours_left']):>8}")


def _train_columns(row: dict) -> str:
    counts = row["parameters"]
    return (f"{_count(counts['total']):>9} {_count(counts['non_embedding']):>10} {_count(row['tokens']):>10} "
            f"{row['tokens_basis']:<12} {row['flops']:>9.2e} {_hours(row['gpu_hours']):>8} "
            f"{_hours(row['gpu_hours_left']):>8}")


def format_costs(costs: dict) -> str:
    rows = costs["rows"]
    synth, train = [r for r in rows if r["kind"] == "synth"], [r for r in rows if r["kind"] == "train"]
    rate, width = costs["tokens_per_second"], max([28, *(len(r["stage"]) for r in rows)])
    lines = ["", "cost before compute (GPU-hours; 'left' leaves out finished stages and work already done)"]
    if synth:
        lines += ["generation: output tokens / output tokens per second per GPU / 3600, at "
                  + (f"{rate:,.0f} tokens/s (--tokens-per-second)" if rate else "— (pass --tokens-per-second X)"),
                  f"  {'stage':<{width}} {'status':<7} {'documents':>10} {'pairs':>10} {'requests':>10} "
                  f"{'prompt tok':>11} {'output tok':>11} {'basis':<12} {'GPU-h':>8} {'left':>8}"]
        lines += _table(synth, width, _synth_columns)
    if train:
        lines += [f"training: 6 x N x D FLOPs, N = all parameters (embeddings included), at MFU {costs['mfu']:.2f} of "
                  f"{costs['gpu_tflops']:,.0f} TFLOP/s per GPU",
                  f"  {'stage':<{width}} {'status':<7} {'N total':>9} {'N non-emb':>10} {'D tokens':>10} {'basis':<12} "
                  f"{'FLOPs':>9} {'GPU-h':>8} {'left':>8}"]
        lines += _table(train, width, _train_columns)
    total = costs["totals"]
    lines.append("total GPU-hours: " + ", ".join(
        f"{name} {_hours(total[kind]['gpu_hours'])} (left {_hours(total[kind]['gpu_hours_left'])})"
        if total[kind]["gpu_hours"] is not None else f"{name} — (unknown: see below)"
        for kind, name in (("synth", "generation"), ("train", "training"), ("all", "all"))))
    return "\n".join(lines + cost_notes(costs, synth, train))


def cost_notes(costs: dict, synth: list[dict], train: list[dict]) -> list[str]:
    from megadoc_megatron.synth.cost import PUBLIC_FIGURES

    notes = []
    if any(r.get("output_basis") == "estimate" for r in synth):
        notes.append("rephrase output tokens: estimate, min(source tokens, max_new_tokens) per request")
    if any(r.get("output_basis") == "upper bound" for r in synth):
        notes.append("rationale/textbook output tokens: upper bound, max_new_tokens per request")
    if synth and costs["tokens_per_second"] is None:
        notes.append(f"generation GPU-hours need --tokens-per-second; {PUBLIC_FIGURES}")
    sources = sorted({r["tokens_source"] for r in train if r.get("tokens_basis") == "estimate"})
    if sources:
        notes.append(f"D estimate: the iterations `megadoc blend` will compute from {'; '.join(sources)}")
    if any(r.get("tokens_basis") == "upper bound" for r in train):
        notes.append("D upper bound: refresh rounds stop at a validation plateau")
    uncounted = sorted({k for r in train for k in r.get("parameters", {}).get("uncounted_overrides", [])})
    if uncounted:
        notes.append(f"N leaves out the parameters added by model.overrides {', '.join(uncounted)}")
    counted = [r for r in train if "error" not in r]
    if counted:
        megatron = sum(r["megatron_gpu_hours"] for r in counted)
        notes.append(f"Megatron-LM's FLOP formula (what the training logs' MFU counts: attention scores, logits, no "
                     f"input embedding) gives {sum(r['megatron_flops'] for r in counted):.2e} FLOPs, "
                     f"{_hours(megatron)} GPU-hours at the same MFU")
    notes.append("not costed: preprocess, megadocs, tune (GRPO), validation and eval stages")
    return [f"  note: {line}" for line in notes]
