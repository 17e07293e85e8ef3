"""megatron-core's datasets of a blend: the one `GPTDatasetConfig` builder (training and
`megadoc blend --verify` draw the same samples), and the verification that counts what it draws.

megatron-core is imported inside the functions: importing it takes ~10 s on CPU.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from megadoc_megatron.blend.weights import MEGATRON_SURPLUS, Blend, samples_for_epochs
from megadoc_megatron.data.dataset_info import DatasetInfo, recorded_tokenizer
from megadoc_megatron.data.indexed import read_index
from megadoc_megatron.distributed import single_process
from megadoc_megatron.errors import InputError


def dataset_tokenizer(prefix: str):
    """The tokenizer recorded by `megadoc preprocess`; for datasets made elsewhere, only what
    GPTDataset needs to build its indices (no vocabulary: the dtype is read from the .idx)."""
    return recorded_tokenizer(prefix) or SimpleNamespace(vocab_size=None, eod=None,
                                                         unique_identifiers={"class": "unknown"})


def load_checked(path) -> Blend:
    """blend.json, with every dataset it names present and whole (before any training starts)."""
    blend = Blend.load(path)
    missing = [p for d in blend.datasets for p in (d.prefix + ".idx", d.prefix + ".bin") if not Path(p).is_file()]
    if missing:
        raise InputError(f"the blend names a dataset file that is missing: {missing[0]}", path,
                         fix="rerun `megadoc preprocess` for it, or `megadoc blend` with the datasets you have")
    for prefix in [d.prefix for d in blend.datasets] + blend.validation_prefixes():
        read_index(prefix)  # a cut or mismatched .bin/.idx stops the run here
    return blend


def run_tokenizer(blend: Blend, tokenizer_type: str = "", tokenizer_model: str = "", eod_expected: bool = False):
    """The run's tokenizer: the one named (data.tokenizer_type and data.tokenizer_model), else the one the
    first dataset's sidecar records; every dataset, held-out ones included, is checked against it."""
    prefixes = [d.prefix for d in blend.datasets] + blend.validation_prefixes()
    if tokenizer_type:
        from megadoc_megatron.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_type, tokenizer_model)
    else:
        tokenizer = recorded_tokenizer(prefixes[0])
        if tokenizer is None:
            raise InputError("the dataset has no sidecar naming its tokenizer (it was made without `megadoc "
                             "preprocess`), so the vocabulary is unknown", prefixes[0],
                             fix="name the tokenizer it was made with in the train config: data.tokenizer_type and "
                                 "data.tokenizer_model")
    check_tokenized_alike(prefixes, tokenizer.describe(), eod_expected)
    return tokenizer


def check_tokenized_alike(prefixes: list[str], tokenizer: dict, eod_expected: bool = False,
                          whose: str = "the run's tokenizer") -> None:
    """Every dataset tokenized with `tokenizer` (as `Tokenizer.describe()` and checkpoints record it): by its
    sidecar, or for one made without it (by Megatron-LM) by what its tokens can show: a dtype that holds the
    vocabulary, every id inside it, and (where documents must end with the end-of-document token: document
    masking, eod_mask_loss) that token at their ends."""
    fix = "convert every dataset of the run, held-out data included, with one tokenizer (`megadoc preprocess`)"
    named = f"{tokenizer['type']} {tokenizer['model']}"
    for prefix in prefixes:
        info = DatasetInfo.load(prefix)
        if info is not None:
            if info.tokenizer.get("fingerprint") != tokenizer["fingerprint"]:
                raise InputError(f"tokenized with {info.tokenizer.get('type')} {info.tokenizer.get('model')}, "
                                 f"{whose} is {named}", prefix, fix=fix)
            continue
        index = read_index(prefix)
        vocabulary = f"the vocabulary of {tokenizer['vocab_size']} of {whose} ({named}; the dataset has no sidecar)"
        if np.iinfo(index.dtype).max < tokenizer["vocab_size"] - 1:
            raise InputError(f"stores tokens as {np.dtype(index.dtype).name}, too small for {vocabulary}", prefix,
                             fix=fix)
        largest = index.largest_token()
        if largest >= tokenizer["vocab_size"]:
            raise InputError(f"holds token id {largest}, beyond {vocabulary}", prefix, fix=fix)
        eod = tokenizer.get("eod")
        if eod_expected and eod is not None and not _ends_with(index, eod):
            raise InputError(f"no document ends with the end-of-document token {eod} of {named}, which document "
                             "masking and eod_mask_loss need", prefix,
                             fix="convert it with --append-eod, or turn off data.reset_attention_mask and "
                                 "data.eod_mask_loss")


def _ends_with(index, token: int, documents: int = 100) -> bool:
    """Whether any of the first documents ends with `token`."""
    return any(index.document_tokens(d)[-1:].tolist() == [token] for d in range(min(documents, index.num_documents)))


def gpt_dataset_config(blend: Blend, eod_mask_loss: bool = False, tokenizer=None):
    """Training data from the blend's weights over its --split, or with held-out data (--valid-data-path,
    which needs split 100,0,0) the whole datasets for training and the held-out ones for validation."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    valid = blend.validation_prefixes()
    data = {"blend_per_split": [blend.train_blend(), (valid, [1.0] * len(valid)), None]} if valid else \
        {"blend": blend.train_blend(), "split": blend.split}
    Path(blend.data_cache_path).mkdir(parents=True, exist_ok=True)
    return GPTDatasetConfig(
        random_seed=blend.seed, sequence_length=blend.seq_length, path_to_cache=blend.data_cache_path,
        tokenizer=tokenizer or dataset_tokenizer(blend.datasets[0].prefix),
        # Document masking is applied in the forward step (packed sequences), not by dense masks here.
        reset_position_ids=False, reset_attention_mask=False, create_attention_mask=False,
        eod_mask_loss=eod_mask_loss, mid_level_dataset_surplus=MEGATRON_SURPLUS, **data)


def build_datasets(blend: Blend, train_samples: int, valid_samples: int, eod_mask_loss: bool = False,
                   tokenizer=None):
    """(train, valid or None) megatron-core datasets. Every rank builds its own (global rank 0 writes
    the index caches, the others load them)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    sizes = [train_samples, valid_samples if blend.validation_prefixes() else 0, 0]
    config = gpt_dataset_config(blend, eod_mask_loss, tokenizer)
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return train, valid


def verify_blend(blend: Blend) -> list[dict]:
    """Per dataset: samples drawn in the first `train_samples` of megatron-core's blend, and epochs."""
    length = blend.seq_length
    with single_process():
        train, _ = build_datasets(blend, blend.train_samples, 0)
    consumed = slice(0, blend.train_samples)  # what training reads; the blend may hold one more
    which, sample = train.dataset_index[consumed], train.dataset_sample_index[consumed]
    report = []
    for i, (dataset, built) in enumerate(zip(blend.datasets, train.datasets)):
        positions = built.shuffle_index[sample[which == i]]
        row = {"prefix": dataset.prefix, "stream": dataset.stream, "planned": dataset.samples,
               "drawn": len(positions), "epochs": len(positions) * length / dataset.train_tokens}
        if dataset.stream == "real" and blend.epochs is not None:
            full_passes = samples_for_epochs(dataset.train_tokens, blend.epochs, length)
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
