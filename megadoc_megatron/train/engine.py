"""How one training step runs: megatron-core's own machinery (engine "megatron"), or a portable
equivalent (engine "portable"). "auto" takes megatron-core's on GPU and the portable one on CPU.

Both engines offer the same things to the trainer: `forward_backward` (megatron-core's schedule
signature: forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size,
forward_only), an optimizer with megatron-core's interface (`step()` returns (update_successful,
grad_norm, num_zeros), `sharded_state_dict`, `load_state_dict`, `param_groups`), the model chunks
and `params_synchronized()`, within which every rank's parameters hold the latest update (for
validation and checkpoints).

- megatron: `DistributedDataParallel` (gradient buckets, overlapped reduce-scatter and parameter
  all-gather), `get_megatron_optimizer` (AdamW, the distributed optimizer, BF16 with FP32 master
  weights), `get_forward_backward_func` (1F1B, interleaved with virtual stages),
  `finalize_model_grads`, behind `CoreOptimizer` (updates with non-finite gradients are skipped).
  On CPU it runs inside `megatron_core_on_cpu()`.
- portable: the same model and process groups with three replacements: a GPipe schedule (all
  forwards, then all backwards in the same order) whose stages exchange activations and their
  gradients with `torch.distributed.send/recv`; an all-reduce of gradients over the data-parallel
  group (and of sequence-parallel norm weights over the tensor group); and `torch.optim.AdamW` over
  FP32 master weights with megatron-core's gradient-norm rule (tensor-parallel shards counted once,
  summed over the model-parallel group). It runs on any device and is the reference the GPU check
  compares megatron-core's engine with.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from megadoc_megatron.errors import InputError

ENGINES = ("auto", "megatron", "portable")


def resolve_engine(requested: str, device: torch.device) -> str:
    if requested not in ENGINES:
        raise InputError(f"unknown engine {requested!r}", fix=f"use one of {', '.join(ENGINES)}")
    if requested != "auto":
        return requested
    return "megatron" if device.type == "cuda" else "portable"


@dataclass
class Engine:
    name: str               # megatron | portable
    chunks: list            # the GPTModel chunks of this rank (unwrapped)
    model: list             # what the schedule runs (wrapped by megatron-core's DDP)
    optimizer: object
    forward_backward: Callable
    optimizer_format: str                # how checkpoints keep the optimizer state (see checkpoint.load)
    backend: str = "portable"            # the layer spec: te | portable
    checkpoint_metadata: dict | None = None  # megatron-core's sharded_state_dict metadata
    params_synchronized: Callable = nullcontext


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """megatron-core's default: norms (1-D) and biases are not decayed."""
    return param.ndim == 1 or name.endswith(".bias")


