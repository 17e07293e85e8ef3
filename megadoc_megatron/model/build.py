"""The model of a training config on this rank: its TransformerConfig (with the fast paths
Megatron-LM would turn on) and its GPTModel chunks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megadoc_megatron.errors import InputError

if TYPE_CHECKING:
    from megadoc_megatron.train.config import TrainConfig


def resolve_backend(requested: str) -> str:
    from megadoc_megatron.model.gpt import transformer_engine_available

    if requested != "auto":
        return requested
    return "te" if torch.cuda.is_available() and transformer_engine_available() else "portable"


def build_model(config: TrainConfig, vocab_size: int, seq_length: int, device: torch.device, engine: str = "portable"):
    """(TransformerConfig, model chunks of this rank, padded vocabulary) on `device`, with the fast
    paths Megatron-LM would use for this engine (the config's engine value) and device."""
    from megatron.core import parallel_state

    from megadoc_megatron.model.gpt import build_gpt
    from megadoc_megatron.model.presets import padded_vocab_size

    backend = resolve_backend(config.model.backend)
    parallel = config.parallel
    model_config = model_transformer_config(config, backend, engine, device.type)
    padded = padded_vocab_size(vocab_size)  # splits over the tensor size (plan_layout checks it)
    chunks = []
    for stage in range(parallel.virtual_pipeline or 1):
        vp_stage = stage if parallel.virtual_pipeline else None
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
        chunks.append(placed(build_gpt(model_config, padded, seq_length, backend, first, last, vp_stage), device))
    return model_config, chunks, padded


def model_transformer_config(config: TrainConfig, backend: str, engine: str, device_type: str):
    """The TransformerConfig of a training config, with the fast paths of its engine and device."""
    from megadoc_megatron.model.gpt import transformer_config

    parallel, precision = config.parallel, config.precision
    dtype = torch.bfloat16 if precision.bf16 else torch.float32
    low_precision = precision.bf16 or bool(precision.fp8)
    fast = {**fast_paths(engine, backend, device_type, low_precision), **recompute_settings(config.model.recompute),
            **pipeline_communication(parallel.virtual_pipeline)}
    return transformer_config(
        config.model.preset, backend, parallel.tensor, parallel.pipeline, parallel.sequence_parallel,
        precision.bf16, precision.fp8, precision.fp8_recipe, precision.fp8_amax_history_len,
        precision.fp8_amax_compute_algo, pipeline_dtype=dtype,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline, **{**fast, **config.model.overrides})


def placed(model, device: torch.device):
    """The model on `device`, its rotary frequencies too: megatron-core keeps them in a plain
    attribute (not a buffer), which `.to()` leaves on the CPU where the portable spec made them."""
    model = model.to(device)
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is not None:
        rotary.inv_freq = rotary.inv_freq.to(device)
    return model


def fast_paths(engine: str, backend: str, device_type: str, low_precision: bool) -> dict:
    """The TransformerConfig fast paths Megatron-LM turns on where they apply (`low_precision`: a
    BF16 or FP8 run)."""
    return {
        # TE layers accumulate weight gradients straight into megatron-core DDP's FP32 buffers.
        "gradient_accumulation_fusion": engine == "megatron" and backend == "te" and apex_weight_gradient_fusion(),
        # 1F1B frees the activations it has sent on. Not on CPU, where gloo may still be sending them
        # (the interleaved schedule's overlapped sends): the freed memory goes out instead.
        "deallocate_pipeline_outputs": engine == "megatron" and device_type == "cuda",
        # megatron-core's native fused cross entropy casts its gradient to BF16: wrong for an FP32 run
        "cross_entropy_loss_fusion": device_type == "cuda" and low_precision,
    }


def pipeline_communication(virtual_pipeline: int | None) -> dict:
    """Megatron-LM's point-to-point settings: the interleaved schedule overlaps its sends and
    receives with compute (--overlap-p2p-communication, on by default) and then must not batch
    them (batch_p2p_comm = not overlap_p2p_comm). megatron-core's own defaults batch them, which with
    pipeline 2 puts the sends to and receives from the one peer (previous and next stage alike) in
    one batch: they can hang or pair up the wrong tensors."""
    overlap = virtual_pipeline is not None
    return {"overlap_p2p_comm": overlap, "batch_p2p_comm": not overlap}


def apex_weight_gradient_fusion() -> bool:
    """Whether apex's fused_weight_gradient_mlp_cuda imports: megatron-core's own output layer
    (ColumnParallelLinear) refuses gradient_accumulation_fusion without it, even under TE, and the
    gpu extra installs TE without apex. The same import as megatron-core's check."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def recompute_settings(recompute: str) -> dict:
    """TransformerConfig fields of model.recompute (Megatron-LM's --recompute-* flags)."""
    if recompute == "none":
        return {}
    if recompute == "selective":
        return {"recompute_granularity": "selective"}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    raise InputError(f"unknown model.recompute {recompute!r}", fix="use none, selective or full")
