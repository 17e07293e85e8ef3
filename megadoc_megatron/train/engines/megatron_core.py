"""megatron-core's engine (config value `engine: megatron`): `DistributedDataParallel` (gradient
buckets, overlapped reduce-scatter and parameter all-gather), `get_megatron_optimizer` (AdamW, the
distributed optimizer, BF16 with FP32 master weights), `get_forward_backward_func` (1F1B,
interleaved with virtual stages), `finalize_model_grads`, behind `CoreOptimizer` (updates with
non-finite gradients are skipped). On CPU it runs inside `megatron_core_on_cpu()` (cuda_on_cpu.py).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from megadoc_megatron.train.engines.engine import Engine


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


def schedule_hooks(model: list, ddp_config) -> dict:
    """The TransformerConfig hooks by which megatron-core's schedules drive DDP, as Megatron-LM's
    training.py sets them: with overlapped gradient reduction, no synchronization until a model
    chunk's last micro-batch (no_sync_func), then its reduction started at once (grad_sync_func)
    so that it overlaps the other chunks' backward passes under interleaving; with aligned
    parameter gathers (interleaving), each chunk's all-gather started by the schedule
    (param_sync_func); the finalization after the last backward."""
    from megatron.core.distributed import finalize_model_grads

    def per_chunk(method: str):
        hooks = [getattr(chunk, method) for chunk in model]
        return hooks[0] if len(hooks) == 1 else hooks

    hooks = {"finalize_model_grads_func": finalize_model_grads}
    if ddp_config.overlap_grad_reduce:
        hooks.update(no_sync_func=per_chunk("no_sync"), grad_sync_func=per_chunk("start_grad_sync"))
    if ddp_config.overlap_param_gather and ddp_config.align_param_gather:
        hooks["param_sync_func"] = per_chunk("start_param_sync")
    return hooks


def megatron_core_engine(chunks: list, transformer_config, config, backend: str) -> Engine:
    """megatron-core's DDP, optimizer and pipeline schedules."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    parallel, settings = config.parallel, config.optimizer
    overlap_param_gather = parallel.distributed_optimizer and parallel.overlap_param_gather
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather, use_distributed_optimizer=parallel.distributed_optimizer,
        align_param_gather=overlap_param_gather and parallel.virtual_pipeline is not None)
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
    for name, hook in schedule_hooks(model, ddp_config).items():
        setattr(transformer_config, name, hook)
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
