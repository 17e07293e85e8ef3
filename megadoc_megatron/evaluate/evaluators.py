"""`megadoc eval loss|long-context|ensemble|downstream` as a library call: an EvalConfig in, the
EvalResult written beside the checkpoints out."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from megadoc_megatron.errors import InputError
from megadoc_megatron.evaluate.results import EvalResult


@dataclass
class EvalConfig:
    evaluator: str                      # loss | long-context | ensemble | downstream
    checkpoints: list[str]              # checkpoint.dir of `megadoc train` (several: the ensemble's members)
    data: str | None = None             # held-out dataset prefix (not for downstream)
    iteration: int | None = None        # this saved iteration (default: the latest)
    micro_batch: int = 4
    name: str | None = None             # result name (default: the dataset's file name)
    max_tokens: int | None = None       # loss, ensemble: evaluate at most this many tokens
    threshold: int = 2048               # long-context: documents longer than this many tokens are "long"
    buckets: list[int] | None = None    # long-context: position bucket edges
    offset: int | None = None           # long-context: also the mean loss at positions >= offset
    max_documents: int = 500            # long-context: per set
    tasks: list[str] | None = None      # downstream: lm-eval task names
    include_path: str | None = None     # downstream: folder of extra lm-eval task YAMLs
    limit: int | None = None            # downstream: at most this many examples per task
    num_fewshot: int | None = None


def evaluate(config: EvalConfig) -> tuple[EvalResult, Path]:
    """Measure, write the result, and return it with where it was written."""
    from megadoc_megatron.distributed import shutdown
    from megadoc_megatron.evaluate import losses

    dataset = None if config.evaluator == "downstream" else held_out(config.data)
    device = losses.evaluation_process_group()
    try:
        start = time.perf_counter()
        measure = {"downstream": _downstream, "ensemble": _ensemble}.get(config.evaluator, _one_checkpoint)
        members, settings, metrics = measure(config, dataset, device)
        evaluator = config.evaluator + (f"-{len(members)}" if config.evaluator == "ensemble" else "")
        result = EvalResult.measured(evaluator, members, config.data or "lm-eval", settings, metrics,
                                     time.perf_counter() - start)
    finally:
        shutdown()
    return result, result.save(config.name or Path(config.data).name)


def held_out(prefix: str):
    """The held-out dataset, refused before any model loads when it holds no tokens."""
    from megadoc_megatron.data.indexed import read_index

    dataset = read_index(prefix)
    if dataset.num_tokens == 0:
        raise InputError("the held-out dataset holds no tokens", prefix,
                         fix="convert a held-out set with documents (`megadoc preprocess`), or check --valid-data-path")
    return dataset


def _downstream(config: EvalConfig, dataset, device):
    from megadoc_megatron.evaluate import losses
    from megadoc_megatron.evaluate.downstream import downstream_accuracy

    loaded = losses.load_model(config.checkpoints[0], config.iteration, device)
    if not loaded.tokenizer:
        raise InputError("this checkpoint does not record where its tokenizer is", loaded.checkpoint,
                         fix="evaluate checkpoints written by this version of `megadoc train`")
    metrics = downstream_accuracy(loaded, device, config.tasks, config.include_path, config.limit, config.num_fewshot)
    settings = {"tasks": config.tasks, "include_path": config.include_path, "limit": config.limit,
                "num_fewshot": config.num_fewshot}
    return [loaded], settings, metrics


def _ensemble(config: EvalConfig, dataset, device):
    from megadoc_megatron.evaluate import losses

    members, member_losses, sequences = [], [], None
    for root in config.checkpoints:  # one model in memory at a time
        loaded = losses.load_model(root, config.iteration, device)
        losses.check_dataset(dataset, loaded)
        if sequences is None:
            sequences = losses.packed_sequences(dataset, loaded.seq_length, config.max_tokens)
        member_losses.append(losses.sequence_losses(loaded, sequences, device, config.micro_batch))
        members.append(loaded)
        del loaded.model
    metrics = {"tokens": int(member_losses[0].size), "ensembles": losses.ensemble_losses(member_losses)}
    return members, {"max_tokens": config.max_tokens}, metrics


def _one_checkpoint(config: EvalConfig, dataset, device):
    """loss or long-context of one checkpoint."""
    from megadoc_megatron.evaluate import losses

    loaded = losses.load_model(config.checkpoints[0], config.iteration, device)
    losses.check_dataset(dataset, loaded)
    if config.evaluator == "loss":
        metrics = losses.iid_loss(loaded, dataset, device, config.micro_batch, config.max_tokens)
        return [loaded], {"max_tokens": config.max_tokens}, metrics
    metrics = losses.long_context_loss(loaded, dataset, device, config.threshold, config.buckets, config.offset,
                                       config.max_documents, config.micro_batch)
    buckets = metrics["long"]["buckets"]
    settings = {"threshold": config.threshold, "buckets": [b["start"] for b in buckets] + [buckets[-1]["end"]],
                "offset": metrics["long"]["beyond_offset"]["offset"], "max_documents": config.max_documents}
    return [loaded], settings, metrics
