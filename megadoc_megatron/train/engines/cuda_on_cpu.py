"""Run megatron-core's GPU-only training machinery on CPU: `DistributedDataParallel` and its
gradient buffers, the (distributed) optimizer, the pipeline schedules and `finalize_model_grads`.

Those places are not CUDA programs; they only *place* tensors on CUDA (`device="cuda"`,
`torch.cuda.current_device()`, `.cuda()`), check `tensor.type()` for `torch.cuda.*` names and
order work on streams. Inside `megatron_core_on_cpu()` every such placement lands on the CPU,
`.type()` names the CUDA type a GPU would have, and streams, events and `torch.cuda.synchronize()`
do nothing (on CPU every operation has finished when it returns). Everything else runs as
written, with torch's CPU kernels and gloo collectives. This is how the CPU tests and the GPU
check's CPU form run the very engine our GPU users get (engine: megatron), and how checkpoints
are saved on CPU (megatron-core's writer synchronizes CUDA and puts a flag on the current device).

It proves what megatron-core computes, not CUDA behaviour (streams, overlap, kernels): that is
the GPU check's job (benchmarks/gpu_check.py).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode


def _relocated(device):
    """The CPU for any CUDA device (a name, a torch.device or an index); other devices unchanged."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    return torch.device("cpu") if torch.device(device).type == "cuda" else device


def _is_device(value) -> bool:
    """Whether a positional argument of `Tensor.to` names a device (not a dtype or a tensor)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, torch.device)):
        return True
    return isinstance(value, str) and value.split(":")[0] in ("cuda", "cpu", "meta")


class _CudaPlacementOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _relocated(kwargs["device"])
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "to":
            args = tuple(_relocated(a) if _is_device(a) else a for a in args)
        if name == "type" and len(args) == 1 and not kwargs:
            described = func(*args)
            return described.replace("torch.", "torch.cuda.", 1) if ".cuda." not in described else described
        return func(*args, **kwargs)


class _CompletedWork:
    """A CUDA stream or event on CPU, where every operation has finished when it returns."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, *args) -> None: ...
    def wait_stream(self, *args) -> None: ...
    def record_event(self, *args) -> "_CompletedWork": return _CompletedWork()
    def record(self, *args) -> None: ...
    def synchronize(self) -> None: ...
    def query(self) -> bool: return True


@contextmanager
def megatron_core_on_cpu():
    """Within: megatron-core's CUDA tensor placements go to the CPU (see the module docstring).
    Does nothing when CUDA is present."""
    if torch.cuda.is_available():
        yield
        return
    with ExitStack() as stack:
        stack.enter_context(mock.patch("torch.cuda.current_device", return_value=0))
        stack.enter_context(mock.patch("torch.cuda.synchronize"))
        for name in ("current_stream", "default_stream", "Stream", "Event"):  # core 0.19 waits on streams
            stack.enter_context(mock.patch(f"torch.cuda.{name}", _CompletedWork))
        stack.enter_context(mock.patch("torch.cuda.stream", lambda *args: nullcontext()))
        stack.enter_context(_CudaPlacementOnCpu())
        yield
