#!/usr/bin/env python3
"""Write the tiny example's real corpus (standard-library docstrings) and train its tokenizer.

Outputs in --output-dir: train.jsonl, heldout.jsonl, tokenizer.model (SentencePiece BPE).
"""

import argparse
import json
from pathlib import Path

import sentencepiece

from megadoc_megatron.corpus import is_heldout, stdlib_documents
from megadoc_megatron.records import write_text_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)

    documents = list(stdlib_documents())
    splits = {"train": [], "heldout": []}
    for document in documents:
        splits["heldout" if is_heldout(document["id"], args.heldout_fraction) else "train"].append(document)
    for name, rows in splits.items():
        write_text_atomic(args.output_dir / f"{name}.jsonl",
                          "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        print(f"{name}: {len(rows)} documents, {sum(len(r['text']) for r in rows):,} characters")

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(row["text"] for row in splits["train"]),
        model_prefix=str(args.output_dir / "tokenizer"), vocab_size=args.vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, max_sentence_length=1 << 20, num_threads=2,
        # keep newlines and indentation: the model should see documents as they are
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        minloglevel=2)
    print(f"tokenizer: {args.output_dir / 'tokenizer.model'} (SentencePiece BPE, vocab {args.vocab_size})")


if __name__ == "__main__":
    main()
