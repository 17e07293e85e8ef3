"""The experiment config of `megadoc run`: every field checked, relative paths relative to the file.

Sections that hold flags of a stage command (`preprocess`, `generator`, `rephrase`, `rationale`,
`megadocs`, `eval.*`, `report`) take that command's options with underscores, e.g.
`generator: {max_new_tokens: 128, batch_size: 16}` means `megadoc synth ... --max-new-tokens 128
--batch-size 16`; they are checked against the command's own parser. See
examples/tiny_cpu/experiment.yaml for a complete config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from megadoc_megatron.config import build_dataclass, merge_dicts, parse_overrides, read_yaml
from megadoc_megatron.data.overlap import NGRAM, THRESHOLD, check_settings
from megadoc_megatron.errors import InputError

KINDS = ("real", "simple", "stitch", "stretch", "textbook")
REPHRASED_KINDS = ("simple", "stitch")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


@dataclass
class CorpusConfig:
    train: str = ""                  # real training documents (JSONL with id and text): rephrased and trained on
    heldout: str = ""                # i.i.d. held-out documents: never trained on or rephrased
    long_heldout: str = ""           # held-out documents for the long-context loss ("": the heldout ones);
                                     # as long as the context or longer, to show the loss fall with position
    id_key: str = "id"
    text_key: str = "text"


@dataclass
class TokenizerConfig:
    type: str = ""                   # as `megadoc preprocess --tokenizer-type`
    model: str = ""                  # as `--tokenizer-model`


@dataclass
class BlendSection:
    seq_length: int = 0
    global_batch_size: int = 0
    seed: int = 1234                 # Megatron's --seed: the sample shuffle


@dataclass
class DecontaminateSection:
    """Data hygiene: the held-out corpus against the training corpus (before any stage runs, and by
    `megadoc blend`), and every synthetic stream against the held-out corpus (`megadoc decontaminate`)."""
    overlap_ngram: int = NGRAM
    overlap_threshold: float = THRESHOLD
    drop: bool = True                # leave the synthetic records that quote held-out text out of training
    tasks: list | None = None        # lm-eval tasks whose documents count as held out too
    include_path: str = ""           # their task YAMLs, where they are not in lm-eval


@dataclass
class EvalSection:
    loss: dict = field(default_factory=dict)           # flags of `megadoc eval loss`
    long_context: dict | None = field(default_factory=dict)  # of `megadoc eval long-context`; null: skip
    downstream: dict | None = None                     # of `megadoc eval downstream`; null (default): skip


@dataclass
class LaunchConfig:
    train: str = ""                  # what starts Python for training, e.g. "torchrun --nproc-per-node 8";
                                     # "": this Python
    eval: str = ""                   # the same for evaluation
    slurm: dict = field(default_factory=dict)  # --execute slurm: sbatch options per stage kind (default,
                                     # preprocess, sample, synth, synthetic, tune, train, eval, report)
    synth_tasks: int = 0             # --execute slurm: each synth stage as an array of this many GPU tasks
    preprocess_tasks: int = 0        # --execute slurm: each conversion as an array of CPU tasks, then a merge
    python: str = ""                 # --execute slurm: the jobs' Python ("": the one running megadoc run)
    environments: dict = field(default_factory=dict)  # --execute slurm: per stage kind, how its jobs start
                                     # Python instead: a virtualenv's python, "apptainer exec --nv IMAGE.sif
                                     # python", or "srun --container-image=IMAGE python" (pyxis)
    grace_seconds: int = 300         # --execute slurm: this long before a job's time limit its stage saves and
                                     # stops (sbatch --signal=B:USR1@N), and the job requeues itself


@dataclass
class RefreshConfig:
    """SynPro's loop: pre-train to a plateau, tune the generator against that checkpoint,
    regenerate, continue pre-training with the new synthetic set added; `rounds` times."""
    rounds: int = 0                  # tune-regenerate-continue rounds after the first pre-training (0: none)
    patience: int = 3                # validations without a new best loss that end each round's pre-training
    tune: dict = field(default_factory=dict)  # flags of `megadoc synth tune`, e.g. {steps: 200, weights: [...]}


@dataclass
class Recipe:
    name: str = ""
    kind: str = ""                   # real | simple | stitch | stretch | textbook
    generations: int | None = None   # G: generations per document (synthetic kinds)
    epochs: int | list | None = None  # E: exact passes over the real training data (a list: a grid), or
    train_tokens: int | None = None  # ... a budget of training tokens, the real data repeated as it falls out
    synthetic_weight: float | list = 0.0  # w: share of the synthetic stream (0 for real; 1, budget only: no real data)

    # A list in epochs, synthetic_weight or train.optimizer's lr or weight_decay makes the recipe a grid: every
    # point is trained (named RECIPE-E16-w0.5, ...), and the report keeps the best by held-out loss and says
    # whether it is a local optimum (every neighbour one step away trained and worse) or at the grid's edge.
    styles: list | None = None       # simple/stitch: rephrase styles (default: the rephrase section's, else wikipedia)
    train: dict = field(default_factory=dict)  # overrides of the train section, e.g. {optimizer: {lr: 1e-3}}
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    share: float = field(default=1.0, metadata={"internal": True})  # of the real documents (baseline)
    grid: dict | None = field(default=None, metadata={"internal": True})  # a grid point's {recipe, axes, point}


@dataclass
class BaselineSection:
    """Real-only runs on seeded shares of the real training documents: with the real recipes (all the
    documents) they are the points of the fit L(D) = A / D^B + C that gives every recipe its data efficiency."""
    fractions: list = field(default_factory=list)  # shares of the documents, each in (0, 1), e.g. [0.125, 0.25, 0.5]
    recipe: str = ""                 # the real recipe whose settings (epochs, train) they use ("": the first)
    same_compute: bool = True        # E / fraction epochs: the recipe's compute on less unique data, as in the
                                     # data-limited regime (false: its E, so smaller shares train fewer steps)
    seed: int = 1234                 # draws the documents; at one seed each share holds the smaller ones


@dataclass
class Experiment:
    work_dir: str = "work"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    preprocess: dict = field(default_factory=dict)
    generator: dict = field(default_factory=dict)      # flags of `megadoc synth` for both operations
    rephrase: dict = field(default_factory=dict)       # ... for `megadoc synth rephrase` only
    rationale: dict = field(default_factory=dict)      # ... for `megadoc synth rationale` only
    megadocs: dict = field(default_factory=dict)
    blend: BlendSection = field(default_factory=BlendSection)
    decontaminate: DecontaminateSection = field(default_factory=DecontaminateSection)
    train: dict = field(default_factory=dict)          # a `megadoc train` config without data.blend and checkpoint.dir
    eval: EvalSection = field(default_factory=EvalSection)
    report: dict = field(default_factory=dict)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    recipes: list = field(default_factory=list)        # of Recipe once loaded
    seeds: int = 1                                     # trainings per recipe; seed i adds i to blend.seed (the
                                                       # sample shuffle) and to train.seed (initialization)
    baseline: BaselineSection = field(default_factory=BaselineSection)
    sweep: dict | None = None                          # see `megadoc sweep`
    mixture: dict | None = None                        # see `megadoc sweep --preset mixture` (experiment/mixture.py)
    source: Path = field(default=Path("."), metadata={"internal": True})  # the config file


# fields holding paths, resolved against the config file's folder
PATH_FIELDS = [("corpus", "train"), ("corpus", "heldout"), ("corpus", "long_heldout"), ("tokenizer", "model"),
               ("generator", "model"), ("generator", "tokenizer"), ("generator", "prompts"), ("rephrase", "prompts"),
               ("rationale", "prompts"), ("decontaminate", "include_path")]


TUNE_PATHS = ("reference", "faithfulness_model", "quality_model", "prompts")


def _resolve_existing(value, base: Path):
    if isinstance(value, str) and value and not Path(value).is_absolute() and (base / value).exists():
        return str((base / value).resolve())
    return value


def _resolve_fields(section, names, base: Path) -> None:
    """Relative paths (or lists of them) that exist relative to `base` become absolute."""
    for name in names:
        if isinstance(section, dict) and name in section:
            value = section[name]
            section[name] = [_resolve_existing(v, base) for v in value] if isinstance(value, list) \
                else _resolve_existing(value, base)


def _resolve(values: dict, base: Path) -> None:
    if isinstance(values.get("work_dir"), str):
        values["work_dir"] = str((base / values["work_dir"]).resolve())
    for section, name in PATH_FIELDS:
        _resolve_fields(values.get(section), [name], base)


def declared_name(recipe: Recipe) -> str:
    """The name the config gives: a grid point's recipe, else the recipe's own."""
    return recipe.grid["recipe"] if recipe.grid else recipe.name


def grid_points(recipe: Recipe, where: str, path) -> list[Recipe]:
    """The points of a recipe that gives a grid (see Recipe), or [recipe]."""
    from megadoc_megatron.evaluate.grids import AXES, grid, suffix

    optimizer = recipe.train.get("optimizer") or {}
    given = {"epochs": recipe.epochs, "synthetic_weight": recipe.synthetic_weight, "lr": optimizer.get("lr"),
             "weight_decay": optimizer.get("weight_decay")}
    lists = {axis: values for axis, values in given.items() if isinstance(values, list)}
    if not lists:
        return [recipe]
    for axis, values in lists.items():
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values) \
                or len(set(values)) != len(values):
            raise InputError(f"{where}: {axis} as a grid is a list of distinct numbers, not {values!r}", path,
                             fix=f"e.g. {axis}: [8, 16, 32]" if axis == "epochs" else f"e.g. {axis}: [0.5, 0.75]")
    axes = {axis: sorted(lists[axis]) if axis in lists else [given[axis]] for axis in AXES}
    points = []
    for point in grid(axes):
        settings = dict(zip(AXES, point.values))
        tuned = {axis: settings[axis] for axis in ("lr", "weight_decay") if axis in lists}
        train = {**recipe.train, "optimizer": {**optimizer, **tuned}} if tuned else recipe.train
        points.append(replace(recipe, name=recipe.name + suffix(axes, point.values), epochs=settings["epochs"],
                              synthetic_weight=settings["synthetic_weight"], train=train,
                              grid={"recipe": recipe.name, "axes": axes, "point": settings}))
    return points


def check_recipe(recipe: Recipe, where: str, path) -> Recipe:
    def fail(message: str, fix: str):
        raise InputError(f"{where}: {message}", path, fix=fix)

    if not NAME.match(recipe.name):
        fail(f"name {recipe.name!r} is not a plain name", "use letters, digits and _ . = + -, e.g. stitch_g8")
    if recipe.kind not in KINDS:
        fail(f"kind {recipe.kind!r} is unknown", f"use one of: {', '.join(KINDS)}")
    if (recipe.epochs is None) == (recipe.train_tokens is None):
        fail("give either epochs (exact passes over the real data) or train_tokens (a token budget)",
             "e.g. epochs: 4")
    if recipe.epochs is not None and recipe.epochs < 1:
        fail(f"epochs must be at least 1, not {recipe.epochs}", "count whole passes over the real data")
    budget = recipe.train_tokens is not None
    if budget:
        if not isinstance(recipe.train_tokens, (int, float)) or recipe.train_tokens < 1 \
                or recipe.train_tokens != int(recipe.train_tokens):
            fail(f"train_tokens must be a positive whole number, not {recipe.train_tokens}",
                 "e.g. train_tokens: 1.0e+8")
        recipe.train_tokens = int(recipe.train_tokens)  # YAML reads 1.0e+8 as a float
    if recipe.kind == "real":
        if recipe.generations is not None or recipe.synthetic_weight != 0:
            fail("a real-only recipe has no generations and no synthetic weight",
                 "drop generations and synthetic_weight")
    else:
        if not isinstance(recipe.generations, int) or recipe.generations < 1:
            fail(f"a {recipe.kind} recipe needs generations (G) of at least 1", "e.g. generations: 4")
        if not (0 < recipe.synthetic_weight <= 1 if budget else 0 < recipe.synthetic_weight < 1):
            fail(f"synthetic_weight must lie in (0, {'1]' if budget else '1)'}, not "
                 f"{recipe.synthetic_weight}",
                 "e.g. synthetic_weight: 0.75 (1, synthetic data only, needs train_tokens)")
    if recipe.styles is not None and (recipe.kind not in REPHRASED_KINDS or not recipe.styles
                                      or not all(isinstance(s, str) for s in recipe.styles)):
        fail("styles is a list of rephrase styles, for simple and stitch recipes", "e.g. styles: [qa]")
    refresh = recipe.refresh
    if refresh.rounds:
        if recipe.kind not in REPHRASED_KINDS:
            fail(f"refresh regenerates rephrases: a {recipe.kind} recipe cannot refresh",
                 "use it with simple or stitch")
        if refresh.rounds < 0 or refresh.patience < 1:
            fail("refresh needs rounds >= 0 and patience >= 1", "e.g. refresh: {rounds: 2, patience: 3}")
    reserved = {("data", "blend"), ("checkpoint", "dir")}
    for section, name in reserved:
        if name in (recipe.train.get(section) or {}):
            fail(f"train.{section}.{name} is set by megadoc run", f"remove {section}.{name}")
    return recipe


def load_experiment(path, overrides: list[str] = ()) -> Experiment:
    """Read and check an experiment config with `section.field=value` overrides (paths in them relative
    to the working directory)."""
    path = Path(path).resolve()
    values = read_yaml(path, "a YAML experiment config (see examples/tiny_cpu/experiment.yaml)")
    extra = parse_overrides(list(overrides))
    _resolve(values, path.parent)
    _resolve(extra, Path.cwd())
    values = merge_dicts(values, extra)
    experiment = build_dataclass(Experiment, values, "", path)
    experiment.source = path
    for section, name in [("corpus", "train"), ("corpus", "heldout"), ("tokenizer", "type"), ("tokenizer", "model")]:
        if not getattr(getattr(experiment, section), name):
            raise InputError(f"{section}.{name} is not set", path, fix=f"add `{section}: {{{name}: ...}}`")
    for name in ("train", "heldout", "long_heldout"):
        if (name != "long_heldout" or experiment.corpus.long_heldout) \
                and not Path(getattr(experiment.corpus, name)).is_file():
            raise InputError(f"corpus.{name} file not found: {getattr(experiment.corpus, name)}", path,
                             fix="give a JSONL file, relative to the config's folder or absolute")
    check_settings(experiment.decontaminate.overlap_ngram, experiment.decontaminate.overlap_threshold, path)
    if experiment.blend.seq_length < 1 or experiment.blend.global_batch_size < 1:
        raise InputError("blend.seq_length and blend.global_batch_size must be set", path,
                         fix="e.g. `blend: {seq_length: 4096, global_batch_size: 64}`")
    for section, name in [("data", "blend"), ("checkpoint", "dir")]:
        if name in (experiment.train.get(section) or {}):
            raise InputError(f"train.{section}.{name} is set by megadoc run", path, fix=f"remove {section}.{name}")
    entries = experiment.recipes
    if not isinstance(entries, list) or not entries:
        raise InputError("recipes: give a list of at least one recipe", path,
                         fix="e.g. `recipes: [{name: real, kind: real, epochs: 4}]`")
    declared = [build_dataclass(Recipe, entry, f"recipes[{i}]", path) for i, entry in enumerate(entries)]
    experiment.recipes = [check_recipe(point, f"recipes[{i}]", path) for i, recipe in enumerate(declared)
                          for point in grid_points(recipe, f"recipes[{i}]", path)]
    for recipe in experiment.recipes:
        _resolve_fields(recipe.refresh.tune, TUNE_PATHS, path.parent)
    names = [r.name for r in experiment.recipes] + sorted({r.grid["recipe"] for r in experiment.recipes if r.grid})
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise InputError(f"two recipes are named {duplicate!r}", path, fix="give every recipe its own name")
    if not isinstance(experiment.seeds, int) or experiment.seeds < 1:
        raise InputError(f"seeds must be a whole number of at least 1, not {experiment.seeds!r}", path,
                         fix="e.g. `seeds: 3` (each recipe trained three times)")
    check_baseline(experiment, path)
    return experiment


def check_baseline(experiment: Experiment, path) -> None:
    baseline = experiment.baseline
    if not baseline.fractions:
        return
    if not all(isinstance(f, (int, float)) and 0 < f < 1 for f in baseline.fractions) \
            or len(set(baseline.fractions)) != len(baseline.fractions):
        raise InputError(f"baseline.fractions must be distinct shares in (0, 1), not {baseline.fractions}", path,
                         fix="e.g. `baseline: {fractions: [0.125, 0.25, 0.5]}` (the real recipe trains on all)")
    real = [r for r in experiment.recipes if r.kind == "real" and r.epochs is not None]
    chosen = [r for r in real if declared_name(r) == (baseline.recipe or declared_name(real[0]))] if real else []
    if not chosen:
        raise InputError(f"baseline.recipe {baseline.recipe!r} is not a real recipe with epochs" if baseline.recipe
                         else "the baseline takes the epochs of a real recipe, and there is none", path,
                         fix="add e.g. `{name: real, kind: real, epochs: 16}` to recipes, or name it in "
                             "baseline.recipe")
    baseline.recipe = declared_name(chosen[0])
    taken = {r.name for r in experiment.recipes} & {r.name for r in baseline_recipes(experiment)}
    if taken:
        raise InputError(f"recipe {sorted(taken)[0]!r} has the name of a baseline run", path,
                         fix="rename it: the baseline's runs are named RECIPE_fFRACTION")


def baseline_recipes(experiment: Experiment) -> list[Recipe]:
    """The baseline's runs, as real recipes named RECIPE_fFRACTION (smallest share first), each with its
    recipe's grid where it gives one (RECIPE_fFRACTION-E64, ...); none when its recipe is not among those
    to run (`megadoc run --recipes`, a sweep's points)."""
    points = [r for r in experiment.recipes if declared_name(r) == experiment.baseline.recipe]
    return [_share_of(recipe, fraction, experiment.baseline.same_compute)
            for fraction in sorted(experiment.baseline.fractions) for recipe in points]


def _share_of(recipe: Recipe, fraction: float, same_compute: bool) -> Recipe:
    """A real recipe (or grid point) on a share of the documents: E / fraction epochs with same_compute."""
    from megadoc_megatron.evaluate.grids import AXES, suffix

    def epochs(value: int) -> int:
        return max(1, round(value / fraction)) if same_compute else value

    name = f"{declared_name(recipe)}_f{fraction:g}"
    if not recipe.grid:
        return replace(recipe, name=name, share=fraction, epochs=epochs(recipe.epochs))
    axes = {**recipe.grid["axes"], "epochs": [epochs(e) for e in recipe.grid["axes"]["epochs"]]}
    point = {**recipe.grid["point"], "epochs": epochs(recipe.epochs)}
    return replace(recipe, name=name + suffix(axes, tuple(point[a] for a in AXES)), share=fraction,
                   epochs=point["epochs"], grid={"recipe": name, "axes": axes, "point": point})
