"""`megadoc <stage>`: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from megadoc_megatron import __version__
from megadoc_megatron.errors import InputError

# subcommand -> (module with add_arguments/run, one-line help)
STAGES = {
    "synth": ("megadoc_megatron.synth.command", "generate rephrases or rationales of a real corpus (hf, openai, vllm)"),
    "preprocess": ("megadoc_megatron.data.command", "tokenize JSONL into Megatron indexed datasets (.bin/.idx)"),
    "merge": ("megadoc_megatron.data.merge", "join indexed datasets in order (the shards of a preprocess array), "
                                             "or keep a seeded share of their documents"),
    "inspect": ("megadoc_megatron.data.inspect", "summarize an indexed dataset and decode a document"),
    "megadocs": ("megadoc_megatron.megadocs.command", "assemble the synthetic stream: "
                                                      "simple, stitch or stretch megadocs"),
    "decontaminate": ("megadoc_megatron.decontaminate.command", "find (and drop) synthetic records that quote "
                                                                "held-out or benchmark text"),
    "blend": ("megadoc_megatron.blend.command", "weights and train length for a mixing weight w "
                                                "and exactly E real epochs"),
    "train": ("megadoc_megatron.train.command", "pre-train the GPT on a blend with megatron-core "
                                                "(TP/PP/DP, checkpoints)"),
    "eval": ("megadoc_megatron.evaluate.command", "evaluate checkpoints (i.i.d., long-context, ensemble loss, "
                                                  "lm-eval accuracy); fit scaling laws"),
    "report": ("megadoc_megatron.evaluate.report_command", "tables and plots of recipes vs. losses "
                                                           "and data efficiency"),
    "run": ("megadoc_megatron.experiment.command", "the whole method from one experiment config: "
                                                   "every stage cached and resumable"),
    "status": ("megadoc_megatron.experiment.status_command", "where every stage of a work folder stands: done, "
                                                             "running, failed, waiting"),
    "sweep": ("megadoc_megatron.experiment.sweep_command", "a grid over E, w, lr and wd around one recipe, "
                                                           "with the local-optimum check"),
}


def build_parser(only: str | None = None, parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser of every stage, or with `only` the arguments of that stage alone (the others'
    modules are not imported: `megadoc preprocess` starts faster)."""
    parser = parser_class(prog="megadoc", description="Synthetic megadoc pre-training on megatron-core.")
    parser.add_argument("--version", action="version", version=f"megadoc-megatron {__version__}")
    subparsers = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (module_name, help_text) in STAGES.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        if only in (None, name):
            importlib.import_module(module_name).add_arguments(subparser)
    return parser


def main(argv: list[str] | None = None, stage: str | None = None) -> int:
    """Run a stage; `stage` fixes the subcommand (for the standalone scripts in tools/)."""
    # megatron-core says this once per module on every CPU import; the trainer names its engine anyway
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    argv = list(sys.argv[1:] if argv is None else argv)
    if stage is not None:
        argv = [stage, *argv]
    args = build_parser(only=argv[0] if argv and argv[0] in STAGES else None).parse_args(argv)
    try:
        importlib.import_module(STAGES[args.stage][0]).run(args)
    except InputError as error:
        print(f"megadoc {args.stage}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
