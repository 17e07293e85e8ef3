"""What both engines give the trainer (the Engine record), and which one a config asks for."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

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
    name: str               # the config's engine value: megatron | portable
    chunks: list            # the GPTModel chunks of this rank (unwrapped)
    model: list             # what the schedule runs (wrapped by megatron-core's DDP)
    optimizer: object
    forward_backward: Callable
    optimizer_format: str                # how checkpoints keep the optimizer state (see checkpoint.load)
    backend: str = "portable"            # the layer spec: te | portable
    checkpoint_metadata: dict | None = None  # megatron-core's sharded_state_dict metadata
    params_synchronized: Callable = nullcontext
