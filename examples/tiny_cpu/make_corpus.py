#!/usr/bin/env python3
"""Write the tiny example's real corpus (standard-library docstrings) and train its tokenizer.

Outputs in --output-dir: train.jsonl and heldout.jsonl (documents of --min-chars to --max-chars
characters, split by a hash of their id; at most --max-train-documents for training: a small
real corpus, as in the data-limited regime), with --long-min-chars heldout_long.jsonl (the held-out
documents of at least that many characters, for the long-context loss), and tokenizer.model
(SentencePiece BPE, trained on every standard-library document that is not held out).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import sentencepiece
from corpus import is_heldout, stdlib_documents

from megadoc_megatron.data.overlap import THRESHOLD, NgramIndex, text_units
from megadoc_megatron.files import write_text_atomic


def apart_from(train: list[dict], heldout: list[dict], tokenizer) -> list[dict]:
    """The training documents without those that nearly repeat a held-out one (modules whose docstrings
    were copied from each other), by word n-grams (what `megadoc run` checks) and token n-grams (what
    `megadoc blend` checks; short documents sharing a licence line can differ a lot between the two),
    with half their threshold as a margin."""
    def units(texts: list[str]):
        return [[text_units(t) for t in texts], [np.array(ids) for ids in tokenizer.encode(texts)]]

    close = set()
    for held, candidates in zip(units([d["text"] for d in heldout]), units([d["text"] for d in train])):
        close |= {o.query for o in NgramIndex(held).overlaps(candidates) if o.fraction >= THRESHOLD / 2}
    if close:
        print(f"left out {len(close)} training document(s) that nearly repeat held-out ones")
    return [d for number, d in enumerate(train) if number not in close]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--min-chars", type=int, default=200)
    parser.add_argument("--max-chars", type=int, help="longest document kept (default: no limit)")
    parser.add_argument("--max-train-documents", type=int, help="default: all")
    parser.add_argument("--long-min-chars", type=int, help="also write heldout_long.jsonl: held-out documents this "
                                                           "long or longer")
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    settings = {**{k: v for k, v in vars(args).items() if k != "output_dir"}, "python": sys.version,
                "apart_from_held_out": THRESHOLD / 2}  # corpora written before that rule are written again
    done = args.output_dir / "corpus.json"
    long = ["heldout_long.jsonl"] if args.long_min_chars else []
    outputs = [args.output_dir / name for name in ["train.jsonl", "heldout.jsonl", "tokenizer.model", *long]]
    if done.is_file() and all(p.is_file() for p in outputs) and json.loads(done.read_text()) == settings:
        # training the tokenizer takes ~15 s
        print(f"corpus and tokenizer already in {args.output_dir} (same settings)")
        return

    documents = list(stdlib_documents(args.min_chars))
    heldout = {d["id"] for d in documents if is_heldout(d["id"], args.heldout_fraction)}
    kept = [d for d in documents if args.max_chars is None or len(d["text"]) <= args.max_chars]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(d["text"] for d in documents if d["id"] not in heldout),
        model_prefix=str(args.output_dir / "tokenizer"), vocab_size=args.vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, max_sentence_length=1 << 20, num_threads=2,
        # keep newlines and indentation: the model should see documents as they are
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        minloglevel=2)
    print(f"tokenizer: {args.output_dir / 'tokenizer.model'} (SentencePiece BPE, vocab {args.vocab_size})")
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(args.output_dir / "tokenizer.model"))
    splits = {"train": [d for d in kept if d["id"] not in heldout], "heldout": [d for d in kept if d["id"] in heldout]}
    if args.long_min_chars:
        splits["heldout_long"] = [d for d in documents if d["id"] in heldout and len(d["text"]) >= args.long_min_chars]
    every_held_out = [d for name, rows in splits.items() if name != "train" for d in rows]
    splits["train"] = apart_from(splits["train"], every_held_out, tokenizer)[:args.max_train_documents]
    for name, rows in splits.items():
        write_text_atomic(args.output_dir / f"{name}.jsonl",
                          "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        print(f"{name}: {len(rows)} documents, {sum(len(r['text']) for r in rows):,} characters")
    write_text_atomic(done, json.dumps(settings) + "\n")


if __name__ == "__main__":
    main()
