"""`megadoc merge`: join indexed datasets in order into one (the shards of a `preprocess --shard`
array, or any datasets of one tokenizer), as Megatron-LM's `tools/merge_datasets.py` does, with
memory flat in their size. The shards of an array merge into the bytes one run writes."""

from __future__ import annotations

import argparse
import glob
from dataclasses import replace
from pathlib import Path

from megadoc_megatron import __version__
from megadoc_megatron.data.dataset_info import DatasetInfo
from megadoc_megatron.data.indexed import merge_datasets, read_index
from megadoc_megatron.errors import InputError


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


def merge(inputs: list[str], output_prefix: str) -> dict:
    """Checked before anything is written: the inputs hold documents and one tokenizer."""
    prefixes = dataset_prefixes(inputs)
    if not sum(read_index(prefix).num_documents for prefix in prefixes):
        raise InputError("the datasets hold no documents", ", ".join(prefixes),
                         fix="check that the conversion found the input")
    records = sidecars_of(prefixes)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    view = merge_datasets(prefixes, output_prefix)
    if records is not None:
        replace(records[0], prefix=str(output_prefix), documents=view.num_documents, tokens=view.num_tokens,
                inputs=sorted({i for r in records for i in r.inputs}), merged_from=[str(p) for p in prefixes],
                created_by=f"megadoc-megatron {__version__}").save()
    return {"prefix": str(output_prefix), "inputs": len(prefixes), "documents": view.num_documents,
            "tokens": view.num_tokens}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True,
                        help="dataset prefixes in order, or a glob of .idx files (sorted), "
                             "e.g. 'out/c_shard*_text_document.idx'")
    parser.add_argument("--output-prefix", required=True, help="the merged dataset, e.g. out/c_text_document")


def run(args: argparse.Namespace) -> dict:
    summary = merge(args.input, args.output_prefix)
    print(f"{summary['prefix']}.bin/.idx: {summary['documents']:,} documents, {summary['tokens']:,} tokens "
          f"from {summary['inputs']} datasets")
    return summary
