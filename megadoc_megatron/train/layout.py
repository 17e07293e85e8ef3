"""The parallel layout of a launch, checked before any process group or allocation: whether
`world_size` processes can run a training config on a blend of (global batch, sequence length),
and if not, the first reason, with the fix.

Megatron-LM finds most of these one by one, after minutes of start-up on every rank; a SLURM job
that asked for the wrong node count should fail in seconds with one message. `megadoc train
CONFIG --dry-run --world-size N` runs the same check without starting anything.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass

from megadoc_megatron.errors import InputError
from megadoc_megatron.model import transformer_engine_available
from megadoc_megatron.model.presets import PRESETS
from megadoc_megatron.train.config import TrainConfig

VOCAB_PADDING = 128  # model.padded_vocab_size pads to a multiple of this


@dataclass(frozen=True)
class Layout:
    world_size: int
    tensor: int
    pipeline: int
    data: int
    micro_batch_size: int
    num_microbatches: int

    def describe(self) -> str:
        return (f"{self.world_size} processes = tensor {self.tensor} x pipeline {self.pipeline} x data {self.data}; "
                f"{self.num_microbatches} micro-batches of {self.micro_batch_size} per data-parallel rank")


def _model_shape(config: TrainConfig):
    if config.model.preset not in PRESETS:
        raise InputError(f"unknown model preset {config.model.preset!r}", fix=f"use one of {', '.join(PRESETS)}")
    preset = PRESETS[config.model.preset]
    known = {f.name for f in dataclasses.fields(preset)}
    return dataclasses.replace(preset, **{k: v for k, v in config.model.overrides.items() if k in known})


def plan_layout(config: TrainConfig, world_size: int, global_batch: int, seq_length: int, where=None) -> Layout:
    """The layout, or an InputError naming the first thing that does not divide (`where`: the file
    the numbers come from)."""
    parallel, micro = config.parallel, config.data.micro_batch_size
    tensor, pipeline, virtual = parallel.tensor, parallel.pipeline, parallel.virtual_pipeline
    model = _model_shape(config)

    def refuse(message: str, fix: str):
        raise InputError(f"{world_size} processes cannot run this config: {message}", where, fix=fix)

    if world_size % (tensor * pipeline):
        refuse(f"they do not split into tensor {tensor} x pipeline {pipeline} model-parallel groups",
               "launch a multiple of parallel.tensor x parallel.pipeline processes (nodes x GPUs per node)")
    data = world_size // (tensor * pipeline)
    if VOCAB_PADDING % tensor or model.num_attention_heads % tensor or model.num_query_groups % tensor:
        refuse(f"tensor {tensor} does not divide the {model.num_attention_heads} attention heads, "
               f"{model.num_query_groups} key/value groups and the vocabulary padding ({VOCAB_PADDING})",
               "use a power of two for parallel.tensor that divides them")
    if parallel.sequence_parallel and (tensor == 1 or seq_length % tensor):
        refuse(f"sequence parallelism needs tensor > 1 dividing the sequence length {seq_length}",
               "unset parallel.sequence_parallel or change parallel.tensor")
    check_layers_and_precision(config, model, seq_length, refuse)
    stages = pipeline * (virtual or 1)
    if model.num_layers % stages:
        refuse(f"{model.num_layers} layers do not split into pipeline {pipeline} x virtual {virtual or 1} stages",
               "pick parallel.pipeline (and virtual_pipeline) dividing the layer count")
    if virtual and pipeline == 1:
        refuse("virtual pipeline stages need pipeline parallelism",
               "unset parallel.virtual_pipeline or set pipeline > 1")
    if virtual and pipeline == 2 and not config.model.overrides.get("overlap_p2p_comm", True):
        refuse("the interleaved schedule with pipeline 2 needs overlapped point-to-point communication: a rank's "
               "previous and next stage are the same peer, and batched sends to it mix up the tensors "
               "(Megatron-LM refuses the same)",
               "remove overlap_p2p_comm from model.overrides (it is on under virtual_pipeline), or use pipeline > 2")
    if global_batch % (micro * data):
        per_rank = global_batch / data
        fix = (f"set data.micro_batch_size to a divisor of {int(per_rank)}" if per_rank == int(per_rank) else
               f"launch a number of data-parallel ranks that divides {global_batch} (now {data})")
        refuse(f"the global batch of {global_batch} sequences does not split into micro-batches of {micro} on "
               f"{data} data-parallel ranks (tensor {tensor} x pipeline {pipeline})", fix)
    microbatches = global_batch // (micro * data)
    if virtual and microbatches % pipeline:
        refuse(f"the interleaved schedule needs the {microbatches} micro-batches per rank to be a multiple of "
               f"pipeline {pipeline}", "change data.micro_batch_size or the number of processes")
    return Layout(world_size, tensor, pipeline, data, micro, microbatches)


def portable_layers(backend: str) -> bool:
    """Whether a run builds the portable layer spec: asked for, or `auto` without Transformer Engine."""
    return backend == "portable" or backend == "auto" and not transformer_engine_available()


def check_layers_and_precision(config: TrainConfig, model, seq_length: int, refuse) -> None:
    """What the layer spec and FP8 need of the layout (`refuse(message, fix)` raises)."""
    parallel, micro, backend = config.parallel, config.data.micro_batch_size, config.model.backend
    if parallel.sequence_parallel and portable_layers(backend):
        why = "asked for" if backend == "portable" else "Transformer Engine is not installed"
        refuse(f"sequence parallelism needs the Transformer Engine layers, and this run builds the portable ones "
               f"(model.backend {backend}: {why}), whose norm megatron-core refuses under sequence parallelism",
               "install Transformer Engine (the gpu extra) and set model.backend te or auto, "
               "or unset parallel.sequence_parallel")
    if not config.precision.fp8:
        return
    split = parallel.tensor if parallel.sequence_parallel else 1  # each tensor rank holds 1/TP of the tokens
    tokens = micro * seq_length // split
    if tokens % 8:
        per_rank = f" / tensor {split}" if split > 1 else ""
        refuse(f"FP8 needs the tokens of a micro-batch ({micro} x {seq_length}{per_rank} = {tokens}) to be a "
               "multiple of 8", "pick data.micro_batch_size and the blend's --seq-length so that they are, "
               "or unset precision.fp8")
    hidden, ffn = model.hidden_size, model.ffn_hidden_size
    if hidden % 16 or ffn % (16 * parallel.tensor):
        refuse(f"FP8 needs the hidden size ({hidden}) and the feed-forward size per tensor rank ({ffn} / "
               f"{parallel.tensor}) to be multiples of 16", "pick a preset or model.overrides hidden_size and "
               "ffn_hidden_size that are, or unset precision.fp8")


def launcher_world_size(launcher: str) -> int | None:
    """Processes a `launch.*` command line starts: torchrun's --nnodes x --nproc-per-node (1 without
    a launcher); None when it does not say in numbers (e.g. --nproc-per-node gpu)."""
    words, size = shlex.split(launcher), {"nnodes": "1", "nproc_per_node": "1"}
    for index, word in enumerate(words):
        key, _, value = word.lstrip("-").replace("-", "_").partition("=")
        if key in size and (value or index + 1 < len(words)):
            size[key] = (value or words[index + 1]).split(":")[-1]  # elastic min:max -> max
    if not all(value.isdigit() for value in size.values()):
        return None
    return int(size["nnodes"]) * int(size["nproc_per_node"])


def memory_estimate_gb(config: TrainConfig, layout: Layout, seq_length: int, vocab_size: int) -> float:
    """Peak GPU memory of one rank, roughly (Megatron-LM's theoretical_memory_usage, BF16): weights,
    FP32 gradient buffers and Adam state (sharded over data-parallel ranks by the distributed
    optimizer), activations of the micro-batches a pipeline stage holds (per layer s*b*h*(18 +
    4*ffn/h) bytes over the tensor size, only the layer inputs under full recomputation) and the
    logits. An estimate for choosing model.recompute and micro-batch sizes, not a guarantee."""
    from megadoc_megatron.model.presets import padded_vocab_size, parameter_count

    model = _model_shape(config)
    parameters = parameter_count(model, padded_vocab_size(vocab_size)) / (layout.tensor * layout.pipeline)
    optimizer = 12 / layout.data if config.parallel.distributed_optimizer else 12
    states = parameters * (2 + 4 + optimizer)
    tokens = seq_length * layout.micro_batch_size
    per_layer = tokens * model.hidden_size * (18 + 4 * model.ffn_hidden_size / model.hidden_size) / layout.tensor
    layers = model.num_layers / layout.pipeline
    in_flight = min(layout.pipeline, layout.num_microbatches)
    if config.model.recompute == "full":
        activations = in_flight * layers * 2 * tokens * model.hidden_size / layout.tensor + per_layer
    else:
        activations = in_flight * layers * per_layer
    logits = tokens * padded_vocab_size(vocab_size) * (2 + 4) / layout.tensor  # BF16 logits, FP32 loss
    return (states + activations + logits) / 2 ** 30
