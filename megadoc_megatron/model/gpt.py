"""Llama-style GPT (RMSNorm, SwiGLU, RoPE, grouped-query attention, untied embeddings, no biases)
built from megatron-core's `GPTModel` and layer specs.

One switch picks the layer spec: `"te"` is megatron-core's Transformer Engine spec (GPU; BF16 or
FP8), `"portable"` is its local spec with two swaps that let the same model run without CUDA
(tests, CPU demos): core attention is `scaled_dot_product_attention` (megatron-core's local
`DotProductAttention` allocates on CUDA) and the rotary table stays on the device of its
frequencies (core 0.16's `RotaryEmbedding.get_emb` moves them to CUDA on first use).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megadoc_megatron.errors import InputError
from megadoc_megatron.model import transformer_engine_available
from megadoc_megatron.model.presets import PRESETS, ModelPreset

BACKENDS = ("te", "portable")


def transformer_config(preset: str | ModelPreset, backend: str = "portable", tensor_parallel: int = 1,
                       pipeline_parallel: int = 1, sequence_parallel: bool = False, bf16: bool = False,
                       fp8: str | None = None, fp8_recipe: str = "delayed", fp8_amax_history_len: int = 1024,
                       fp8_amax_compute_algo: str = "max", **overrides) -> TransformerConfig:
    """A TransformerConfig for a Llama-style model; any TransformerConfig field can be overridden."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise InputError(f"unknown model preset {preset!r}", fix=f"use one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    if backend not in BACKENDS:
        raise InputError(f"unknown layer backend {backend!r}", fix=f"use one of {', '.join(BACKENDS)}")
    if fp8 and backend != "te":
        raise InputError("FP8 needs the Transformer Engine layer spec", fix="use backend 'te' on an H100")
    portable = backend == "portable"
    fields = dict(
        **dataclasses.asdict(preset),
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel,
        sequence_parallel=sequence_parallel,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=1e-5,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        fp8=fp8, fp8_recipe=fp8_recipe, fp8_amax_history_len=fp8_amax_history_len,
        fp8_amax_compute_algo=fp8_amax_compute_algo,
        # CUDA-only fused kernels off for the portable path.
        use_cpu_initialization=portable, bias_dropout_fusion=not portable, masked_softmax_fusion=not portable,
        persist_layer_norm=not portable, gradient_accumulation_fusion=False, apply_rope_fusion=not portable,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def check_overrides(overrides: dict, path) -> None:
    """model.overrides: every key a field of megatron-core's TransformerConfig (checked before any
    work starts; TransformerConfig itself would raise a bare TypeError when the model is built)."""
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InputError(f"model.overrides.{unknown[0]} is not a field of megatron-core's TransformerConfig", path,
                         fix="use a TransformerConfig field (megatron/core/transformer/transformer_config.py), "
                             "e.g. num_layers, ffn_hidden_size, kv_channels")


class PortableCoreAttention(torch.nn.Module):
    """Causal attention by `torch.nn.functional.scaled_dot_product_attention`, on any device.

    Takes megatron-core's core-attention arguments: query/key/value [seq, batch, heads, dim],
    key/value with fewer heads under grouped-query attention; returns [seq, batch, heads * dim].
    With packed sequences (`packed_seq_params`, format "thd": [tokens, heads, dim]) each document
    of `cu_seqlens_q` attends only to itself.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type=None, **unused):
        super().__init__()
        self.config = config

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise NotImplementedError("attention bias needs the Transformer Engine spec")
        if attention_mask is not None:  # megadoc masks documents with packed_seq_params, never a dense mask
            raise NotImplementedError("dense attention masks are not supported: use packed_seq_params")
        if packed_seq_params is None:
            return self._causal(query, key, value)
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        documents = [self._causal(*(t[start:end].unsqueeze(1) for t in (query, key, value)))
                     for start, end in zip(bounds[:-1], bounds[1:])]
        return torch.cat(documents)

    def _causal(self, query, key, value):
        group = query.size(2) // key.size(2)
        if group > 1:
            key, value = key.repeat_interleave(group, dim=2), value.repeat_interleave(group, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.config.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1), -1)


def document_packing(tokens: torch.Tensor, eod: int, device: torch.device | None = None) -> PackedSeqParams:
    """Document masking for a [batch, seq] micro-batch that the model takes flattened to [1, batch *
    seq]: megatron-core's packed-sequence ("thd") parameters, in which every document (ending at
    its end-of-document token, or at the end of its row) attends only to itself and RoPE positions
    restart at each document. Transformer Engine honours these, where it silently ignores the
    attention mask of Megatron-LM's --reset-attention-mask; the portable attention honours them too.
    Computed on the CPU tensor, then moved to `device`, so that no step waits for the GPU."""
    rows, length = tokens.shape
    ends = (tokens.reshape(-1) == eod).nonzero().flatten() + 1
    row_ends = torch.arange(1, rows + 1) * length
    bounds = torch.unique(torch.cat([torch.zeros(1, dtype=torch.long), ends.cpu(), row_ends]))
    longest = int((bounds[1:] - bounds[:-1]).max())
    bounds = bounds.to(torch.int32).to(device or tokens.device, non_blocking=True)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


class PortableRotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding whose table is built where its frequencies live (no move to CUDA)."""

    def get_emb(self, max_seq_len: int, offset: int = 0):
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if self.rotary_interleaved:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]


def layer_spec(backend: str) -> ModuleSpec:
    """The transformer-layer spec of a backend (see the module docstring)."""
    if backend == "te":
        if not transformer_engine_available():
            raise InputError("the 'te' backend needs Transformer Engine, which is not installed",
                             fix="install the gpu extra (or use NVIDIA's PyTorch container), or use backend 'portable'")
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = PortableCoreAttention
    return spec


def build_gpt(config: TransformerConfig, vocab_size: int, max_sequence_length: int, backend: str = "portable",
              pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None) -> GPTModel:
    """A GPTModel for the current model-parallel rank (parallel_state must be initialized);
    `vp_stage` picks the model chunk under virtual pipeline stages."""
    model = GPTModel(config, layer_spec(backend), vocab_size=vocab_size, max_sequence_length=max_sequence_length,
                     pre_process=pre_process, post_process=post_process, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False, vp_stage=vp_stage)
    if backend == "portable":
        model.rotary_pos_emb.__class__ = PortableRotaryEmbedding  # same state, CPU-safe get_emb
    return model
