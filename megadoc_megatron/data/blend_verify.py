"""`megadoc blend --verify`: build the blend with megatron-core itself and count what it draws.

Kept apart from blend.py because importing megatron-core takes ~10 s on CPU.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from megadoc_megatron.data.blend import MEGATRON_SURPLUS, samples_for_epochs
from megadoc_megatron.data.preprocess import recorded_tokenizer
from megadoc_megatron.distributed import single_process


def dataset_tokenizer(prefix: str):
    """The tokenizer recorded by `megadoc preprocess`; for datasets made elsewhere, only what
    GPTDataset needs to build its indices (no vocabulary: the dtype is read from the .idx)."""
    return recorded_tokenizer(prefix) or SimpleNamespace(vocab_size=None, eod=None,
                                                         unique_identifiers={"class": "unknown"})


def verify_blend(plan: dict) -> list[dict]:
    """Per dataset: samples drawn in the first `train_samples` of megatron-core's blend, and epochs."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    datasets, length = plan["datasets"], plan["seq_length"]
    config = GPTDatasetConfig(
        random_seed=plan["seed"], sequence_length=length,
        blend=([d["prefix"] for d in datasets], [d["weight"] for d in datasets]), split=plan["split"],
        path_to_cache=plan["data_cache_path"], tokenizer=dataset_tokenizer(datasets[0]["prefix"]),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        mid_level_dataset_surplus=MEGATRON_SURPLUS)
    Path(plan["data_cache_path"]).mkdir(parents=True, exist_ok=True)
    with single_process():
        train = BlendedMegatronDatasetBuilder(GPTDataset, [plan["train_samples"], 1, 1], lambda: True, config).build()[0]
    consumed = slice(0, plan["train_samples"])  # what training reads; the blend may hold one more
    which, sample = train.dataset_index[consumed], train.dataset_sample_index[consumed]
    report = []
    for i, (dataset, built) in enumerate(zip(datasets, train.datasets)):
        positions = built.shuffle_index[sample[which == i]]
        row = {"prefix": dataset["prefix"], "stream": dataset["stream"], "planned": dataset["samples"],
               "drawn": len(positions), "epochs": len(positions) * length / dataset["train_tokens"]}
        if dataset["stream"] == "real" and plan["epochs"] is not None:
            full_passes = samples_for_epochs(dataset["train_tokens"], plan["epochs"], length)
            row["samples_in_full_passes"] = full_passes
            row["all_from_full_passes"] = bool(len(np.unique(positions)) == len(positions)
                                               and (positions < full_passes).all())
        report.append(row)
    return report


def format_verification(report: list[dict]) -> str:
    lines = ["verified with megatron-core's BlendedMegatronDatasetBuilder:",
             f"{'stream':<10} {'planned':>10} {'drawn':>10} {'epochs':>8}  dataset"]
    for row in report:
        note = ""
        if "samples_in_full_passes" in row:
            note = (f"  ({row['samples_in_full_passes']:,} samples make the full passes; drawn only from them: "
                    f"{'yes' if row['all_from_full_passes'] else 'NO'})")
        lines.append(f"{row['stream']:<10} {row['planned']:>10,} {row['drawn']:>10,} {row['epochs']:>8.3f}  "
                     f"{row['prefix']}{note}")
    return "\n".join(lines)
