"""`megadoc merge`: join indexed datasets in order into one (the shards of a `preprocess --shard`
array, or any datasets of one tokenizer), as Megatron-LM's `tools/merge_datasets.py` does, with
memory flat in their size. The shards of an array merge into the bytes one run writes.

With `--sample-fraction F` it keeps a seeded share F of the documents instead (the real-only
baselines of a data-efficiency fit: at one seed, each share holds every smaller one)."""

from __future__ import annotations

import argparse
import glob
from dataclasses import replace
from pathlib import Path

from megadoc_megatron import __version__
from megadoc_megatron.data.dataset_info import DatasetInfo
from megadoc_megatron.data.indexed import dataset_paths, merge_datasets, read_index, sampled_documents, write_documents
from megadoc_megatron.errors import InputError
from megadoc_megatron.progress import Progress


def dataset_prefixes(inputs: list[str]) -> list[str]:
    """Prefixes named directly, or by globs of `.idx` files (sorted), in the order given."""
    prefixes: list[str] = []
    for item in inputs:
        if glob.has_magic(item):
            found = [path.removesuffix(".idx") for path in sorted(glob.glob(item)) if path.endswith(".idx")]
        else:
            found = [item.removesuffix(".idx").removesuffix(".bin")]
        if not found:
            raise InputError("no dataset matches", item, fix="pass prefixes or a glob of .idx files")
        prefixes.extend(found)
    seen = [str(Path(p).resolve()) for p in prefixes]
    if len(set(seen)) != len(seen):
        raise InputError("a dataset is named more than once", fix="name each dataset once")
    return prefixes


def sidecars_of(prefixes: list[str]) -> list[DatasetInfo] | None:
    """The inputs' sidecars, when every input has one; they must name one tokenizer."""
    infos = [DatasetInfo.load(p) for p in prefixes]
    if not all(infos):
        return None
    if len({info.tokenizer["fingerprint"] for info in infos}) > 1:
        raise InputError("the datasets were made with different tokenizers",
                         ", ".join(str(DatasetInfo.path_of(p)) for p in prefixes),
                         fix="merge datasets made with one tokenizer")
    return infos


def merge(inputs: list[str], output_prefix: str, sample_fraction: float | None = None, sample_seed: int = 1234) -> dict:
    """Checked before anything is written: the inputs hold documents and one tokenizer."""
    prefixes = dataset_prefixes(inputs)
    views = [read_index(prefix) for prefix in prefixes]
    if not sum(view.num_documents for view in views):
        raise InputError("the datasets hold no documents", ", ".join(prefixes),
                         fix="check that the conversion found the input")
    if sample_fraction is not None and not 0 < sample_fraction <= 1:
        raise InputError(f"--sample-fraction must lie in (0, 1], not {sample_fraction}", fix="e.g. 0.25")
    records = sidecars_of(prefixes)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    tokens = sum(view.num_tokens for view in views)
    if sample_fraction is None:
        view = _merged(prefixes, output_prefix, tokens)
    else:
        view = _sample(prefixes, output_prefix, sample_fraction, sample_seed, tokens)
    if records is not None:
        replace(records[0], prefix=str(output_prefix), documents=view.num_documents, tokens=view.num_tokens,
                inputs=sorted({i for r in records for i in r.inputs}), merged_from=[str(p) for p in prefixes],
                sampled=None if sample_fraction is None else {"fraction": sample_fraction, "seed": sample_seed},
                created_by=f"megadoc-megatron {__version__}").save()
    return {"prefix": str(output_prefix), "inputs": len(prefixes), "documents": view.num_documents,
            "tokens": view.num_tokens}


def _merged(prefixes: list[str], output_prefix: str, tokens: int):
    with Progress("merge", tokens, "tokens", scale=True) as progress:
        return merge_datasets(prefixes, output_prefix, progress)


def _sample(prefixes: list[str], output_prefix: str, fraction: float, seed: int, tokens: int):
    joined = _merged(prefixes, f"{output_prefix}.joined", tokens) if len(prefixes) > 1 else read_index(prefixes[0])
    try:
        with Progress("merge (sample)", tokens, "tokens", scale=True) as progress:
            return write_documents(joined, sampled_documents(joined.num_documents, fraction, seed), output_prefix,
                                   progress=progress)
    finally:
        if len(prefixes) > 1:
            for path in dataset_paths(joined.prefix):
                path.unlink(missing_ok=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-path", nargs="+", required=True,
                        help="dataset prefixes in order, or a glob of .idx files (sorted), "
                             "e.g. 'out/c_shard*_text_document.idx'")
    parser.add_argument("--output-prefix", required=True, help="prefix of the merged dataset, e.g. out/c_text_document")
    parser.add_argument("--sample-fraction", type=float,
                        help="keep only this share of the documents (at least one), drawn by --seed; at one "
                             "seed a smaller share is a subset of a larger one")
    parser.add_argument("--seed", type=int, default=1234)


def run(args: argparse.Namespace) -> dict:
    summary = merge(args.data_path, args.output_prefix, args.sample_fraction, args.seed)
    print(f"{summary['prefix']}.bin/.idx: {summary['documents']:,} documents, {summary['tokens']:,} tokens "
          f"from {summary['inputs']} datasets")
    return summary
