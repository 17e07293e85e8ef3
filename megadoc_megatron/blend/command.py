"""`megadoc blend`: arguments -> BlendConfig -> make_blend, printed (and verified with --verify)."""

from __future__ import annotations

import argparse
import dataclasses

from megadoc_megatron.blend.weights import Blend, BlendConfig, format_blend, make_blend
from megadoc_megatron.data.overlap import NGRAM, THRESHOLD


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--real-data-path", dest="real", nargs="+", required=True,
                        help="real dataset prefixes (..._text_document)")
    parser.add_argument("--synthetic-data-path", dest="synthetic", nargs="+", default=[],
                        help="synthetic dataset prefixes (none: a real-only run)")
    parser.add_argument("--synthetic-weight", "-w", type=float, required=True,
                        help="mixing weight w of the synthetic stream (0 for a real-only run)")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--epochs", "-E", type=int, help="exact passes over the real training data")
    length.add_argument("--train-tokens", type=int,
                        help="instead, a budget of training tokens, w of them synthetic (w may be 1: no real data)")
    parser.add_argument("--seq-length", type=int, required=True)
    parser.add_argument("--global-batch-size", type=int, required=True)
    parser.add_argument("--split", default="100,0,0", help="Megatron's train,valid,test split of every dataset")
    parser.add_argument("--seed", type=int, default=1234, help="Megatron's --seed (it shuffles the datasets)")
    parser.add_argument("--valid-data-path", dest="valid_data", nargs="+",
                        help="held-out dataset prefixes: also write per_split_data_args.json")
    parser.add_argument("--overlap-ngram", type=int, default=NGRAM,
                        help="the held-out check: n-gram length in tokens (as GPT-3 and Llama 2)")
    parser.add_argument("--overlap-threshold", type=float, default=THRESHOLD,
                        help="refuse a training and a held-out document that share this fraction of the smaller "
                             "one's n-grams (1.0: only where one holds the other whole)")
    parser.add_argument("--held-out-checked", action="store_true",
                        help="skip that check: the corpora were compared already (`megadoc run` does, on their "
                             "words, before any stage)")
    parser.add_argument("--output-dir", required=True, help="folder for blend.json and data_args.txt")
    parser.add_argument("--verify", action="store_true",
                        help="build the blend with megatron-core's BlendedMegatronDatasetBuilder "
                             "and report what it draws")


def run(args: argparse.Namespace) -> Blend:
    config = BlendConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BlendConfig)})
    blend = make_blend(config)
    print(format_blend(blend))
    files = [blend.files.data_args, blend.files.plan] + ([blend.files.per_split_data_args]
                                                          if blend.files.per_split_data_args else [])
    print(f"wrote {', '.join(files)}")
    print(f"Megatron-LM flags: {blend.megatron_flags}")
    if args.verify:
        from megadoc_megatron.blend.datasets import format_verification, verify_blend

        print(format_verification(verify_blend(blend)))
    return blend
