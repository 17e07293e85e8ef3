"""How one training step runs: megatron-core's own machinery on GPU, a portable equivalent on CPU.

Both engines offer the same three things to the trainer: `forward_backward` (megatron-core's
schedule signature: forward_step_func, data_iterator, model, num_microbatches, seq_length,
micro_batch_size, forward_only), an optimizer with megatron-core's interface (`step()` returns
(update_successful, grad_norm, num_zeros), `sharded_state_dict`, `load_state_dict`) and the model
chunks.

- GPU: `DistributedDataParallel` (gradient buckets, optional overlap), `get_megatron_optimizer`
  (AdamW, the distributed optimizer, BF16 master weights in FP32), `get_forward_backward_func`
  (1F1B, interleaved with virtual stages), `finalize_model_grads`.
- CPU: megatron-core has no CPU path (its schedules, DDP buffers and optimizer allocate on CUDA),
  so the portable engine keeps the same model and process groups and replaces only those three:
  a GPipe schedule (all forwards, then all backwards in the same order) whose stages exchange
  activations and their gradients with `torch.distributed.send/recv` over gloo; an all-reduce of
  gradients over the data-parallel group (and of sequence-parallel norm weights over the tensor
  group); and `torch.optim.AdamW` with megatron-core's gradient-norm rule (tensor-parallel shards
  counted once, summed over the model-parallel group). With micro-batches of equal token counts
  it computes the same update as megatron-core, which the PP=2/TP=2/DP=2 tests check against PP=1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from typing import Callable

import torch
import torch.distributed as dist

from megadoc_megatron.errors import InputError


@dataclass
class Engine:
    chunks: list            # the GPTModel chunks of this rank (unwrapped)
    model: list             # what the schedule runs (wrapped on GPU)
    optimizer: object
    forward_backward: Callable


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """megatron-core's default: norms (1-D) and biases are not decayed."""
    return param.ndim == 1 or name.endswith(".bias")


class PortableOptimizer:
    """torch AdamW behind megatron-core's optimizer interface (CPU engine)."""

    def __init__(self, chunks: list, settings):
        decay, plain = [], []
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                if param.requires_grad:
                    (plain if no_weight_decay(name, param) else decay).append(param)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "wd_mult": 1.0}, {"params": plain, "wd_mult": 0.0}], lr=settings.lr,
            betas=(settings.adam_beta1, settings.adam_beta2), eps=settings.adam_eps, weight_decay=settings.weight_decay)
        self.clip_grad = settings.clip_grad

    @property
    def param_groups(self) -> list[dict]:  # torch's load_state_dict replaces the list: never cache it
        return self.optimizer.param_groups

    def parameters(self):
        return chain.from_iterable(group["params"] for group in self.param_groups)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self) -> float:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        squares = torch.zeros((), dtype=torch.float64)
        for param in self.parameters():
            if param.grad is not None and param_is_not_tensor_parallel_duplicate(param):
                squares += param.grad.double().pow(2).sum()
        dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
        return math.sqrt(squares.item())

    def step(self):
        norm = self.grad_norm()
        if not math.isfinite(norm):
            return False, norm, None
        if self.clip_grad > 0 and norm > self.clip_grad:
            scale = self.clip_grad / (norm + 1.0e-6)
            for param in self.parameters():
                if param.grad is not None:
                    param.grad.mul_(scale)
        self.optimizer.step()
        return True, norm, None

    def _init_state(self) -> None:
        for param in self.parameters():
            if not self.optimizer.state[param]:
                self.optimizer.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                               "exp_avg_sq": torch.zeros_like(param)}

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False):
        from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                                optim_state_to_sharding_state)

        self._init_state()
        state = self.optimizer.state_dict()
        # Adam's step count is a scalar per parameter, with no model-shaped shard: it travels with
        # the (common, unsharded) parameter groups instead.
        for group in state["param_groups"]:
            group["adam_step"] = max((float(state["state"][i]["step"]) for i in group["params"]), default=0.0)
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.parameters())
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        return state

    def load_state_dict(self, state_dict) -> None:
        for group in state_dict["param_groups"]:
            step = group.pop("adam_step")
            for index in group["params"]:
                state_dict["state"][index]["step"] = torch.tensor(step)
        self.optimizer.load_state_dict(state_dict)


