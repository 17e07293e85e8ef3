"""`megadoc eval loss|long-context|ensemble|fit`: measure checkpoints and fit scaling laws."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from megadoc_megatron.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    evaluators = parser.add_subparsers(dest="evaluator", required=True, metavar="EVALUATOR")
    loss = evaluators.add_parser("loss", help="token-weighted mean loss on a held-out dataset (packed as in training)")
    long = evaluators.add_parser("long-context", help="loss by token position, one document per sequence")
    ensemble = evaluators.add_parser("ensemble", help="loss of the averaged probabilities of K = 1..N checkpoints")
    for sub in (loss, long, ensemble):
        sub.add_argument("checkpoint", nargs="+" if sub is ensemble else None,
                         help="checkpoint.dir of `megadoc train` (the latest iteration unless --iteration)")
        sub.add_argument("--valid-data-path", dest="data", required=True,
                         help="held-out dataset prefix (..._text_document)")
        sub.add_argument("--iteration", type=int, help="evaluate this saved iteration")
        sub.add_argument("--micro-batch-size", dest="micro_batch", type=int, default=4,
                         help="sequences per forward pass")
        sub.add_argument("--eval-name", dest="name", help="result name (default: the dataset's file name)")
    for sub in (loss, ensemble):
        sub.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens")
    long.add_argument("--threshold", type=int, default=2048, help="documents longer than this many tokens are 'long'")
    long.add_argument("--buckets", type=int, nargs="+", help="position bucket edges (default: 0 512 1024 2048 ...)")
    long.add_argument("--offset", type=int, help="also report the mean loss at positions >= offset "
                                                 "(default: threshold)")
    long.add_argument("--max-documents", type=int, default=500, help="per set (the papers use 500 short and 500 long)")
    downstream = evaluators.add_parser("downstream", help="lm-eval-harness accuracy (loglikelihood tasks)")
    downstream.add_argument("checkpoint", help="checkpoint.dir of `megadoc train`")
    downstream.add_argument("--tasks", nargs="+", default=["arc_easy", "arc_challenge", "hellaswag", "piqa", "sciq",
                                                            "winogrande"],
                            help="lm-eval task names (the papers')")
    downstream.add_argument("--include-path",
                            help="folder of extra lm-eval task YAMLs (e.g. on local data); task files can import "
                                 "and run Python code (!function): use only folders you trust")
    downstream.add_argument("--limit", type=int, help="at most this many examples per task")
    downstream.add_argument("--num-fewshot", type=int)
    downstream.add_argument("--iteration", type=int)
    downstream.add_argument("--eval-name", dest="name", default="lm-eval", help="result name")
    fit = evaluators.add_parser("fit", help="fit L(x) = A / x^B + C; with --loss-of, the data efficiency "
                                             "D(L) / D(L_real) (the paper's definition)")
    fit.add_argument("--x", type=float, nargs="+", required=True, help="unique real tokens, parameters or members")
    fit.add_argument("--loss", type=float, nargs="+", required=True)
    fit.add_argument("--loss-of", type=float, nargs="*", default=[],
                     help="recipe losses L to turn into data efficiency (with --reference-loss or --real-tokens)")
    reference = fit.add_mutually_exclusive_group()
    reference.add_argument("--reference-loss", type=float,
                           help="L_real, the real-only recipe's loss on the same real data: data efficiency = "
                                "D(L) / D(L_real), D inverting the fit (the paper's definition; real-only is 1.00x)")
    reference.add_argument("--real-tokens", type=float,
                           help="or, tokens-based: data efficiency = D(L) / these real tokens (the ones the "
                                "recipes trained on); not the paper's definition")
    fit.add_argument("--bootstrap", type=int, default=1000)


def run_fit(args) -> dict:
    from megadoc_megatron.evaluate.fits import data_efficiency, fit_power_law

    if len(args.x) != len(args.loss):
        raise InputError(f"{len(args.x)} x values but {len(args.loss)} losses", fix="give one loss per x")
    law = fit_power_law(args.x, args.loss, bootstrap=args.bootstrap)
    out = {"fit": law.as_dict(), "efficiency": [data_efficiency(law, loss, args.real_tokens, args.reference_loss)
                                                for loss in args.loss_of]}
    print(json.dumps(out, indent=2))
    return out


def run(args: argparse.Namespace):
    if args.evaluator == "fit":
        return run_fit(args)
    from megadoc_megatron.evaluate.evaluators import EvalConfig, evaluate

    checkpoints = args.checkpoint if isinstance(args.checkpoint, list) else [args.checkpoint]
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig) if hasattr(args, f.name)}
    result, path = evaluate(EvalConfig(**{**options, "checkpoints": checkpoints}))
    print(json.dumps(result.metrics, indent=2), file=sys.stdout)
    print(f"written to {path}", file=sys.stderr)
    return result
