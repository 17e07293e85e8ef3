"""How one training step runs: megatron-core's own machinery (megatron_core.py, config value
`engine: megatron`), or plain torch (plain_torch.py, config value `engine: portable`). "auto"
takes megatron-core's on GPU and plain torch on CPU.

Both engines offer the same things to the trainer: `forward_backward` (megatron-core's schedule
signature: forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size,
forward_only), an optimizer with megatron-core's interface (`step()` returns (update_successful,
grad_norm, num_zeros), `sharded_state_dict`, `load_state_dict`, `param_groups`), the model chunks
and `params_synchronized()`, within which every rank's parameters hold the latest update (for
validation and checkpoints).
"""

from __future__ import annotations

from megadoc_megatron.train.engines.engine import ENGINES, Engine, resolve_engine

__all__ = ["ENGINES", "Engine", "build_engine", "resolve_engine"]


def build_engine(name: str, chunks: list, transformer_config, config, backend: str) -> Engine:
    """The engine `name` (resolved: megatron | portable) around this rank's model chunks."""
    from megadoc_megatron.train.engines.megatron_core import megatron_core_engine
    from megadoc_megatron.train.engines.plain_torch import torch_engine

    if name == "megatron":
        return megatron_core_engine(chunks, transformer_config, config, backend)
    return torch_engine(chunks, config, backend)
