"""Process-group setup for `torchrun`, `srun` (SLURM) or a plain single process.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under `srun` (one task per
GPU) they are derived from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the first host of
SLURM_JOB_NODELIST (MASTER_PORT defaults to 29500 + the job id modulo 1000, so jobs sharing a node
do not collide). With neither, the run is one process on loopback.
"""

from __future__ import annotations

import os
import socket
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from megadoc_megatron.errors import InputError


@dataclass(frozen=True)
class LaunchEnvironment:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list ('gpu[003-005,9]' -> 'gpu003'); scontrol when available."""
    try:
        return subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                              text=True).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        prefix, _, ranges = nodelist.split(",")[0].partition("[")
        return prefix + ranges.split(",")[0].split("-")[0].rstrip("]") if ranges else prefix


def free_port() -> int:
    """A TCP port free on loopback now (for single-machine process groups)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_environment(env=os.environ) -> LaunchEnvironment:
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnvironment(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                                 env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        master = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "localhost"))
        port = int(env.get("MASTER_PORT") or 29500 + int(env.get("SLURM_JOB_ID", 0)) % 1000)
        return LaunchEnvironment(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                                 int(env.get("SLURM_LOCALID", 0)), master, port, "slurm")
    return LaunchEnvironment(0, 1, 0, "127.0.0.1", free_port(), "single")


def one_cuda_connection(parallel, env=os.environ) -> None:
    """With tensor parallelism, megatron-core orders its communication kernels before the compute that
    depends on them by queueing everything on one hardware queue: CUDA_DEVICE_MAX_CONNECTIONS=1,
    read when the CUDA context is created (Megatron-LM refuses sequence parallelism without it).
    Set here, before that, so that no launcher has to remember it."""
    if parallel.tensor == 1:
        return
    current = env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if current != "1":
        raise InputError(f"CUDA_DEVICE_MAX_CONNECTIONS is {current}; tensor parallelism ({parallel.tensor}) needs 1",
                         fix="unset it (megadoc train sets it) or export CUDA_DEVICE_MAX_CONNECTIONS=1")


def initialize(parallel=None, launch: LaunchEnvironment | None = None):
    """torch.distributed (NCCL on GPU, gloo on CPU) and megatron-core's model-parallel groups
    (`parallel`: a ParallelConfig; None: TP = PP = 1). The project's one way to start a group."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    launch = launch or launch_environment()
    cuda = torch.cuda.is_available()
    if cuda:
        if parallel is not None:
            one_cuda_connection(parallel)
        torch.cuda.set_device(launch.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=launch.rank, world_size=launch.world_size,
                                init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                timeout=timedelta(minutes=30))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor if parallel else 1,
        pipeline_model_parallel_size=parallel.pipeline if parallel else 1,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline if parallel else None)
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


@contextmanager
def single_process():
    """`initialize` as one process on loopback for the length of a block, unless the caller already
    has a process group (then the block runs in it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    initialize(launch=launch_environment({}))
    try:
        yield
    finally:
        shutdown()


def shutdown() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
