"""`megadoc eval loss|long-context|ensemble|fit`: measure checkpoints and fit scaling laws."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megadoc_megatron.errors import InputError
from megadoc_megatron.files import write_text_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    evaluators = parser.add_subparsers(dest="evaluator", required=True, metavar="EVALUATOR")
    loss = evaluators.add_parser("loss", help="token-weighted mean loss on a held-out dataset (packed as in training)")
    long = evaluators.add_parser("long-context", help="loss by token position, one document per sequence")
    ensemble = evaluators.add_parser("ensemble", help="loss of the averaged probabilities of K = 1..N checkpoints")
    for sub in (loss, long, ensemble):
        sub.add_argument("checkpoint", nargs="+" if sub is ensemble else None,
                         help="checkpoint.dir of `megadoc train` (the latest iteration unless --iteration)")
        sub.add_argument("--data", required=True, help="held-out dataset prefix (..._text_document)")
        sub.add_argument("--iteration", type=int, help="evaluate this saved iteration")
        sub.add_argument("--micro-batch", type=int, default=4)
        sub.add_argument("--name", help="result name (default: the dataset's file name)")
    for sub in (loss, ensemble):
        sub.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens")
    long.add_argument("--threshold", type=int, default=2048, help="documents longer than this many tokens are 'long'")
    long.add_argument("--buckets", type=int, nargs="+", help="position bucket edges (default 0 512 1024 2048 ...)")
    long.add_argument("--offset", type=int, help="also report the mean loss at positions >= offset (default: threshold)")
    long.add_argument("--max-documents", type=int, default=500, help="per set (the papers use 500 short and 500 long)")
    downstream = evaluators.add_parser("downstream", help="lm-eval-harness accuracy (loglikelihood tasks)")
    downstream.add_argument("checkpoint", help="checkpoint.dir of `megadoc train`")
    downstream.add_argument("--tasks", nargs="+", default=["arc_easy", "arc_challenge", "hellaswag", "piqa", "sciq",
                                                            "winogrande"], help="lm-eval task names (default: the papers')")
    downstream.add_argument("--include-path", help="folder of extra lm-eval task YAMLs (e.g. on local data)")
    downstream.add_argument("--limit", type=int, help="at most this many examples per task")
    downstream.add_argument("--num-fewshot", type=int)
    downstream.add_argument("--iteration", type=int)
    downstream.add_argument("--name", default="lm-eval", help="result name")
    fit = evaluators.add_parser("fit", help="fit L(x) = A / x^B + C; with --loss-of, the data efficiency")
    fit.add_argument("--x", type=float, nargs="+", required=True, help="unique real tokens, parameters or members")
    fit.add_argument("--loss", type=float, nargs="+", required=True)
    fit.add_argument("--loss-of", type=float, nargs="*", default=[], help="recipe losses to turn into data efficiency")
    fit.add_argument("--real-tokens", type=float, help="real tokens the recipes used")
    fit.add_argument("--reference-loss", type=float, help="or: the loss the baseline reaches on the same data")
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


def run(args: argparse.Namespace) -> dict:
    if args.evaluator == "fit":
        return run_fit(args)
    from megadoc_megatron.data.indexed import read_index
    from megadoc_megatron.distributed import shutdown
    from megadoc_megatron.evaluate import losses

    dataset = read_index(args.data) if args.evaluator != "downstream" else None
    device = losses.evaluation_process_group()
    try:
        start = time.perf_counter()
        roots = args.checkpoint if isinstance(args.checkpoint, list) else [args.checkpoint]
        if args.evaluator == "downstream":
            from megadoc_megatron.evaluate.downstream import downstream_accuracy

            loaded = losses.load_model(roots[0], args.iteration, device)
            if not loaded.tokenizer:
                raise InputError("this checkpoint does not record where its tokenizer is", loaded.checkpoint,
                                 fix="evaluate checkpoints written by this version of `megadoc train`")
            members = [loaded]
            metrics = downstream_accuracy(loaded, device, args.tasks, args.include_path, args.limit, args.num_fewshot)
            settings = {"tasks": args.tasks, "include_path": args.include_path, "limit": args.limit,
                        "num_fewshot": args.num_fewshot}
        elif args.evaluator == "ensemble":
            members, member_losses, sequences = [], [], None
            for root in roots:  # one model in memory at a time
                loaded = losses.load_model(root, args.iteration, device)
                losses.check_dataset(dataset, loaded)
                if sequences is None:
                    sequences = losses.packed_sequences(dataset, loaded.seq_length, args.max_tokens)
                member_losses.append(losses.sequence_losses(loaded, sequences, device, args.micro_batch))
                members.append(loaded)
                del loaded.model
            metrics = {"tokens": int(member_losses[0].size), "ensembles": losses.ensemble_losses(member_losses)}
            settings = {"max_tokens": args.max_tokens}
        else:
            loaded = losses.load_model(roots[0], args.iteration, device)
            losses.check_dataset(dataset, loaded)
            members = [loaded]
            if args.evaluator == "loss":
                metrics = losses.iid_loss(loaded, dataset, device, args.micro_batch, args.max_tokens)
                settings = {"max_tokens": args.max_tokens}
            else:
                metrics = losses.long_context_loss(loaded, dataset, device, args.threshold, args.buckets, args.offset,
                                                   args.max_documents, args.micro_batch)
                settings = {"threshold": args.threshold, "buckets": [b["start"] for b in metrics["long"]["buckets"]]
                            + [metrics["long"]["buckets"][-1]["end"]], "offset": metrics["long"]["beyond_offset"]["offset"],
                            "max_documents": args.max_documents}
        report = losses.result(args.evaluator, members, getattr(args, "data", None) or "lm-eval", settings, metrics,
                               time.perf_counter() - start)
    finally:
        shutdown()
    name = args.name or Path(args.data).name
    path = losses.result_path(members[0], args.evaluator + (f"-{len(members)}" if args.evaluator == "ensemble" else ""), name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["metrics"], indent=2), file=sys.stdout)
    print(f"written to {path}", file=sys.stderr)
    return report
