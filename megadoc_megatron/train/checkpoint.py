"""Checkpoints with megatron-core's `dist_checkpointing`, in Megatron-LM's layout:
`DIR/iter_0000100/` and `DIR/latest_checkpointed_iteration.txt`.

A checkpoint holds the model, the optimizer (moments sharded like their parameters, so a run can
resume under another tensor/pipeline/data-parallel layout), the learning-rate scheduler, the
iteration and samples consumed (the data position), and every rank's RNG states. The tracker file
is written by rank 0 only after every rank has finished writing, and atomically: a checkpoint
interrupted by a kill is never taken as the latest.

`Checkpointer` is the training loop's side: where a run starts (resumed, or from another run's
checkpoint) and when it saves.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megadoc_megatron.errors import InputError
from megadoc_megatron.files import write_text_atomic
from megadoc_megatron.train.engines.cuda_on_cpu import megatron_core_on_cpu
from megadoc_megatron.train.engines.plain_torch import keep_saved_masters

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(root, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root) -> int | None:
    """The iteration named by the tracker file, or None when there is no complete checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit() or not iteration_dir(root, int(text)).is_dir():
        raise InputError(f"the checkpoint tracker names {text!r}, which is not a checkpoint here", tracker,
                         fix=_tracker_repair(root, int(text) if text.isdigit() else None))
    return int(text)


def _tracker_repair(root, named: int | None) -> str:
    """Saves run in order, each completed before the tracker names it: below a named iteration every
    iter_ folder is complete, so the newest of them can be resumed from."""
    saved = sorted(int(p.name[len("iter_"):]) for p in Path(root).glob("iter_*") if p.name[len("iter_"):].isdigit())
    below = [i for i in saved if named is None or i < named]
    if named is not None and below:
        return (f"write {below[-1]} into it to resume from iter_{below[-1]:07d}, the newest complete checkpoint "
                f"below it (or restore iter_{named:07d})")
    if named is None and saved:
        return f"write the iteration of the newest complete save into it (iter_ folders: {', '.join(map(str, saved))})"
    return "restore the missing iter_ folder, or remove the tracker file to start afresh"


def layout() -> dict:
    from megatron.core import parallel_state

    return {"tensor": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
            "data": parallel_state.get_data_parallel_world_size()}


def _rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        states["cuda"] = torch.cuda.get_rng_state()
        states["cuda_tracker"] = get_cuda_rng_tracker().get_states()
    return states


def _restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        torch.cuda.set_rng_state(states["cuda"])
        get_cuda_rng_tracker().set_states(states["cuda_tracker"])


def _sharded_rng(states: dict | None):
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = tuple(layout()[k] for k in ("pipeline", "tensor", "data"))
    offset = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
              parallel_state.get_data_parallel_rank())
    return ShardedObject("rng_state", states, shape, offset, replica_id=0)


def _model_keys(chunks: list) -> list[str]:
    """Megatron-LM's names: `model`, or `model0`, `model1`... with virtual pipeline stages."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


# Transformer Engine's layer spec fuses the norm before attention and before the MLP into the
# linear layer after it; the portable spec keeps them apart. Same weights, other names.
TE_NORM_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                 "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def model_state(chunk, metadata: dict | None = None, backend: str | None = None, saved_backend: str | None = None):
    """A model chunk's sharded state dict, its tensors named as a checkpoint of `saved_backend`'s
    layers names them (checkpoints move between the Transformer Engine and portable specs; TE's
    FP8 metadata, which the portable spec has no place for, is left out)."""
    state = chunk.sharded_state_dict(metadata=dict(metadata or {}))  # megatron-core adds process groups to it
    if saved_backend is None or saved_backend == backend:
        return state
    renames = TE_NORM_NAMES if saved_backend == "te" else {te: ours for ours, te in TE_NORM_NAMES.items()}
    renamed = {}
    for name, item in state.items():
        if name.endswith("_extra_state"):
            continue
        ending = next((ending for ending in renames if item.key.endswith(ending)), None)
        renamed[name] = dataclasses.replace(item, key=item.key[:-len(ending)] + renames[ending]) if ending else item
    return renamed


def load_model_state(chunk, loaded: dict) -> None:
    """Load weights into a chunk; only TE's FP8 metadata may be missing (from a portable checkpoint)."""
    missing, unexpected = chunk.load_state_dict(loaded, strict=False)
    wrong = [key for key in missing if not key.endswith("_extra_state")] + list(unexpected)
    if wrong:
        raise InputError(f"the checkpoint's model does not fit this one: {wrong[:3]}",
                         fix="load it with the model preset and overrides it was trained with")


