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


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one pipeline stage holds at its peak, by what holds them."""
    weights: float
    gradients: float      # FP32 main gradients (megatron-core's DDP buffers, the portable engine's masters)
    optimizer: float      # Adam moments and FP32 master weights, sharded by the distributed optimizer
    activations: float    # what autograd saves for backward in the transformer layers, all micro-batches in flight
    loss: float           # saved by the embedding, final norm, output layer and cross entropy (FP32 softmax)
    temporaries: float    # live at the peak, never saved: the logits' BF16 copy and gradient, or the
                          # optimizer step's per-parameter temporaries, whichever is larger

    @property
    def kept(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.loss

    @property
    def total(self) -> float:
        return self.kept + self.temporaries

    def describe(self) -> str:
        terms = ", ".join(f"{f.name} {getattr(self, f.name) / 2 ** 30:.2f}" for f in dataclasses.fields(self))
        return f"{self.total / 2 ** 30:.1f} GB ({terms})"


def memory_estimate_gb(config: TrainConfig, layout: Layout, seq_length: int, vocab_size: int,
                       device_type: str = "cuda") -> float:
    return memory_estimate(config, layout, seq_length, vocab_size, device_type).total / 2 ** 30


def memory_estimate(config: TrainConfig, layout: Layout, seq_length: int, vocab_size: int,
                    device_type: str = "cuda") -> MemoryEstimate:
    """Peak memory of one rank: the larger of the first pipeline stage (embedding, the most
    micro-batches in flight) and the last (output layer, cross entropy). Counted from what this
    model's modules save for backward (Megatron-LM's theoretical_memory_usage assumes a non-gated
    MLP and sequence parallelism); `device_type` matters because torch's RMSNorm saves FP32 copies
    off CUDA and the `auto` engine is megatron-core's only on CUDA. Checked within 10% against the
    bytes autograd saves on CPU (tests/test_train.py); an estimate for choosing model.recompute and
    micro-batch sizes, not a guarantee."""
    estimates = memory_estimates_by_stage(config, layout, seq_length, vocab_size, device_type)
    return max(estimates.values(), key=lambda estimate: estimate.total)


def memory_estimates_by_stage(config: TrainConfig, layout: Layout, seq_length: int, vocab_size: int,
                              device_type: str = "cuda") -> dict[tuple[bool, bool], MemoryEstimate]:
    """Peak memory of a rank of the first and of the last pipeline stage, by (first, last): one
    (True, True) without pipelining."""
    from megadoc_megatron.model.presets import padded_vocab_size

    model, vocab = _model_shape(config), padded_vocab_size(vocab_size)
    engine = config.engine if config.engine != "auto" else ("megatron" if device_type == "cuda" else "portable")
    stages = [(True, layout.pipeline == 1)] + ([(False, True)] if layout.pipeline > 1 else [])
    return {(first, last): _stage_memory(config, model, layout, seq_length, vocab, engine, device_type, first, last)
            for first, last in stages}


def _stage_memory(config, model, layout, seq_length, vocab, engine, device_type, first, last) -> MemoryEstimate:
    tensor, low_precision = layout.tensor, config.precision.bf16 or bool(config.precision.fp8)
    width = 2 if low_precision else 4  # bytes of a weight and of an activation
    layers = model.num_layers // layout.pipeline
    replicated, sharded = _stage_parameters(model, vocab, layers, first, last)
    parameters = replicated + sharded / tensor
    moments = 8 + (4 if low_precision else 0)  # Adam's two FP32 moments, the FP32 master of a BF16 weight
    shards = layout.data if engine == "megatron" and config.parallel.distributed_optimizer else 1
    in_flight = _micro_batches_in_flight(config, layout, engine, 0 if first else layout.pipeline - 1)
    # 1F1B runs the backward of the last (virtual) stage's micro-batch right after its forward
    losses_in_flight = 1 if engine == "megatron" and last else in_flight
    backend = "te" if device_type == "cuda" and not portable_layers(config.model.backend) else "portable"
    shape = _ActivationShape(model, tensor, config.parallel.sequence_parallel, seq_length,
                             layout.micro_batch_size, width, device_type)
    logits = shape.tokens * vocab / tensor
    # Forward: the BF16 logits beside their FP32 copy; backward: the FP32 softmax becomes the
    # gradient in place, next to its BF16 cast. The optimizer step comes after the activations are gone.
    temporaries = max(width * logits if last else 0, 4 * parameters / shards)  # torch Adam's sqrt(second moment)
    return MemoryEstimate(
        weights=width * parameters, gradients=4 * parameters, optimizer=moments * parameters / shards,
        activations=shape.layers(layers, in_flight, config.model.recompute, backend),
        loss=losses_in_flight * shape.loss(vocab, first, last), temporaries=temporaries)


def _stage_parameters(model, vocab: int, layers: int, first: bool, last: bool) -> tuple[float, float]:
    """(replicated over tensor ranks, split over them) parameters of a pipeline stage."""
    from megadoc_megatron.model.presets import parameter_count

    hidden = model.hidden_size
    one_layer = parameter_count(dataclasses.replace(model, num_layers=1), 0) - hidden  # without the final norm
    norms = 2 * hidden
    embeddings = vocab * hidden * (first + last)
    return norms * layers + hidden * last, (one_layer - norms) * layers + embeddings


def _micro_batches_in_flight(config, layout, engine: str, rank: int) -> float:
    """Micro-batches whose layer activations pipeline rank `rank` holds at once, in whole stages:
    the portable engine's GPipe runs every forward before any backward; megatron-core's 1F1B holds
    its warm-up forwards and one more, in model chunks (1 / virtual of a stage) under interleaving.
    That is Megatron-LM's pipeline x (1 + (pipeline - 1) / (pipeline x virtual)) on the first stage
    (at most every micro-batch), and pipeline - (pipeline - 1) / virtual on the last: not one under
    interleaving, where the last rank's warm-up runs all its chunks but the last."""
    if engine != "megatron":
        return layout.num_microbatches
    if layout.pipeline == 1:
        return 1
    virtual = config.parallel.virtual_pipeline or 1
    later_stages = layout.pipeline - rank - 1
    # megatron-core's warm-up (get_pp_rank_microbatches), in chunks under interleaving
    warmup = later_stages if virtual == 1 else 2 * later_stages + (virtual - 1) * layout.pipeline
    return min(warmup + 1, layout.num_microbatches * virtual) / virtual


