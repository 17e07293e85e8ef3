"""`megadoc <stage>`: one subcommand per pipeline stage, one vocabulary of flags across them.

VOCABULARY: one name per concept in every subcommand, Megatron-LM's where it has one.

  concept                               flag                              subcommands
  real documents (JSONL files, globs    --input                           synth OPERATION, synth tune,
    or folders)                                                           preprocess, megadocs
  records written by `megadoc synth`    --generation-records              megadocs
  held-out documents (JSONL)            --held-out                        synth OPERATION, decontaminate
  Megatron dataset prefixes (read)      --data-path                       merge
                                        --real-data-path,                 blend
                                        --synthetic-data-path
  held-out dataset prefixes             --valid-data-path                 blend, eval loss|long-context|ensemble
  an output folder                      --output-dir                      synth OPERATION, synth tune, blend, report
  an output file                        --output (decontaminate: and      megadocs, decontaminate
                                        --report, its JSON report)
  an output dataset prefix              --output-prefix                   preprocess, merge
  generations per document (a count)    -G/--generations                  synth OPERATION (megadocs: --max-generations;
                                                                          synth tune: --num-generations, TRL's group)
  show the plan, run nothing            --dry-run                         synth OPERATION, train, run, sweep
  random seed                           --seed                            synth, megadocs, merge, blend
  JSONL keys                            --text-key, --id-key              synth, megadocs, decontaminate
                                        --json-keys (Megatron's: one      preprocess
                                        dataset per key)
  Megatron tokenizer                    --tokenizer-type, --tokenizer-model  preprocess, inspect, megadocs
  batch and sequence                    --seq-length, --global-batch-size,  blend, train, eval
                                        --micro-batch-size
  name of a set of evaluation results   --eval-name                       eval, report

A renamed flag keeps the destination its settings read (e.g. blend's --real-data-path fills
BlendConfig.real). RENAMED lists the old spellings: they still parse for a release, hidden from
--help, with a note on stderr. `megadoc run` keys its stages by the old spellings (stages.py), so
work folders made before the renames keep their finished stages.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import warnings
from collections.abc import Iterator

from megadoc_megatron import __version__
from megadoc_megatron.errors import InputError, Interrupted

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


_GENERATION = {"--output": "--output-dir", "--plan": "--dry-run"}
_EVALUATION = {"--data": "--valid-data-path", "--micro-batch": "--micro-batch-size", "--name": "--eval-name"}

# parser path -> {old spelling: new spelling}
RENAMED: dict[str, dict[str, str]] = {
    "synth rephrase": _GENERATION, "synth rationale": _GENERATION, "synth textbook": _GENERATION,
    "synth tune": {"--output": "--output-dir"},
    "megadocs": {"--real": "--input", "--generations": "--generation-records"},
    "merge": {"--input": "--data-path", "--sample-seed": "--seed"},
    "blend": {"--real": "--real-data-path", "--synthetic": "--synthetic-data-path",
              "--valid-data": "--valid-data-path"},
    "train": {"--check": "--dry-run"},
    "eval loss": _EVALUATION, "eval long-context": _EVALUATION, "eval ensemble": _EVALUATION,
    "eval downstream": {"--name": "--eval-name"},
    "report": {"--output": "--output-dir"},
}


def says_something(default) -> bool:
    """Whether --help shows a default: not for None, False, "", [] or argparse's SUPPRESS."""
    return not (default is None or default is False or default in ("", [], argparse.SUPPRESS))


class HelpFormatter(argparse.HelpFormatter):
    """Every default that says something in --help, options without help text included (which
    argparse's ArgumentDefaultsHelpFormatter skips); values named after the flag, not after the
    settings field it fills (--output-dir OUTPUT_DIR, not OUTPUT)."""

    def _get_default_metavar_for_optional(self, action):
        flag = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
        return flag.lstrip("-").replace("-", "_").upper()

    def _format_action(self, action):
        help_text = action.help or ""
        if action.option_strings and action.help is not argparse.SUPPRESS and says_something(action.default) \
                and "%(default)" not in help_text:
            unprintable = isinstance(action.default, str) and not action.default.isprintable()
            action = copy.copy(action)
            action.help = f"{help_text} (default: %(default){'r' if unprintable else 's'})".lstrip()
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """Every megadoc parser and sub-parser (add_parser makes them of the parent's class): the help
    formatter above, and the old spellings of its flags (`renamed`) replaced before parsing. Replacing
    them, rather than hidden aliases, keeps required flags required and their values parsed alike."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
        self.renamed: dict[str, str] = {}
        self._noted: set[str] = set()  # one note per old spelling: `megadoc run` parses every stage's commands

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        end = args.index("--") if "--" in args else len(args)
        return super().parse_known_args([*map(self._current_spelling, args[:end]), *args[end:]], namespace)

    def _current_spelling(self, token: str) -> str:
        option, equals, value = token.partition("=")
        if option not in self.renamed:
            return token
        if option not in self._noted:
            self._noted.add(option)
            print(f"{self.prog}: {option} is deprecated, use {self.renamed[option]}", file=sys.stderr)
        return self.renamed[option] + equals + value


def parser_tree(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(path, parser) of `parser` and of every sub-parser below it: ("", megadoc), ("synth", ...),
    ("synth rephrase", ...), ... (the CLI reference is generated from it)."""
    yield path, parser
    for action in parser._actions:  # argparse lists sub-parsers nowhere public
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from parser_tree(subparser, f"{path} {name}".strip())


def build_parser(only: str | None = None, parser_class: type[Parser] = Parser) -> Parser:
    """The parser of every stage, or with `only` the arguments of that stage alone (the others'
    modules are not imported: `megadoc preprocess` starts faster)."""
    parser = parser_class(prog="megadoc", description="Synthetic megadoc pre-training on megatron-core.")
    parser.add_argument("--version", action="version", version=f"megadoc-megatron {__version__}")
    subparsers = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (module_name, help_text) in STAGES.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        if only in (None, name):
            importlib.import_module(module_name).add_arguments(subparser)
    for path, subparser in parser_tree(parser):
        subparser.renamed = RENAMED.get(path, {})
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
        said = "stopped" if isinstance(error, Interrupted) else "error"  # stopped on purpose: not an error
        print(f"megadoc {args.stage}: {said}: {error}", file=sys.stderr)
        return error.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