def _pipeline_peers():
    from megatron.core import parallel_state

    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    previous = None if first else parallel_state.get_pipeline_model_parallel_prev_rank()
    following = None if last else parallel_state.get_pipeline_model_parallel_next_rank()
    return previous, following


def portable_forward_backward(*, forward_step_func, data_iterator, model, num_microbatches, seq_length,
                              micro_batch_size, forward_only=False, **unused):
    """GPipe over gloo: forward every micro-batch, then backward them in the same order.

    Loss reports (from the last stage) come back as a list, one per micro-batch, like megatron-core's.
    """
    from megatron.core import parallel_state

    (model,) = model
    config = model.config
    previous, following = _pipeline_peers()
    sequence = seq_length // parallel_state.get_tensor_model_parallel_world_size() if config.sequence_parallel \
        else seq_length
    shape, dtype = (sequence, micro_batch_size, config.hidden_size), config.params_dtype
    inputs, outputs, reports = [], [], []
    with torch.set_grad_enabled(not forward_only):
        for _ in range(num_microbatches):
            received = None
            if previous is not None:
                received = torch.empty(shape, dtype=dtype)
                dist.recv(received, src=previous)
                received.requires_grad_(not forward_only)
            model.set_input_tensor(received)
            output, loss_func = forward_step_func(data_iterator, model)
            if following is None:
                loss, report = loss_func(output)
                output = loss / num_microbatches
                reports.append(report)
            else:
                dist.send(output.detach().contiguous(), dst=following)
            inputs.append(received)
            outputs.append(output)
    if forward_only:
        return reports
    for received, output in zip(inputs, outputs):
        output_grad = None
        if following is not None:
            output_grad = torch.empty(shape, dtype=dtype)
            dist.recv(output_grad, src=following)
        torch.autograd.backward(output, grad_tensors=output_grad)
        if previous is not None:
            dist.send(received.grad.contiguous(), dst=previous)
    finalize_portable_grads([model])
    return reports


def _all_reduce_grads(params: list, group, average: bool) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    if average:
        flat /= dist.get_world_size(group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def finalize_portable_grads(chunks: list) -> None:
    """What megatron-core's DDP and finalize_model_grads do: average gradients over data-parallel
    ranks; sum sequence-parallel norm gradients over the tensor-parallel group."""
    from megatron.core import parallel_state

    params = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]
    _all_reduce_grads([p for p in params if getattr(p, "sequence_parallel", False)],
                      parallel_state.get_tensor_model_parallel_group(), average=False)
    _all_reduce_grads(params, parallel_state.get_data_parallel_group(), average=True)


def portable_engine(chunks: list, config) -> Engine:
    if len(chunks) > 1:
        raise InputError("virtual pipeline stages need megatron-core's interleaved schedule, which runs on GPU only",
                         fix="unset parallel.virtual_pipeline on CPU")
    optimizer = PortableOptimizer(chunks, config.optimizer)

    def forward_backward(**kwargs):
        optimizer.zero_grad()
        return portable_forward_backward(**kwargs)

    return Engine(chunks, chunks, optimizer, forward_backward)


def megatron_engine(chunks: list, transformer_config, config) -> Engine:
    """megatron-core's DDP, optimizer and pipeline schedules (GPU)."""
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    parallel, settings = config.parallel, config.optimizer
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=parallel.overlap_grad_reduce,
        use_distributed_optimizer=parallel.distributed_optimizer)
    model = []
    for index, chunk in enumerate(chunks):
        module = Float16Module(transformer_config, chunk) if config.precision.bf16 else chunk
        model.append(DistributedDataParallel(config=transformer_config, ddp_config=ddp_config, module=module,
                                             disable_bucketing=index > 0))
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad, bf16=config.precision.bf16, params_dtype=transformer_config.params_dtype,
        use_distributed_optimizer=parallel.distributed_optimizer), model)
    transformer_config.finalize_model_grads_func = finalize_model_grads
    if parallel.overlap_grad_reduce:
        no_sync = [m.no_sync for m in model]
        transformer_config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    schedule = get_forward_backward_func()

    def forward_backward(**kwargs):
        for wrapped in model:
            wrapped.zero_grad_buffer()
        optimizer.zero_grad()
        return schedule(**kwargs)

    return Engine(chunks, model, optimizer, forward_backward)
