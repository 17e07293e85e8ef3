"""Training and validation data from a `megadoc blend` plan, through megatron-core's
`BlendedMegatronDatasetBuilder` and `GPTDataset` (the same samples Megatron-LM would draw).

Sample order follows Megatron-LM's pretraining sampler: the train stream is read in order from
`consumed_samples`; each run of `micro_batch_size * data_parallel_size` samples is one micro-batch
per data-parallel rank. Resuming therefore needs nothing but the number of samples consumed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megadoc_megatron.data.blend import MEGATRON_SURPLUS
from megadoc_megatron.data.blend_verify import dataset_tokenizer
from megadoc_megatron.data.indexed import read_index
from megadoc_megatron.errors import InputError


def load_plan(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError("blend plan not found", path, fix="run `megadoc blend ... --output-dir DIR` and use DIR/blend.json")
    plan = json.loads(path.read_text())
    missing = [p for d in plan["datasets"] for p in (d["prefix"] + ".idx", d["prefix"] + ".bin") if not Path(p).is_file()]
    if missing:
        raise InputError(f"the blend names a dataset file that is missing: {missing[0]}", path,
                         fix="rerun `megadoc preprocess` for it, or `megadoc blend` with the datasets you have")
    for prefix in [d["prefix"] for d in plan["datasets"]] + validation_prefixes(plan):
        read_index(prefix)  # a cut or mismatched .bin/.idx stops the run here, before any training
    return plan


def validation_prefixes(plan: dict) -> list[str]:
    per_split = plan["files"].get("per_split_data_args")
    if not per_split:
        return []
    return json.loads(Path(per_split).read_text())["valid"][1::2]


def build_datasets(plan: dict, train_samples: int, valid_samples: int, data_config):
    """(train, valid or None) megatron-core datasets; valid comes from the blend's held-out data."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    train_blend = ([d["prefix"] for d in plan["datasets"]], [d["weight"] for d in plan["datasets"]])
    valid = validation_prefixes(plan)
    valid_blend = (valid, [1.0] * len(valid)) if valid else None
    config = GPTDatasetConfig(
        random_seed=plan["seed"], sequence_length=plan["seq_length"],
        blend_per_split=[train_blend, valid_blend, None], path_to_cache=plan["data_cache_path"],
        tokenizer=dataset_tokenizer(plan["datasets"][0]["prefix"]),
        # Document masking is applied in the forward step (packed sequences), not by dense masks here.
        reset_position_ids=False, reset_attention_mask=False, create_attention_mask=False,
        eod_mask_loss=data_config.eod_mask_loss,
        mid_level_dataset_surplus=MEGATRON_SURPLUS)
    Path(plan["data_cache_path"]).mkdir(parents=True, exist_ok=True)
    sizes = [train_samples, valid_samples if valid else 0, 0]
    # Every rank reads its own batches (global rank 0 builds the index caches, the others load them).
    train, valid_set, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, lambda: True, config).build()
    return train, valid_set


class MicroBatchSampler(torch.utils.data.Sampler):
    """Indices of this data-parallel rank's micro-batches, from `start` to `end` samples."""

    def __init__(self, start: int, end: int, micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int):
        self.start, self.end = start, end
        self.micro_batch_size, self.rank, self.size = micro_batch_size, data_parallel_rank, data_parallel_size

    def __iter__(self):
        stride = self.micro_batch_size * self.size
        for first in range(self.start, self.end - stride + 1, stride):
            begin = first + self.rank * self.micro_batch_size
            yield list(range(begin, begin + self.micro_batch_size))

    def __len__(self) -> int:
        return (self.end - self.start) // (self.micro_batch_size * self.size)


def micro_batches(dataset, start: int, end: int, micro_batch_size: int, num_workers: int = 0):
    """Iterator over this rank's micro-batches (dicts of tensors) of samples [start, end)."""
    from megatron.core import parallel_state

    sampler = MicroBatchSampler(start, end, micro_batch_size, parallel_state.get_data_parallel_rank(),
                                parallel_state.get_data_parallel_world_size())
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                            pin_memory=torch.cuda.is_available()))