@dataclass(frozen=True)
class _ActivationShape:
    """Bytes saved for backward by one micro-batch, module by module (portable layer spec on CPU
    measured; Transformer Engine's fused attention and RoPE keep the unrepeated key and value)."""
    model: object
    tensor: int
    sequence_parallel: bool
    seq_length: int
    micro_batch: int
    width: int          # bytes of an activation
    device_type: str

    @property
    def tokens(self) -> int:
        return self.seq_length * self.micro_batch

    def full_width(self) -> float:
        """Bytes of one [tokens, hidden] activation: split over tensor ranks only under sequence parallelism."""
        return self.tokens * self.model.hidden_size * self.width / (self.tensor if self.sequence_parallel else 1)

    def norm(self) -> float:
        """RMSNorm's saved input and normalized output (the next linear layer's input). Off CUDA
        torch computes it in FP32 pieces and saves two of them, then the output in the run's precision."""
        if self.device_type == "cuda":
            return 2 * self.full_width() + 4 * self.tokens
        full_fp32 = self.full_width() * 4 / self.width
        return 2 * full_fp32 + self.full_width() + 4 * self.tokens

    def attention(self, backend: str, recompute: str) -> float:
        model, per_rank = self.model, self.tokens * self.width / self.tensor
        kv_channels = model.hidden_size // model.num_attention_heads
        query = per_rank * model.num_attention_heads * kv_channels
        key_value = per_rank * model.num_query_groups * kv_channels
        if backend == "te":
            saved = query + 2 * key_value  # fused RoPE and attention, no repeated heads
        elif model.num_query_groups < model.num_attention_heads:
            saved = 3 * query  # the portable attention repeats key and value to every head
        else:
            saved = 2 * query + 3 * key_value  # roped query and key; the value keeps the whole QKV output alive
        heads = model.num_attention_heads / self.tensor
        softmax_statistics = 0 if recompute == "selective" else 4 * self.tokens * heads
        rope_tables = 0 if backend == "te" else 4 * self.seq_length * kv_channels * self.width
        return saved + query + softmax_statistics + rope_tables  # + the output projection's input

    def mlp(self) -> float:
        """SwiGLU: the first linear's output (both halves), the gate's SiLU, the up half as the
        product's operand and the product (the second linear's input)."""
        return 5 * self.tokens * self.model.ffn_hidden_size * self.width / self.tensor

    def layer(self, recompute: str, backend: str) -> float:
        return 2 * self.norm() + self.attention(backend, recompute) + self.mlp()

    def layers(self, count: int, in_flight: float, recompute: str, backend: str) -> float:
        """`count` layers of `in_flight` micro-batches; under full recomputation each layer keeps its
        input, and one layer at a time its activations again."""
        if recompute == "full":
            return in_flight * count * self.full_width() + self.layer("none", backend)
        return in_flight * count * self.layer(recompute, backend)

    def loss(self, vocab: int, first: bool, last: bool) -> float:
        """The token indices on the first stage; the final norm, the output layer's input and the
        cross entropy's FP32 softmax (fused or not) on the last."""
        saved = 8 * self.tokens if first else 0
        if last:
            saved += self.norm() + 4 * self.tokens * vocab / self.tensor + 9 * self.tokens
        return saved
