"""The training config: a YAML file of sections, every field checked, `--set section.field=value` overrides.

Example (examples/tiny_cpu/train.yaml is a complete one):

    data: {blend: work/blend/blend.json, micro_batch_size: 2}
    model: {preset: tiny}
    optimizer: {lr: 3.0e-3, warmup_iters: 5}
    checkpoint: {dir: work/checkpoints, save_interval: 50}
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from megadoc_megatron.config import build_dataclass, merge_dicts, parse_overrides, read_yaml
from megadoc_megatron.errors import InputError


@dataclass
class DataConfig:
    blend: str = ""                     # blend.json from `megadoc blend`: datasets, seq length, global batch,
                                        # iterations
    micro_batch_size: int = 1
    eod_mask_loss: bool = False         # no loss on the end-of-document token
    reset_attention_mask: bool = False  # documents packed in one sequence do not attend to each other (packed
                                        # sequences with cu_seqlens: honoured by Transformer Engine and portable layers)
    num_workers: int = 0                # DataLoader worker processes
    tokenizer_type: str = ""            # the tokenizer of datasets made without `megadoc preprocess` (no sidecar):
    tokenizer_model: str = ""           # Megatron's --tokenizer-type and its model path; checked against them


@dataclass
class ModelConfig:
    preset: str = "tiny"
    backend: str = "auto"               # te | portable | auto (te when Transformer Engine imports on a GPU)
    recompute: str = "none"             # none | selective (core attention) | full (every layer): activation
                                        # memory for compute, as Megatron-LM's --recompute-granularity
    overrides: dict = field(default_factory=dict)  # any megatron-core TransformerConfig field


@dataclass
class PrecisionConfig:
    bf16: bool = False
    fp8: str | None = None              # hybrid | e4m3 (Transformer Engine, H100)
    fp8_recipe: str = "delayed"         # delayed | tensorwise (current scaling)
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None  # model chunks per pipeline stage (GPU schedules only)
    sequence_parallel: bool = False
    distributed_optimizer: bool = True   # shard optimizer state over data-parallel ranks (engine megatron)
    overlap_grad_reduce: bool = True     # reduce-scatter gradients during the backward pass (engine megatron)
    overlap_param_gather: bool = True    # all-gather updated parameters during the next forward pass
                                         # (engine megatron, with the distributed optimizer)


@dataclass
class OptimizerConfig:
    lr: float = 3.0e-4
    min_lr: float = 0.0                  # the cosine decays to this floor
    warmup_iters: int = 0
    decay_style: str = "cosine"          # cosine | linear | constant | inverse-square-root
    weight_decay: float = 0.1            # decoupled (AdamW); not applied to norms and biases
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0
    max_skipped_in_a_row: int = 10       # stop when this many updates in a row had non-finite gradients


@dataclass
class CheckpointConfig:
    dir: str = ""                        # empty: no checkpoints
    save_interval: int = 0               # iterations; 0: only at the end
    load: bool = True                    # resume from the latest complete checkpoint in dir
    reshardable_optimizer: bool = False  # engine megatron with the distributed optimizer: keep its state in model
                                         # space, so a resume may change tensor/pipeline sizes (gathered at each
                                         # save; Megatron-LM's --dist-ckpt-optim-fully-reshardable)
    init_from: str = ""                  # while dir holds none: start from the latest checkpoint here (weights and
                                         # optimizer state; iterations, data and learning-rate schedule start afresh)
    allow_changed_data: bool = False     # resume although the blend or sequence length differs from the checkpoint's


@dataclass
class LoggingConfig:
    log_interval: int = 1
    eval_interval: int = 0               # iterations between validation losses; 0: only at the end
    eval_iters: int = 1                  # global batches of held-out data per validation
    tensorboard_dir: str = ""
    wandb_project: str = ""
    peak_tflops: float | None = None     # per device, for MFU; None: the GPU's datasheet peak (FP8 when on),
                                         # else no MFU


@dataclass
class ExitConfig:
    signals: list = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # signals that stop training after the
                                         # iteration in flight, with a checkpoint and exit status 75 (SLURM sends
                                         # them before a time limit or on preemption); []: none
    duration_minutes: float = 0          # stop the same way once this process has trained this long, counted from
                                         # the trainer's start (Megatron-LM's --exit-duration-in-mins); 0: never


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    exit: ExitConfig = field(default_factory=ExitConfig)
    engine: str = "auto"                 # megatron | portable | auto (megatron-core's on GPU, portable on CPU)
    seed: int = 1234
    train_iters: int | None = None       # None: the blend's iterations (exact epochs); fewer for a short run
    patience: int = 0                    # stop once this many validations in a row found no new best loss (0: never)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PATH_FIELDS = (("data", "blend"), ("data", "tokenizer_model"), ("checkpoint", "dir"), ("checkpoint", "init_from"),
               ("logging", "tensorboard_dir"))


def _resolve_paths(values: dict, base: Path) -> dict:
    """Relative paths are relative to the config file, and to the working directory in --set."""
    for section, name in PATH_FIELDS:
        value = (values.get(section) or {}).get(name) if isinstance(values.get(section), dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            values[section][name] = str((base / value).resolve())
    return values


def config_from_dict(values: dict, source) -> TrainConfig:
    """A config as saved in a checkpoint (`TrainConfig.to_dict`)."""
    return build_dataclass(TrainConfig, values, "", source)


def load_config(path, overrides: list[str] = ()) -> TrainConfig:
    """Read and check a YAML training config, with `section.field=value` overrides on top."""
    path = Path(path)
    values = read_yaml(path, "a YAML training config")
    values = merge_dicts(_resolve_paths(values, path.parent),
                         _resolve_paths(parse_overrides(list(overrides)), Path.cwd()))
    config = build_dataclass(TrainConfig, values, "", path)
    for name, package in (("tensorboard_dir", "tensorboard"), ("wandb_project", "wandb")):
        if getattr(config.logging, name) and importlib.util.find_spec(package) is None:
            raise InputError(f"logging.{name} is set but the {package} package is not installed", path,
                             fix=f"pip install {package}, or unset logging.{name}")
    if not config.data.blend:
        raise InputError("data.blend is not set", path, fix="point it at the blend.json written by `megadoc blend`")
    if config.model.overrides:
        from megadoc_megatron.model.gpt import check_overrides

        check_overrides(config.model.overrides, path)
    if config.patience and not config.logging.eval_interval:
        raise InputError(f"patience {config.patience} needs validation during training", path,
                         fix="set logging.eval_interval (iterations between validations)")
    _check_exit(config.exit, path)
    return config


# What schedulers and people send to ask a job to stop (SIGXCPU: a CPU-time limit). Faults (SIGSEGV...)
# and bookkeeping signals (SIGCHLD...) must keep their own handling.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT", "SIGXCPU")


def _check_exit(settings: ExitConfig, path) -> None:
    for name in settings.signals:
        if name not in STOP_SIGNALS:
            raise InputError(f"exit.signals names {name!r}, which is not a signal training can stop on", path,
                             fix=f"use some of {', '.join(STOP_SIGNALS)} (upper case, with SIG), or [] for none")
    if settings.duration_minutes < 0:
        raise InputError(f"exit.duration_minutes is {settings.duration_minutes}", path,
                         fix="give the minutes this process may train, or 0 for no limit")