class PortableOptimizer:
    """torch AdamW behind megatron-core's optimizer interface. Low-precision parameters get FP32
    master copies (as megatron-core's mixed-precision optimizer): gradients are copied to them, the
    update is made in FP32, and the parameters take the rounded result."""

    def __init__(self, chunks: list, settings):
        self.model_params, groups = [], ([], [])
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                if param.requires_grad:
                    self.model_params.append(param)
                    groups[no_weight_decay(name, param)].append(self._master(param))
        self.optimizer = torch.optim.AdamW(
            [{"params": groups[0], "wd_mult": 1.0}, {"params": groups[1], "wd_mult": 0.0}], lr=settings.lr,
            betas=(settings.adam_beta1, settings.adam_beta2), eps=settings.adam_eps, weight_decay=settings.weight_decay)
        self.clip_grad = settings.clip_grad

    @staticmethod
    def _master(param: torch.nn.Parameter) -> torch.nn.Parameter:
        if param.dtype == torch.float32:
            param.master = param
        else:
            param.master = torch.nn.Parameter(param.detach().float().clone())
        return param.master

    @property
    def param_groups(self) -> list[dict]:  # torch's load_state_dict replaces the list: never cache it
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        for param in self.model_params:
            param.grad = None
            param.master.grad = None

    def grad_norm(self) -> float:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        device = self.model_params[0].device
        squares = torch.zeros((), dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
        for param in self.model_params:
            if param.grad is not None and param_is_not_tensor_parallel_duplicate(param):
                squares += param.grad.float().pow(2).sum()
        dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
        return math.sqrt(squares.item())

    @torch.no_grad()
    def step(self):
        norm = self.grad_norm()
        if not math.isfinite(norm):
            return False, norm, None
        scale = self.clip_grad / (norm + 1.0e-6) if 0 < self.clip_grad < norm else 1.0
        for param in self.model_params:
            if param.grad is None:
                continue
            if param.master is param:
                param.grad.mul_(scale)
            else:
                param.master.grad = param.grad.float() * scale
        self.optimizer.step()
        for param in self.model_params:
            if param.master is not param:
                param.copy_(param.master)
        return True, norm, None

    def _init_state(self) -> None:
        for param in self.model_params:
            if not self.optimizer.state[param.master]:
                self.optimizer.state[param.master] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param.master),
                                                      "exp_avg_sq": torch.zeros_like(param.master)}

    def _in_optimizer_order(self) -> list:
        """Model parameters in the order of the optimizer's (master) parameters."""
        by_master = {id(param.master): param for param in self.model_params}
        return [by_master[id(master)] for group in self.param_groups for master in group["params"]]

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None):
        """Adam's moments (and FP32 master weights) as sharded tensors named like megatron-core's:
        optimizer.state.{exp_avg,exp_avg_sq,fp32_param}.<parameter>."""
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            optim_state_to_sharding_state,
        )

        self._init_state()
        state = self.optimizer.state_dict()
        ordered = self._in_optimizer_order()
        for index, param in enumerate(ordered):
            if param.master is not param:
                state["state"][index]["fp32_param"] = param.master.detach()
        # Adam's step count is a scalar per parameter, with no model-shaped shard: it travels with
        # the (common, unsharded) parameter groups instead.
        for group in state["param_groups"]:
            group["adam_step"] = max((float(state["state"][i]["step"]) for i in group["params"]), default=0.0)
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, ordered)
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict) -> None:
        ordered = self._in_optimizer_order()
        for group in state_dict["param_groups"]:
            step = group.pop("adam_step")
            for index in group["params"]:
                state_dict["state"][index]["step"] = torch.tensor(step)
        for index, param in enumerate(ordered):
            master = state_dict["state"][index].pop("fp32_param", None)
            if master is not None and param.master is not param:
                param.master.copy_(master)
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
    """GPipe: forward every micro-batch, then backward them in the same order.

    Loss reports (from the last stage) come back as a list, one per micro-batch, like megatron-core's.
    """
    from megatron.core import parallel_state

    (model,) = model
    config = model.config
    previous, following = _pipeline_peers()
    sequence = seq_length // parallel_state.get_tensor_model_parallel_world_size() if config.sequence_parallel \
        else seq_length
    device = next(model.parameters()).device
    shape, dtype = (sequence, micro_batch_size, config.hidden_size), config.pipeline_dtype or config.params_dtype
    inputs, outputs, reports = [], [], []
    with torch.set_grad_enabled(not forward_only):
        for _ in range(num_microbatches):
            received = None
            if previous is not None:
                received = torch.empty(shape, dtype=dtype, device=device)
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
            output_grad = torch.empty(shape, dtype=dtype, device=device)
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


def portable_engine(chunks: list, config, backend: str) -> Engine:
    if len(chunks) > 1:
        raise InputError("virtual pipeline stages need megatron-core's interleaved schedule",
                         fix="use engine megatron (or auto on a GPU), or unset parallel.virtual_pipeline")
    optimizer = PortableOptimizer(chunks, config.optimizer)

    def forward_backward(**kwargs):
        optimizer.zero_grad()
        return portable_forward_backward(**kwargs)

    return Engine("portable", chunks, chunks, optimizer, forward_backward, "portable", backend)