def _sharded_state(engine, scheduler, is_loading: bool, rng: dict | None, optimizer: bool = True,
                   metadata: dict | None = None, saved_backend: str | None = None) -> dict:
    """What megatron-core saves or loads; `metadata` (how the optimizer state is laid out) defaults
    to the engine's: a load passes the checkpoint's, and the layer spec the checkpoint was saved with."""
    metadata = metadata or engine.checkpoint_metadata
    state = {key: model_state(chunk, metadata, engine.backend, saved_backend)
             for key, chunk in zip(_model_keys(engine.chunks), engine.chunks)}
    if optimizer:
        state["optimizer"] = engine.optimizer.sharded_state_dict(dict(state), is_loading=is_loading,
                                                                 metadata=dict(metadata or {}))
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if rng is not None or is_loading:
        state["rng_state"] = _sharded_rng(rng)
    return state


@dataclass
class CheckpointInfo:
    """What a checkpoint records about its run besides weights and config (the `info` of its common
    state): enough for evaluation and the report to rebuild the model without the training data."""
    seq_length: int
    vocab_size: int
    tokenizer: dict                 # data/tokenizer.py's describe(): type, model, fingerprint, vocab_size, eod
    backend: str = "portable"       # the layer spec it was trained with: te | portable
    init_from: dict | None = None   # {"dir", "iteration"} when it started from another run's weights
    blend: dict | None = None       # {"path", "fingerprint"}: the blend it trained on (Blend.fingerprint)

    def to_dict(self) -> dict:
        values = asdict(self)
        for optional in ("init_from", "blend"):
            if values[optional] is None:
                del values[optional]
        return values

    @classmethod
    def of(cls, common: dict) -> "CheckpointInfo | None":
        """The info of a checkpoint's common state; None for checkpoints older than this record."""
        info = common.get("info") or {}
        return cls(**info) if "seq_length" in info else None


def saved_backend(common: dict) -> str | None:
    info = CheckpointInfo.of(common)
    return info.backend if info else None


def optimizer_mismatch(common: dict, engine) -> str | None:
    """Why this engine cannot take the optimizer state of a checkpoint (its common state), or None."""
    saved_format, saved_layout = common.get("optimizer_format", "portable"), common["layout"]
    if saved_format != engine.optimizer_format:
        return f"its optimizer state was kept by {saved_format}, this run's is kept by {engine.optimizer_format}"
    if saved_backend(common) not in (None, engine.backend):
        return f"it was trained with {saved_backend(common)} layers, this run has {engine.backend} layers"
    current = layout()
    sharding = (common.get("sharding_metadata") or {}).get("distrib_optim_sharding_type")
    if sharding == "dp_reshardable" and any(saved_layout[k] != current[k] for k in ("tensor", "pipeline")):
        return (f"its distributed-optimizer state is laid out for tensor {saved_layout['tensor']} x pipeline "
                f"{saved_layout['pipeline']} ranks, this run has tensor {current['tensor']} "
                f"x pipeline {current['pipeline']}")
    return None


