"""`megadoc inspect PREFIX`: counts, dtype, a document-length histogram and a decoded sample."""

from __future__ import annotations

import argparse

import numpy as np

from megadoc_megatron.data.dataset_info import recorded_tokenizer
from megadoc_megatron.data.indexed import read_index
from megadoc_megatron.data.tokenizer import TOKENIZER_TYPES, load_tokenizer
from megadoc_megatron.errors import InputError

BAR_WIDTH = 40


def length_histogram(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """(low, high, count) over power-of-two buckets [low, high) of the non-empty lengths."""
    lengths = lengths[lengths > 0]
    if len(lengths) == 0:
        return []
    exponents = np.floor(np.log2(lengths)).astype(np.int64)
    counts = np.bincount(exponents - exponents.min())
    return [(1 << (e + int(exponents.min())), 1 << (e + 1 + int(exponents.min())), int(c))
            for e, c in enumerate(counts)]


def _tokenizer_for(prefix, tokenizer_type, tokenizer_model):
    if tokenizer_type and tokenizer_model:
        return load_tokenizer(tokenizer_type, tokenizer_model)
    return recorded_tokenizer(prefix)


def inspect_dataset(prefix, document: int = 0, tokenizer_type=None, tokenizer_model=None, max_chars: int = 1500) -> str:
    view = read_index(prefix)
    lengths = view.document_lengths()
    if not 0 <= document < max(view.num_documents, 1):
        raise InputError(f"--document {document} is out of range (the dataset has {view.num_documents} documents)",
                         fix=f"pick a document between 0 and {view.num_documents - 1}")
    rows = [
        ("dataset", str(prefix)),
        ("dtype", np.dtype(view.dtype).name),
        ("documents", f"{view.num_documents:,} ({int(np.count_nonzero(lengths == 0)):,} empty)"),
        ("sequences", f"{len(view.sequence_lengths):,}"),
        ("tokens", f"{view.num_tokens:,}"),
    ]
    if len(lengths):
        rows.append(("tokens/document", f"min {lengths.min():,}  mean {lengths.mean():,.1f}  "
                                        f"median {int(np.median(lengths)):,}  max {lengths.max():,}"))
    out = [f"{name:<16} {value}" for name, value in rows]
    histogram = length_histogram(lengths)
    if histogram:
        out.append("document length (tokens):")
        peak = max(count for _, _, count in histogram)
        for low, high, count in histogram:
            bar = "#" * max(1 if count else 0, round(BAR_WIDTH * count / peak))
            out.append(f"  [{low:>8,}, {high:>8,})  {count:>10,}  {bar}")
    if view.num_documents:
        tokens = view.document_tokens(document)
        tokenizer = _tokenizer_for(prefix, tokenizer_type, tokenizer_model)
        out.append(f"document {document}: {len(tokens):,} tokens; first ids {tokens[:16].tolist()}")
        if tokenizer is None:
            out.append("  (no tokenizer recorded beside the dataset: "
                       "pass --tokenizer-type/--tokenizer-model to decode)")
        else:
            text = tokenizer.decode(tokens)
            more = f"\n... ({len(text) - max_chars:,} more characters)" if len(text) > max_chars else ""
            out.append(f"--- decoded with {tokenizer.type_name} {tokenizer.model_path} ---\n{text[:max_chars]}{more}")
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prefix", help="dataset path without .bin/.idx, e.g. out/corpus_text_document")
    parser.add_argument("--document", type=int, default=0, help="index of the document to decode")
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, help="default: the one recorded by preprocess")
    parser.add_argument("--tokenizer-model")
    parser.add_argument("--max-chars", type=int, default=1500, help="characters of the decoded document to print")


def run(args: argparse.Namespace) -> None:
    print(inspect_dataset(args.prefix, args.document, args.tokenizer_type, args.tokenizer_model, args.max_chars))
