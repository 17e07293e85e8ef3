"""The stages of an experiment, as `megadoc` command lines built from its config.

preprocess-train, preprocess-heldout -> synth-rephrase (largest G of the simple/stitch recipes),
synth-rationale-gG (one per stretch G) -> synthetic-KIND-gG (megadocs, then preprocess) ->
train-RECIPE (blend, then train) -> eval-RECIPE -> report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from megadoc_megatron.errors import InputError
from megadoc_megatron.experiment.config import Experiment, Recipe
from megadoc_megatron.experiment.stages import OUT, External, Graph, Stage
from megadoc_megatron.train.config import config_from_dict, merge_dicts

REPHRASED_KINDS = ("simple", "stitch")


def command_parser(parser: argparse.ArgumentParser, names: list[str]) -> argparse.ArgumentParser:
    for name in names:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = subparsers.choices[name]
    return parser


class Commands:
    """Turns config sections of flags into checked `megadoc` command lines."""

    def __init__(self, experiment: Experiment):
        from megadoc_megatron.cli import build_parser

        self.parser = build_parser()
        self.source = experiment.source

    def flags(self, names: list[str], values: dict, where: str, reserved: set[str]) -> list[str]:
        """`{max_new_tokens: 64, allow_truncated: true}` -> `--max-new-tokens 64 --allow-truncated`."""
        options = {a.dest: a for a in command_parser(self.parser, names)._actions if a.option_strings and a.dest != "help"}
        argv = []
        for key, value in values.items():
            if key in reserved:
                raise InputError(f"{where}.{key} is set by megadoc run", self.source, fix=f"remove {where}.{key}")
            if key not in options:
                allowed = ", ".join(sorted(set(options) - reserved))
                raise InputError(f"{where}.{key} is not an option of `megadoc {' '.join(names)}`", self.source,
                                 fix=f"use one of: {allowed}")
            action = options[key]
            option = next(o for o in action.option_strings if o.startswith("--"))
            if action.nargs == 0:
                if not isinstance(value, bool):
                    raise InputError(f"{where}.{key} must be true or false, not {value!r}", self.source,
                                     fix=f"{key}: true")
                argv += [option] if value == action.const else []
            elif isinstance(value, list):
                argv += [option, *map(str, value)]
            elif value is not None:
                argv += [option, str(value)]
        return argv

    def check(self, stage: Stage) -> None:
        """Parse every command line of the stage as `megadoc` would, before anything runs."""
        for command in stage.commands:
            argv = [str(i.path) if isinstance(i, External) else str(i).replace(OUT, "/stage") for i in command]
            try:
                self.parser.parse_args(argv)
            except SystemExit:
                raise InputError(f"the settings of stage {stage.name} make an invalid command: megadoc "
                                 f"{' '.join(argv)}", self.source, fix="see the message above") from None


def _input(path: str):
    return External(path) if Path(path).exists() else path


@dataclass
class Plan:
    graph: Graph
    trains: dict[str, Stage]     # recipe name -> its train stage
    evals: dict[str, Stage]      # recipe name -> its eval stage
    report: Stage
    eval_name: str               # the name of the evaluation results (`megadoc eval --name`)


def build_graph(experiment: Experiment) -> Plan:
    commands = Commands(experiment)
    graph = Graph(Path(experiment.work_dir))
    corpus, text_key = experiment.corpus, experiment.corpus.text_key
    tokenizer = ["--tokenizer-type", experiment.tokenizer.type, "--tokenizer-model", _input(experiment.tokenizer.model)]
    preprocess_flags = commands.flags(["preprocess"], experiment.preprocess, "preprocess",
                                      {"input", "output_prefix", "tokenizer_type", "tokenizer_model", "append_eod", "json_keys"})

    def add(stage: Stage) -> Stage:
        commands.check(stage)
        return graph.add(stage)

    def preprocess(source, prefix: str, key: str) -> list:
        return ["preprocess", "--input", source, "--output-prefix", f"{OUT}/{prefix}", "--json-keys", key, *tokenizer,
                "--append-eod", *preprocess_flags]

    real = add(Stage("preprocess-train", [preprocess(External(corpus.train), "real", text_key)]))
    heldout = add(Stage("preprocess-heldout", [preprocess(External(corpus.heldout), "heldout", text_key)]))
    real_prefix, heldout_prefix = f"{real.folder}/real_{text_key}_document", f"{heldout.folder}/heldout_{text_key}_document"

    def synth(operation: str, generations: int) -> Stage:
        flags = commands.flags(["synth", operation], merge_dicts(experiment.generator, getattr(experiment, operation)),
                               f"generator/{operation}", {"input", "output", "generations", "id_key", "text_key",
                                                          "task_index", "task_count"})
        return add(Stage(f"synth-{operation}" + (f"-g{generations}" if operation == "rationale" else ""),
                         [["synth", operation, "--input", External(corpus.train), "--output", OUT, "-G", generations,
                           "--id-key", corpus.id_key, "--text-key", text_key, *flags]]))

    rephrased = [r.generations for r in experiment.recipes if r.kind in REPHRASED_KINDS]
    rephrase = synth("rephrase", max(rephrased)) if rephrased else None
    megadocs_flags = commands.flags(["megadocs"], experiment.megadocs, "megadocs",
                                    {"kind", "real", "generations", "output", "max_generations", "allow_uneven", "id_key",
                                     "text_key", "tokenizer_type", "tokenizer_model"})
    synthetic: dict[tuple[str, int], Stage] = {}
    for recipe in experiment.recipes:
        key = (recipe.kind, recipe.generations)
        if recipe.kind == "real" or key in synthetic:
            continue
        source = rephrase if recipe.kind in REPHRASED_KINDS else synth("rationale", recipe.generations)
        subset = ["--max-generations", recipe.generations] if recipe.kind in REPHRASED_KINDS else []
        # Generators reject some outputs (quality gates): documents may have fewer than G generations.
        build = ["megadocs", "--kind", recipe.kind, "--real", External(corpus.train), "--generations", source.folder,
                 "--output", f"{OUT}/megadocs.jsonl", *subset, "--allow-uneven", "--id-key", corpus.id_key,
                 "--text-key", text_key, *megadocs_flags]
        synthetic[key] = add(Stage(f"synthetic-{recipe.kind}-g{recipe.generations}",
                                   [build, preprocess(f"{OUT}/megadocs.jsonl", "synthetic", "text")]))

    trains = {recipe.name: add(train_stage(experiment, recipe, real_prefix, heldout_prefix,
                                           synthetic.get((recipe.kind, recipe.generations))))
              for recipe in experiment.recipes}
    eval_name = "run-" + hashlib.sha256(json.dumps(experiment.eval.__dict__, sort_keys=True).encode()).hexdigest()[:8]
    evals = {recipe: add(eval_stage(experiment, commands, recipe, train, heldout_prefix, eval_name))
             for recipe, train in trains.items()}
    report_flags = commands.flags(["report"], experiment.report, "report", {"runs", "output", "eval_name"})
    report = add(Stage("report", [["report", *[f"{t.folder}/ckpt" for t in trains.values()], "--output", OUT,
                                   "--eval-name", eval_name, *report_flags]]))
    return Plan(graph, trains, evals, report, eval_name)


def train_stage(experiment: Experiment, recipe: Recipe, real_prefix: str, heldout_prefix: str,
                synthetic: Stage | None) -> Stage:
    blend = experiment.blend
    mix = ["--synthetic", f"{synthetic.folder}/synthetic_text_document"] if synthetic else []
    config = merge_dicts(experiment.train, recipe.train)
    config = merge_dicts(config, {"data": {"blend": f"{OUT}/blend/blend.json"}, "checkpoint": {"dir": f"{OUT}/ckpt"}})
    config_from_dict(config, experiment.source)  # unknown fields and wrong types fail here, before anything runs
    run_info = {"name": recipe.name, "recipe": recipe.kind, "generations": recipe.generations}
    return Stage(f"train-{recipe.name}", [
        ["blend", "--real", real_prefix, *mix, "-w", recipe.synthetic_weight, "-E", recipe.epochs,
         "--seq-length", blend.seq_length, "--global-batch-size", blend.global_batch_size, "--seed", blend.seed,
         "--valid-data", heldout_prefix, "--output-dir", f"{OUT}/blend"],
        ["train", f"{OUT}/train.yaml"]],
        files={"train.yaml": json.dumps(config, indent=2) + "\n", "ckpt/recipe.json": json.dumps(run_info) + "\n"},
        launcher=experiment.launch.train)


def eval_stage(experiment: Experiment, commands: Commands, recipe: str, train: Stage, heldout_prefix: str,
               name: str) -> Stage:
    """Results go beside the checkpoint (train-RECIPE/ckpt/eval), named after the eval settings."""
    checkpoint = f"{train.folder}/ckpt"
    lines = []
    for evaluator, values in (("loss", experiment.eval.loss), ("long-context", experiment.eval.long_context),
                              ("downstream", experiment.eval.downstream)):
        if values is None:
            continue
        data = [] if evaluator == "downstream" else ["--data", heldout_prefix]
        flags = commands.flags(["eval", evaluator], values, f"eval.{evaluator.replace('-', '_')}",
                               {"checkpoint", "data", "name", "iteration"})
        lines.append(["eval", evaluator, checkpoint, *data, "--name", name, *flags])
    return Stage(f"eval-{recipe}", lines, launcher=experiment.launch.eval)