def save(root, iteration: int, consumed_samples: int, engine, scheduler, config: dict,
         info: dict | None = None) -> Path:
    """Write a checkpoint of every rank, then mark it the latest. `info` (sequence length, vocabulary,
    tokenizer) lets evaluation rebuild the model without the training data."""
    from megatron.core import dist_checkpointing

    target = iteration_dir(root, iteration)
    if dist.get_rank() == 0:
        if target.exists():  # left by an interrupted save of the same iteration
            shutil.rmtree(target)
        target.mkdir(parents=True)
    dist.barrier()
    state = _sharded_state(engine, scheduler, is_loading=False, rng=_rng_states())
    state.update(iteration=iteration, consumed_samples=consumed_samples, layout=layout(), config=config,
                 info=info.to_dict() if info else {}, optimizer_format=engine.optimizer_format,
                 sharding_metadata=dict(engine.checkpoint_metadata or {}))
    with megatron_core_on_cpu():  # its writer synchronizes CUDA and flags failures on the current device
        dist_checkpointing.save(state, str(target))
    dist.barrier()
    if dist.get_rank() == 0:
        write_text_atomic(Path(root) / TRACKER, f"{iteration}\n")
    dist.barrier()
    return target


def read_common(source) -> dict:
    """The common (not sharded) state of a checkpoint's iteration folder."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(source))


def load(root, engine, scheduler) -> tuple[int, int, str]:
    """Restore the latest complete checkpoint in root: (iteration, consumed samples, a note);
    (0, 0, note) when there is none. With scheduler None (a new run starting from another run's
    checkpoint) the weights are restored, and the optimizer state where this engine can take it."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root)
    if iteration is None:
        return 0, 0, f"no checkpoint in {root}: starting from scratch"
    source = iteration_dir(root, iteration)
    common = read_common(source)
    mismatch = optimizer_mismatch(common, engine)
    if mismatch and scheduler is not None:
        raise InputError(f"cannot resume from this checkpoint: {mismatch}", source,
                         fix="resume with the engine, parallel.distributed_optimizer and tensor/pipeline sizes it was "
                             "saved with (checkpoint.reshardable_optimizer lets later saves change them), or start a "
                             "new run from its weights with checkpoint.init_from")
    restore_rng = scheduler is not None and common["layout"] == layout()  # RNG states belong to ranks
    state = _sharded_state(engine, scheduler, is_loading=True, rng=None, optimizer=not mismatch,
                           metadata=common.get("sharding_metadata"), saved_backend=saved_backend(common))
    if not restore_rng:
        del state["rng_state"]
    if engine.name == "portable" and not mismatch:
        keep_saved_masters(state["optimizer"], dist_checkpointing.load_tensors_metadata(str(source)))
    loaded = dist_checkpointing.load(state, str(source))
    for key, chunk in zip(_model_keys(engine.chunks), engine.chunks):
        load_model_state(chunk, loaded[key])
    if mismatch:  # the FP32 master weights of a BF16 run must start from the loaded weights too
        engine.optimizer.reload_model_params()
    else:
        engine.optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if restore_rng:
        _restore_rng(loaded["rng_state"])
    if scheduler is None:
        note = f"the weights and optimizer state of {source}" if not mismatch else \
            f"the weights of {source} (its optimizer state is not taken: {mismatch})"
        return iteration, common["consumed_samples"], note
    note = f"resumed from {source} (iteration {iteration}, {common['consumed_samples']:,} samples consumed)"
    if not restore_rng:
        note += f"; layout {common['layout']} -> {layout()}: RNG states start afresh"
    return iteration, common["consumed_samples"], note