class CoreOptimizer:
    """megatron-core's optimizer with repairs to its step and its loading; everything else is the
    wrapped optimizer's.

    - `step()` skips the update when the gradient norm is not finite. megatron-core's own step only
      skips when a loss scaler (FP16) finds an overflow; with BF16 or FP32 it applies NaN/inf
      gradients and the weights become NaN. This is its step (prepare the gradients, their norm,
      clipping by that norm, the update) with the norm checked before clipping and updating.
    - Loading works with torch's Adam (no Transformer Engine or apex), which megatron-core's
      distributed optimizer (core 0.16-0.19) gets wrong three ways: `sharded_state_dict(is_loading=
      True)` reads Adam's step count from a state that does not exist before the first step (the
      state is created first, as that step would); the model-space load copies a `step` the saved
      state does not have (see `_adam_step_kept`); and the step counts it restores are wrong (0 from
      the bucket-space format) or one tensor shared by every parameter, which torch's Adam then
      increments once per parameter at each update. Each parameter's step is set afresh from
      the count megatron-core saved with the parameter groups.
    """

    def __init__(self, optimizer, clip_grad: float):
        self.optimizer, self.clip_grad = optimizer, clip_grad

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def _parts(self) -> list:
        return getattr(self.optimizer, "chained_optimizers", [self.optimizer])

    @torch.no_grad()
    def step(self):
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        if self.optimizer.prepare_grads():  # a loss scaler found inf/NaN
            return False, None, None
        norm = self.optimizer.get_grad_norm()
        if not math.isfinite(norm):
            return False, norm, None
        if self.clip_grad > 0:
            for part in self._parts():
                parameters = part.get_parameters()
                if parameters and not getattr(part, "is_stub_optimizer", False):
                    clip_grad_by_total_norm_fp32(parameters, max_norm=self.clip_grad, total_norm=norm)
        return self.optimizer.step_with_ready_grads(), norm, None

    def _torch_adams(self) -> list:
        inner = (getattr(part, "optimizer", None) for part in self._parts())
        return [adam for adam in inner if isinstance(adam, (torch.optim.Adam, torch.optim.AdamW))]

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs):
        if is_loading:  # create Adam's state as the first step would
            for inner in self._torch_adams():
                for group in inner.param_groups:
                    for param in group["params"]:
                        if not inner.state[param]:
                            inner.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                                  "exp_avg_sq": torch.zeros_like(param)}
        return self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, **kwargs)

    @torch.no_grad()  # megatron-core copies into parameters (and views of them)
    def load_state_dict(self, state_dict) -> None:
        with _adam_step_kept(self._parts()):
            self.optimizer.load_state_dict(state_dict)
        for inner in self._torch_adams():  # the step count megatron-core saved with the groups
            for group in inner.param_groups:
                for param in group["params"]:
                    if "step" in group and "step" in inner.state[param]:
                        inner.state[param]["step"] = torch.tensor(float(group["step"]))


@contextmanager
def _adam_step_kept(parts: list):
    """megatron-core's model-space ("fully reshardable") load copies every entry of torch Adam's
    state, `step` included, from saved tensors that have no `step` (KeyError, core 0.16-0.19); the
    step count itself comes from the parameter groups. Hand each copy the step already there."""
    originals = []
    for part in parts:
        setter = getattr(part, "_set_main_param_and_optimizer_states", None)
        if setter is None or not isinstance(getattr(part, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW)):
            continue

        def with_step(model_param, tensors, part=part, setter=setter):
            group, order = part.model_param_group_index_map[model_param]
            state = part.optimizer.state[part.optimizer.param_groups[group]["params"][order]]
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"]}
            setter(model_param, tensors)

        part._set_main_param_and_optimizer_states = with_step
        originals.append(part)
    try:
        yield
    finally:
        for part in originals:
            del part._set_main_param_and_optimizer_states


def megatron_engine(chunks: list, transformer_config, config, backend: str) -> Engine:
    """megatron-core's DDP, optimizer and pipeline schedules."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    parallel, settings = config.parallel, config.optimizer
    overlap_param_gather = parallel.distributed_optimizer and parallel.overlap_param_gather
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather, use_distributed_optimizer=parallel.distributed_optimizer)
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

    @contextmanager
    def params_synchronized():
        """With overlapped parameter all-gathers, an update reaches a rank's parameters only in the
        next forward pass; gather now and hold the hooks off (as Megatron-LM does around
        validation and checkpoints)."""
        if not overlap_param_gather:
            yield
            return
        for wrapped in model:
            wrapped.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for wrapped in model:
                wrapped.enable_forward_pre_hook()

    # Megatron-LM's checkpoint metadata. The distributed optimizer keeps its state in its buckets
    # (a resume may change the data-parallel size) or, with checkpoint.reshardable_optimizer, in
    # model space (any layout; the state is gathered at each save).
    sharding = "fully_reshardable" if config.checkpoint.reshardable_optimizer else "dp_reshardable"
    metadata = {"distrib_optim_sharding_type": sharding, "singleton_local_shards": False,
                "chained_optim_avoid_prefix": True}
    optimizer_format = "megatron-core's distributed optimizer" if parallel.distributed_optimizer \
        else "megatron-core's optimizer"
    return Engine("megatron", chunks, model, CoreOptimizer(optimizer, settings.clip_grad), forward_backward,
                  optimizer_format, backend, metadata, params_synchronized)
