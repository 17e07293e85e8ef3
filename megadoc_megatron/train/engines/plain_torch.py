"""The plain-torch engine (config value `engine: portable`): the same model and process groups as
megatron-core's engine with three replacements: a GPipe schedule (all forwards, then all backwards
in the same order) whose stages exchange activations and their gradients with
`torch.distributed.send/recv`; an all-reduce of gradients over the data-parallel group (and of
sequence-parallel norm weights over the tensor group); and `torch.optim.AdamW` over FP32 master
weights with megatron-core's gradient-norm rule (tensor-parallel shards counted once, summed over
the model-parallel group). In BF16 it is megatron-core's mixed precision: every parameter in BF16
(norms included, as Float16Module casts them), micro-batch gradients summed into FP32 main
gradients (the masters' .grad) and reduced over data-parallel ranks in FP32 (grad_reduce_in_fp32).
It runs on any device and is the reference the GPU check compares megatron-core's engine with.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megadoc_megatron.errors import InputError
from megadoc_megatron.train.engines.engine import Engine

OPTIMIZER_FORMAT = "portable"  # the name checkpoints record for this engine's optimizer state


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """megatron-core's default: norms (1-D) and biases are not decayed."""
    return param.ndim == 1 or name.endswith(".bias")


def accumulate_in_fp32(param: torch.nn.Parameter) -> None:
    """Add a low-precision parameter's new gradient to its FP32 main gradient (the master's .grad)
    and free it: summed in BF16, micro-batch gradients would lose their low bits."""
    master = param.master
    if master.grad is None:
        master.grad = param.grad.float()
    else:
        master.grad += param.grad
    param.grad = None


class TorchOptimizer:
    """torch AdamW behind megatron-core's optimizer interface. Low-precision parameters get FP32
    master copies (as megatron-core's mixed-precision optimizer): their gradients accumulate in the
    masters' FP32 .grad (the main gradients), the update is made in FP32, and the parameters take
    the rounded result. For FP32 parameters the master is the parameter itself."""

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
            param.register_post_accumulate_grad_hook(accumulate_in_fp32)
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
            if param.master.grad is not None and param_is_not_tensor_parallel_duplicate(param):
                squares += param.master.grad.pow(2).sum()
        dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
        return math.sqrt(squares.item())

    @torch.no_grad()
    def step(self):
        norm = self.grad_norm()
        if not math.isfinite(norm):
            return False, norm, None
        scale = self.clip_grad / (norm + 1.0e-6) if 0 < self.clip_grad < norm else 1.0
        for param in self.model_params:
            if param.master.grad is not None:
                param.master.grad.mul_(scale)
        self.optimizer.step()
        for param in self.model_params:
            if param.master is not param:
                param.copy_(param.master)
        return True, norm, None

    def _init_state(self) -> None:
        for param in self.model_params:
            if not self.optimizer.state[param.master]:
                self.optimizer.state[param.master] = {"step": torch.tensor(0.0),
                                                      "exp_avg": torch.zeros_like(param.master),
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
    def reload_model_params(self) -> None:
        """Masters from the parameters, after weights were loaded into them (megatron-core's name)."""
        for param in self.model_params:
            if param.master is not param:
                param.master.copy_(param)

    @torch.no_grad()
    def load_state_dict(self, state_dict) -> None:
        """Called after the weights are loaded: a master the checkpoint lacks (a parameter saved in
        FP32, such as the norms before they were cast to BF16) starts from the loaded weight."""
        self.reload_model_params()
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


def keep_saved_masters(optimizer_state: dict, saved_keys) -> None:
    """Leave out of a load the FP32 masters that a checkpoint does not have (`saved_keys`: its
    tensors): those of parameters that were FP32 when it was saved, the norms of a BF16 run before
    they were cast to BF16 as megatron-core casts them. load_state_dict starts them from the weights."""
    for state in optimizer_state["state"].values():
        master = state.get("fp32_param")
        if master is not None and master.key not in saved_keys:
            del state["fp32_param"]


def _pipeline_peers():
    from megatron.core import parallel_state

    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    previous = None if first else parallel_state.get_pipeline_model_parallel_prev_rank()
    following = None if last else parallel_state.get_pipeline_model_parallel_next_rank()
    return previous, following


def flag_first_microbatch(model) -> None:
    """Have Transformer Engine quantize the FP8 weights afresh at the next forward: TE reuses a
    layer's FP8 copy of its weights until a micro-batch is flagged first, and megatron-core's
    schedules flag the first of every step (set_is_first_microbatch), as must any other loop."""
    if hasattr(model, "set_is_first_microbatch"):
        model.set_is_first_microbatch()


def gpipe_forward_backward(*, forward_step_func, data_iterator, model, num_microbatches, seq_length,
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
    flag_first_microbatch(model)
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
    finalize_grads([model])
    return reports


def _all_reduce_grads(params: list, group, average: bool) -> None:
    grads = [p.master.grad for p in params if p.master.grad is not None]  # FP32 main gradients
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


def finalize_grads(chunks: list) -> None:
    """What megatron-core's DDP and finalize_model_grads do: average gradients over data-parallel
    ranks; sum sequence-parallel norm gradients over the tensor-parallel group."""
    from megatron.core import parallel_state

    params = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]
    _all_reduce_grads([p for p in params if getattr(p, "sequence_parallel", False)],
                      parallel_state.get_tensor_model_parallel_group(), average=False)
    _all_reduce_grads(params, parallel_state.get_data_parallel_group(), average=True)


def torch_engine(chunks: list, config, backend: str) -> Engine:
    if len(chunks) > 1:
        raise InputError("virtual pipeline stages need megatron-core's interleaved schedule",
                         fix="use engine megatron (or auto on a GPU), or unset parallel.virtual_pipeline")
    if config.precision.bf16:
        for chunk in chunks:  # what megatron-core's Float16Module does: torch's RMSNorm ignores params_dtype
            chunk.bfloat16()
    optimizer = TorchOptimizer(chunks, config.optimizer)

    def forward_backward(**kwargs):
        optimizer.zero_grad()
        return gpipe_forward_backward(**kwargs)

    return Engine("portable", chunks, chunks, optimizer, forward_backward, OPTIMIZER_FORMAT, backend)