class Checkpointer:
    """A training run's checkpoints: where it starts (`start`) and when it saves (every
    checkpoint.save_interval iterations, at the last one, and when forced; once per iteration at most)."""

    def __init__(self, config, engine, scheduler, info: CheckpointInfo):
        self.config, self.settings = config, config.checkpoint
        self.engine, self.scheduler, self.info = engine, scheduler, info
        self.saved_at = None

    def start(self) -> tuple[int, int, str]:
        """(iteration, consumed samples, a note): resume from checkpoint.dir, else start from
        checkpoint.init_from's weights and optimizer state, else from scratch."""
        start, consumed, note = 0, 0, "checkpoint.dir is empty: no checkpoints"
        if self.settings.dir and self.settings.load:
            changed = self._same_run_check()
            start, consumed, note = load(self.settings.dir, self.engine, self.scheduler)
            note += "".join(f"\nchanged since the checkpoint: {change}" for change in changed)
        if start == 0 and self.settings.init_from:
            note = self._init_from(self.settings.init_from)
        return start, consumed, note

    def _same_run_check(self) -> list[str]:
        """What differs between the latest checkpoint in dir and this run, before anything loads: another
        model or tokenizer is refused, another blend or sequence length unless checkpoint.allow_changed_data
        (then returned, to print); another parallel layout is allowed (`load` says so)."""
        iteration = latest_iteration(self.settings.dir)
        if iteration is None:
            return []
        source = iteration_dir(self.settings.dir, iteration)
        common = read_common(source)
        saved, model = CheckpointInfo.of(common), common["config"]["model"]
        fix = "resume with the settings it was trained with, or give this run another checkpoint.dir"
        for field in ("preset", "overrides"):
            if model.get(field) != getattr(self.config.model, field):
                raise InputError(f"this checkpoint holds another model: model.{field} {model.get(field)!r} there, "
                                 f"{getattr(self.config.model, field)!r} here", source, fix=fix)
        if saved and saved.tokenizer.get("fingerprint") != self.info.tokenizer.get("fingerprint"):
            raise InputError(f"this checkpoint was trained with another tokenizer ({saved.tokenizer.get('model')}, "
                             f"here {self.info.tokenizer.get('model')})", source, fix=fix)
        data = []
        if saved and saved.seq_length != self.info.seq_length:
            data.append(f"sequence length {saved.seq_length} -> {self.info.seq_length}")
        if saved and saved.blend and saved.blend["fingerprint"] != self.info.blend["fingerprint"]:
            data.append(f"blend {saved.blend['path']} (draws {saved.blend['fingerprint']}) -> "
                        f"{self.info.blend['path']} (draws {self.info.blend['fingerprint']})")
        if data and not self.settings.allow_changed_data:
            raise InputError(f"the data differ from the checkpoint's ({'; '.join(data)})", source,
                             fix="resume with the blend it was trained on, or pass --allow-changed-data "
                                 "(checkpoint.allow_changed_data: true) to continue on the new data")
        return data

    def _init_from(self, root: str) -> str:
        if latest_iteration(root) is None:
            raise InputError("checkpoint.init_from holds no checkpoint", root,
                             fix="point it at a checkpoint.dir of a finished run")
        iteration, _, taken = load(root, self.engine, scheduler=None)
        self.scheduler.step(increment=0)  # the loaded optimizer state carries the old run's learning rate
        self.info.init_from = {"dir": str(Path(root).resolve()), "iteration": iteration}
        return f"started from {taken}; iterations, data and learning-rate schedule start afresh"

    def should_save(self, iteration: int, last: bool) -> bool:
        interval = self.settings.save_interval
        return bool(self.settings.dir) and (last or bool(interval) and iteration % interval == 0)

    def save(self, iteration: int, consumed: int, last: bool = False, force: bool = False) -> bool:
        """Save when due (or forced, given a checkpoint.dir) unless already saved at this iteration;
        whether it saved."""
        if not self.settings.dir or self.saved_at == iteration or not (force or self.should_save(iteration, last)):
            return False
        with self.engine.params_synchronized():
            save(self.settings.dir, iteration, consumed, self.engine, self.scheduler, self.config.to_dict(), self.info)
        self.saved_at = iteration
        return True
