"""The stages of an experiment, as `megadoc` command lines built from its config.

preprocess-train, preprocess-heldout[, preprocess-long-heldout] -> [sample-train-fF (a baseline's
share F of the real dataset) ->] train-REAL (the real-only recipes and the baseline come first: they
need no generation) -> synth-rephrase[-STYLES] (largest G of the simple/stitch recipes with those
styles), synth-textbook, synth-rationale-gG (one per stretch G) -> synthetic-KIND[-STYLES]-gG
(megadocs, then preprocess) -> train-RECIPE (blend, then train; with refresh rounds, see
`refresh_rounds`) -> eval-RECIPE -> report. With `seeds: S` every recipe trains S times
(train-RECIPE, train-RECIPE-seed2, ...)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from megadoc_megatron.cli import Parser, build_parser
from megadoc_megatron.config import merge_dicts
from megadoc_megatron.data.dataset_info import dataset_prefix
from megadoc_megatron.errors import InputError
from megadoc_megatron.evaluate.report import RunLabel
from megadoc_megatron.experiment.config import REPHRASED_KINDS, Experiment, Recipe, baseline_recipes
from megadoc_megatron.experiment.stages import OUT, External, Graph, Stage
from megadoc_megatron.train.config import TrainConfig, config_from_dict
from megadoc_megatron.train.layout import launcher_world_size, plan_layout


class ArgumentCheckError(Exception):
    pass


class CheckingParser(Parser):
    """A parser that raises instead of printing usage and exiting (`error` is argparse's documented hook)."""

    def error(self, message):
        raise ArgumentCheckError(message)


class Commands:
    """Turns config sections of flags into `megadoc` command lines, checked by the commands' own parsers."""

    def __init__(self, experiment: Experiment):
        self.parser = build_parser(parser_class=CheckingParser)
        self.source = experiment.source
        # (command, option) -> (config key, the tokens of its value): to name the key a parser refuses
        self.origin: dict[tuple[str, str], tuple[str, list[str]]] = {}

    def flags(self, command: str, values: dict, where: str, reserved: set[str]) -> list[str]:
        """`{max_new_tokens: 64, allow_truncated: true}` -> `--max-new-tokens 64 --allow-truncated`
        for `megadoc COMMAND` (e.g. "synth rephrase")."""
        argv = []
        for key, value in values.items():
            if key in reserved:
                raise InputError(f"{where}.{key} is set by megadoc run", self.source, fix=f"remove {where}.{key}")
            option = "--" + key.replace("_", "-")
            tokens = [] if isinstance(value, bool) or value is None else \
                list(map(str, value)) if isinstance(value, list) else [str(value)]
            self.origin[command, option] = (f"{where}.{key}", tokens)
            argv += [option, *tokens] if tokens or value is True else []
        return argv

    def check(self, stage: Stage) -> None:
        """Parse every command line of the stage as `megadoc` would, before anything runs."""
        for command in stage.commands:
            argv = [str(i.path) if isinstance(i, External) else str(i).replace(OUT, "/stage") for i in command]
            try:
                self.parser.parse_args(argv)
            except ArgumentCheckError as error:
                raise self._error(str(error), stage, argv) from None

    def _error(self, message: str, stage: Stage, argv: list[str]) -> InputError:
        """The config key behind a parser error where it can be told, else the whole command."""
        command = " ".join(argv[:2] if argv[0] in ("synth", "eval") else argv[:1])
        unrecognized = message.partition("unrecognized arguments: ")[2].split()
        for token in unrecognized:
            if (command, token) in self.origin:
                key = self.origin[command, token][0]
                return InputError(f"{key} is not an option of `megadoc {command}`", self.source,
                                  fix=f"see `megadoc {command} --help` (options with underscores)")
            key = next((k for (c, _), (k, tokens) in self.origin.items() if c == command and tokens == [token]), None)
            if key:
                return InputError(f"{key} must be true or false, not {token!r}", self.source,
                                  fix=f"{key.rsplit('.', 1)[-1]}: true")
        return InputError(f"the settings of stage {stage.name} make an invalid command: megadoc {' '.join(argv)} "
                          f"({message})", self.source, fix=f"see `megadoc {command} --help`")


def _input(path: str):
    return External(path) if Path(path).exists() else path


@dataclass
class Plan:
    graph: Graph
    trains: dict[str, Stage]     # run name (run_name) -> its (last) train stage
    evals: dict[str, Stage]      # run name -> its eval stage
    report: Stage
    eval_name: str               # the name of the evaluation results (`megadoc eval --eval-name`)
    runs_of: dict[str, list[str]]  # recipe name -> its runs, one per seed


def run_name(recipe: str, seed: int) -> str:
    """The first seed's run bears the recipe's name; the others RECIPE-seedN (N from 2)."""
    return f"{recipe}-seed{seed + 1}" if seed else recipe


# the cost flags too: `megadoc run --dry-run` prices the stages
GENERATOR_RESERVED = {"input", "output_dir", "output", "generations", "id_key", "text_key", "task_index",
                      "task_count", "dry_run", "plan", "tokens_per_second", "calibrate"}


class Planner:
    """Builds the stages of an experiment; each `add` checks the stage's command lines."""

    def __init__(self, experiment: Experiment):
        self.experiment = experiment
        self.commands = Commands(experiment)
        self.graph = Graph(Path(experiment.work_dir))
        self.corpus = experiment.corpus
        self.tokenizer = ["--tokenizer-type", experiment.tokenizer.type,
                          "--tokenizer-model", _input(experiment.tokenizer.model)]
        self.preprocess_flags = self.commands.flags(
            "preprocess", experiment.preprocess, "preprocess",
            {"input", "output_prefix", "tokenizer_type", "tokenizer_model", "append_eod", "json_keys"})
        decontaminate = experiment.decontaminate
        self.overlap_flags = ["--overlap-ngram", decontaminate.overlap_ngram,
                              "--overlap-threshold", decontaminate.overlap_threshold]
        self.megadocs_flags = self.commands.flags(
            "megadocs", experiment.megadocs, "megadocs",
            {"kind", "input", "real", "generation_records", "generations", "output", "max_generations",
             "allow_uneven", "id_key", "text_key", "tokenizer_type", "tokenizer_model"})

    def add(self, stage: Stage) -> Stage:
        self.commands.check(stage)
        return self.graph.add(stage)

    def preprocess(self, source, prefix: str, key: str) -> list:
        return ["preprocess", "--input", source, "--output-prefix", f"{OUT}/{prefix}", "--json-keys", key,
                *self.tokenizer, "--append-eod", *self.preprocess_flags]

    def generator_flags(self, operation: str, replace: dict) -> list:
        """The generator and OPERATION sections as `megadoc synth OPERATION` flags, `replace` on top
        (another model brings its own tokenizer)."""
        values = merge_dicts(self.experiment.generator, getattr(self.experiment, operation, {}))
        if "model" in replace:
            values.pop("tokenizer", None)
        return self.commands.flags(f"synth {operation}", {**values, **replace}, f"generator/{operation}",
                                   GENERATOR_RESERVED)

    def synth(self, name: str, operation: str, generations: int, replace: dict) -> Stage:
        return self.add(Stage(name, [["synth", operation, "--input", External(self.corpus.train), "--output-dir", OUT,
                                      "-G", generations, "--id-key", self.corpus.id_key, "--text-key",
                                      self.corpus.text_key, *self.generator_flags(operation, replace)]]))

    def synthetic(self, name: str, kind: str, generations: Stage, subset: int | None) -> Stage:
        """Megadocs (or single synthetic documents) from a synth stage, converted to a Megatron dataset."""
        megadocs_kind = "simple" if kind == "textbook" else kind
        # Generators reject some outputs (quality gates): documents may have fewer than G generations.
        build = ["megadocs", "--kind", megadocs_kind, "--input", External(self.corpus.train), "--generation-records",
                 generations.folder, "--output", f"{OUT}/megadocs.jsonl",
                 *(["--max-generations", subset] if subset else []), "--allow-uneven", "--id-key", self.corpus.id_key,
                 "--text-key", self.corpus.text_key, *self.megadocs_flags]
        clean = self.decontaminate(f"{OUT}/megadocs.jsonl", f"{OUT}/clean.jsonl")
        converted = f"{OUT}/clean.jsonl" if self.experiment.decontaminate.drop else f"{OUT}/megadocs.jsonl"
        return self.add(Stage(name, [build, clean, self.preprocess(converted, "synthetic", "text")]))

    def decontaminate(self, source: str, output: str) -> list:
        """The synthetic records against the held-out corpus (and lm-eval tasks): a report beside them, and
        with `drop` the records that quote none (data/overlap.py)."""
        settings, corpus = self.experiment.decontaminate, self.corpus
        held_out = [External(corpus.heldout), *([External(corpus.long_heldout)] if corpus.long_heldout else [])]
        return ["decontaminate", source, "--held-out", *held_out, "--held-out-text-key",
                corpus.text_key, "--id-key", corpus.id_key, "--report", f"{OUT}/decontamination.json",
                *self.overlap_flags, *(["--output", output] if settings.drop else []),
                *(["--tasks", *settings.tasks] if settings.tasks else []),
                *(["--include-path", _input(settings.include_path)] if settings.include_path else [])]


def _source(recipe: Recipe) -> tuple | None:
    """(operation, styles) of the synth stage whose generations a recipe takes; None: its own or none."""
    if recipe.kind in REPHRASED_KINDS:
        return "rephrase", tuple(recipe.styles or ())
    return ("textbook", ()) if recipe.kind == "textbook" else None


def _style_suffix(styles: list | None) -> str:
    return "-" + "+".join(styles) if styles else ""


def build_graph(experiment: Experiment) -> Plan:
    planner = Planner(experiment)
    corpus, text_key = experiment.corpus, experiment.corpus.text_key
    real = planner.add(Stage("preprocess-train", [planner.preprocess(External(corpus.train), "real", text_key)]))
    heldout = planner.add(Stage("preprocess-heldout",
                                [planner.preprocess(External(corpus.heldout), "heldout", text_key)]))
    prefixes = {"real": dataset_prefix(f"{real.folder}/real", text_key),
                "heldout": dataset_prefix(f"{heldout.folder}/heldout", text_key)}
    long_heldout = prefixes["heldout"]
    if corpus.long_heldout:
        stage = planner.add(Stage("preprocess-long-heldout",
                                  [planner.preprocess(External(corpus.long_heldout), "long_heldout", text_key)]))
        long_heldout = dataset_prefix(f"{stage.folder}/long_heldout", text_key)

    baseline = baseline_recipes(experiment)  # real-only runs on shares of the real documents
    inputs = {recipe.name: prefixes for recipe in experiment.recipes}
    samples = {}
    for share in sorted({recipe.share for recipe in baseline}):
        samples[share] = planner.add(Stage(f"sample-train-f{share:g}", [
            ["merge", "--data-path", prefixes["real"], "--output-prefix", dataset_prefix(f"{OUT}/real", text_key),
             "--sample-fraction", share, "--seed", experiment.baseline.seed]]))
    for recipe in baseline:
        inputs[recipe.name] = {**prefixes, "real": dataset_prefix(f"{samples[recipe.share].folder}/real", text_key)}
    trains, runs_of = {}, {}

    def add_trains(recipes: list[Recipe], synthetic: dict) -> None:
        for recipe in recipes:
            data = synthetic.get((recipe.kind, recipe.generations, tuple(recipe.styles or ())))
            runs_of[recipe.name] = []
            for seed in range(experiment.seeds):
                run, real = run_name(recipe.name, seed), inputs[recipe.name]
                trains[run] = refresh_rounds(planner, recipe, real, data, seed) if recipe.refresh.rounds else \
                    planner.add(train_stage(experiment, recipe, real, [data] if data else [], seed=seed))
                runs_of[recipe.name].append(run)

    # Real-only runs first: they need no generation, and a share too small to blend fails within minutes.
    add_trains(baseline + [r for r in experiment.recipes if r.kind == "real"], {})

    # One synth stage per rephrase style set and one for textbooks, at the largest G asked of it;
    # smaller G take its first generations. Rationales depend on G (where they are inserted).
    sources: dict[tuple, Stage] = {}
    for recipe in experiment.recipes:
        key = _source(recipe)
        if key and key not in sources:
            generations = max(r.generations for r in experiment.recipes if _source(r) == key)
            sources[key] = planner.synth(f"synth-{key[0]}{_style_suffix(recipe.styles)}", key[0], generations,
                                         {"styles": recipe.styles} if recipe.styles else {})
    synthetic: dict[tuple, Stage] = {}
    for recipe in experiment.recipes:
        key = (recipe.kind, recipe.generations, tuple(recipe.styles or ()))
        if recipe.kind == "real" or key in synthetic:
            continue
        if recipe.kind == "stretch":
            source = planner.synth(f"synth-rationale-g{recipe.generations}", "rationale", recipe.generations, {})
        else:
            source = sources[_source(recipe)]
        synthetic[key] = planner.synthetic(
            f"synthetic-{recipe.kind}{_style_suffix(recipe.styles)}-g{recipe.generations}",
            recipe.kind, source, None if recipe.kind == "stretch" else recipe.generations)
    add_trains([r for r in experiment.recipes if r.kind != "real"], synthetic)
    eval_name = "run-" + hashlib.sha256(json.dumps(experiment.eval.__dict__, sort_keys=True).encode()).hexdigest()[:8]
    evals = {run: planner.add(eval_stage(experiment, planner.commands, run, train, prefixes["heldout"], long_heldout,
                                         eval_name))
             for run, train in trains.items()}
    report_flags = planner.commands.flags("report", experiment.report, "report",
                                          {"runs", "output_dir", "output", "eval_name"})
    checkpoints = [f"{t.folder}/ckpt" for t in trains.values()]
    report = planner.add(Stage("report", [["report", *checkpoints, "--output-dir", OUT, "--eval-name", eval_name,
                                           *report_flags]],
                               after=[e.name for e in evals.values()]))  # results land in the train folders
    return Plan(planner.graph, trains, evals, report, eval_name, runs_of)


def refresh_rounds(planner: Planner, recipe: Recipe, prefixes: dict, first: Stage, seed: int = 0) -> Stage:
    """train-R (to a plateau), then per round N: tune-R-rN (GRPO against the last checkpoint, from the
    last generator) -> synth-rephrase-R-rN (G rephrases by the tuned generator, in its style) ->
    synthetic-R-rN -> train-R-rN (from the last checkpoint, every synthetic set so far). Each train
    stage's lineage.json lists the rounds up to it. Each seed has rounds of its own (R is its run name)."""
    from megadoc_megatron.tune.grpo import STYLE_OF_OPERATION

    run = run_name(recipe.name, seed)
    experiment, refresh = planner.experiment, recipe.refresh
    if experiment.generator.get("backend") == "openai":
        raise InputError(f"recipe {recipe.name}: refresh tunes a local generator, "
                         "which an openai server does not serve",
                         experiment.source, fix="use backend hf or vllm for refresh recipes")
    tune_flags = planner.commands.flags("synth tune", refresh.tune, f"{recipe.name}.refresh.tune",
                                        {"input", "output_dir", "output", "model", "checkpoint", "id_key", "text_key"})
    style = refresh.tune.get("style") or STYLE_OF_OPERATION[refresh.tune.get("operation", "rephrase")]
    reference = [] if "reference" in refresh.tune else ["--reference", External(planner.corpus.train)]
    generator = experiment.generator.get("model")
    model = ["--model", _input(generator)] if generator else []  # then the tuned one of the round before
    data, train = [first], planner.add(train_stage(experiment, recipe, prefixes, [first], round_number=0,
                                                   lineage=[_round(0, generator, None, first, None)], seed=seed))
    rounds = [_round(0, generator, None, first, train)]
    for number in range(1, refresh.rounds + 1):
        checkpoint = f"{train.folder}/ckpt"
        tune = planner.add(Stage(f"tune-{run}-r{number}", [
            ["synth", "tune", "--input", External(planner.corpus.train), "--output-dir", f"{OUT}/generator",
             "--checkpoint", checkpoint, *reference, "--id-key", planner.corpus.id_key,
             "--text-key", planner.corpus.text_key, *model, *tune_flags]]))
        generator = f"{tune.folder}/generator"
        model = ["--model", generator]
        source = planner.synth(f"synth-rephrase-{run}-r{number}", "rephrase", recipe.generations,
                               {"model": generator, "styles": [style]})
        data.append(planner.synthetic(f"synthetic-{run}-r{number}", recipe.kind, source, None))
        pending = _round(number, generator, checkpoint, data[-1], None)
        train = planner.add(train_stage(experiment, recipe, prefixes, data, round_number=number,
                                        init_from=checkpoint, lineage=rounds + [pending], seed=seed))
        rounds.append({**pending, "checkpoint": f"{train.folder}/ckpt"})
    return train


def _round(number: int, generator, tuned_against, data: Stage, train: Stage | None) -> dict:
    from megadoc_megatron.synth.default_model import DEFAULT_MODEL

    return {"round": number, "generator": str(generator or DEFAULT_MODEL), "tuned_against": tuned_against,
            "synthetic": str(data.folder), "checkpoint": f"{train.folder}/ckpt" if train else f"{OUT}/ckpt"}


def train_stage(experiment: Experiment, recipe: Recipe, prefixes: dict, synthetic: list[Stage],
                round_number: int | None = None, init_from: str = "", lineage: list | None = None,
                seed: int = 0) -> Stage:
    """Seed i adds i to the blend's shuffle seed and to the trainer's initialization seed."""
    blend = experiment.blend
    mix = ["--synthetic-data-path", *[dataset_prefix(f"{s.folder}/synthetic", "text") for s in synthetic]] \
        if synthetic else []
    length = ["-E", recipe.epochs] if recipe.epochs is not None else ["--train-tokens", recipe.train_tokens]
    config = merge_dicts(experiment.train, recipe.train)
    config = merge_dicts(config, {"data": {"blend": f"{OUT}/blend/blend.json"}, "checkpoint": {"dir": f"{OUT}/ckpt"}})
    if seed:
        config = merge_dicts(config, {"seed": config.get("seed", TrainConfig.seed) + seed})
    if round_number is not None:
        config = merge_dicts(config, {"patience": recipe.refresh.patience,
                                      "checkpoint": {"init_from": init_from} if init_from else {}})
        if not (config.get("logging") or {}).get("eval_interval"):
            raise InputError(f"recipe {recipe.name}: refresh stops each round on a validation plateau, so it needs "
                             "train.logging.eval_interval", experiment.source,
                             fix="e.g. `train: {logging: {eval_interval: 100}}`")
    # unknown fields and wrong types fail here, before anything runs
    checked = config_from_dict(config, experiment.source)
    if checked.model.overrides:
        from megadoc_megatron.model.gpt import check_overrides

        check_overrides(checked.model.overrides, experiment.source)
    world_size = launcher_world_size(experiment.launch.train)
    if world_size is not None:  # and a launch that cannot run it
        plan_layout(checked, world_size, blend.global_batch_size, blend.seq_length, experiment.source)
    files = {"train.yaml": json.dumps(config, indent=2) + "\n"}
    if round_number is not None:
        files["lineage.json"] = json.dumps({"recipe": recipe.name, "rounds": lineage}, indent=2) + "\n"
    # the point's own settings, not the whole grid: a grid extended later keeps its trained points
    grid = {"recipe": recipe.grid["recipe"], "point": recipe.grid["point"]} if recipe.grid else None
    label = RunLabel(recipe.name, recipe.kind, recipe.generations, round_number, seed + 1 if seed else None, grid)
    files["ckpt/recipe.json"] = label.to_json() + "\n"
    suffix = f"-r{round_number}" if round_number else ""
    return Stage(f"train-{run_name(recipe.name, seed)}{suffix}", [
        ["blend", "--real-data-path", prefixes["real"], *mix, "-w", recipe.synthetic_weight, *length,
         "--seq-length", blend.seq_length, "--global-batch-size", blend.global_batch_size, "--seed", blend.seed + seed,
         "--valid-data-path", prefixes["heldout"], "--held-out-checked", "--output-dir", f"{OUT}/blend"],
        ["train", f"{OUT}/train.yaml"]],
        files=files, launcher=experiment.launch.train)


def eval_stage(experiment: Experiment, commands: Commands, run: str, train: Stage, heldout_prefix: str,
               long_heldout_prefix: str, name: str) -> Stage:
    """Results go beside the checkpoint (train-RECIPE/ckpt/eval), named after the eval settings."""
    checkpoint = f"{train.folder}/ckpt"
    lines = []
    for evaluator, values in (("loss", experiment.eval.loss), ("long-context", experiment.eval.long_context),
                              ("downstream", experiment.eval.downstream)):
        if values is None:
            continue
        data = {"loss": ["--valid-data-path", heldout_prefix],
                "long-context": ["--valid-data-path", long_heldout_prefix]}.get(evaluator, [])
        flags = commands.flags(f"eval {evaluator}", values, f"eval.{evaluator.replace('-', '_')}",
                               {"checkpoint", "valid_data_path", "data", "eval_name", "name", "iteration"})
        lines.append(["eval", evaluator, checkpoint, *data, "--eval-name", name, *flags])
    return Stage(f"eval-{run}", lines, launcher=experiment.launch.eval)
