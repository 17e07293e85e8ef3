"""`megadoc run`: config checks, stage keys, and a smaller version of the tiny CPU example end to end
(with the real default generator, megatron-core training and evaluation): rerun skips, a changed
setting reruns only what depends on it, a killed run resumes."""

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from megadoc_megatron.blend.weights import Blend
from megadoc_megatron.cli import main
from megadoc_megatron.data.indexed import read_index
from megadoc_megatron.data.tokenizer import load_tokenizer
from megadoc_megatron.errors import InputError
from megadoc_megatron.experiment.config import load_experiment
from megadoc_megatron.experiment.plan import build_graph
from megadoc_megatron.experiment.status import read_status
from megadoc_megatron.train.metrics import metric_rows

EXAMPLE = REPO / "examples/tiny_cpu/experiment.yaml"


def example_at_one_point() -> list[dict]:
    """The example's recipes with E 16 where it gives a grid: one training each (grids: test_grid_*)."""
    recipes = yaml.safe_load(EXAMPLE.read_text())["recipes"]
    return [{**r, "epochs": 16 if isinstance(r.get("epochs"), list) else r["epochs"]} for r in recipes]


@pytest.fixture()
def config(tmp_path, spm_model):
    """The example config, pointed at a tiny corpus; returns a writer of variants."""
    corpus = [{"id": f"doc{i}", "text": f"Document {i}. " + "Some words about topic %d. " % i * 20} for i in range(6)]
    for name, rows in (("train", corpus[:4]), ("heldout", corpus[4:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = yaml.safe_load(EXAMPLE.read_text())
    base.update(work_dir=str(tmp_path / "work"), corpus={"train": "train.jsonl", "heldout": "heldout.jsonl"},
                tokenizer={"type": "SentencePieceTokenizer", "model": str(spm_model)},
                seeds=1, baseline={}, recipes=example_at_one_point())  # one training per recipe (the seeds
    # test sets both)

    def write(change=lambda c: None, name="experiment.yaml"):
        values = json.loads(json.dumps(base))
        change(values)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(values))
        return path
    return write


def stage_folders(path) -> dict[str, str]:
    return {s.name: s.folder.name for s in build_graph(load_experiment(path)).graph.stages}


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(colour="red"), "unknown config field 'colour'"),
    (lambda c: c["corpus"].pop("heldout"), "corpus.heldout is not set"),
    (lambda c: c["recipes"].append({"name": "x", "kind": "stitch", "epochs": 1, "synthetic_weight": 0.5}),
     "needs generations"),
    (lambda c: c["recipes"].append({"name": "x", "kind": "mash"}), "kind 'mash' is unknown"),
    (lambda c: c["recipes"][0].update(train_tokens=1000), "give either epochs"),
    (lambda c: c["recipes"][3].update(synthetic_weight=1), "1, synthetic data only, needs train_tokens"),
    (lambda c: c["recipes"][0].update(styles=["qa"]), "styles is a list of rephrase styles"),
    (lambda c: c["recipes"][4].update(refresh={"rounds": 1}), "a stretch recipe cannot refresh"),
    (lambda c: c["recipes"][3].update(refresh={"rounds": 1}), "needs train.logging.eval_interval"),
    (lambda c: c["recipes"][3].update(refresh={"rounds": 1, "tune": {"colour": 1}},
                                      train={"logging": {"eval_interval": 2}}),
     "stitch_g2.refresh.tune.colour is not an option of `megadoc synth tune`"),
    (lambda c: c["recipes"].append(dict(c["recipes"][0])), "two recipes are named 'real'"),
    (lambda c: c["recipes"][1].update(synthetic_weight=0), "synthetic_weight must lie in (0, 1)"),
    (lambda c: c["generator"].update(colour=1),
     "generator/rephrase.colour is not an option of `megadoc synth rephrase`"),
    (lambda c: c["generator"].update(output="x"), "generator/rephrase.output is set by megadoc run"),
    (lambda c: c["generator"].update(allow_truncated="yes"), "must be true or false"),
    (lambda c: c["train"]["optimizer"].update(lr="fast"), "optimizer.lr must be a number"),
    (lambda c: c["recipes"][0].update(train={"checkpoint": {"dir": "x"}}), "checkpoint.dir is set by megadoc run"),
    (lambda c: c["eval"]["long_context"].update(threshold="long"), "invalid command: megadoc eval long-context"),
    (lambda c: c.update(seeds=0), "seeds must be a whole number of at least 1"),
    (lambda c: c.update(baseline={"fractions": [0.5, 1]}), "baseline.fractions must be distinct shares in (0, 1)"),
    (lambda c: c.update(baseline={"fractions": [0.5], "recipe": "stitch_g2"}),
     "baseline.recipe 'stitch_g2' is not a real recipe with epochs"),
    (lambda c: c.update(baseline={"fractions": [0.5]}, recipes=c["recipes"][1:]),
     "the baseline takes the epochs of a real recipe, and there is none"),
    (lambda c: c.update(baseline={"fractions": [0.5]},
                        recipes=c["recipes"] + [dict(c["recipes"][0], name="real_f0.5")]),
     "recipe 'real_f0.5' has the name of a baseline run"),
    (lambda c: c["corpus"].update(long_heldout="missing.jsonl"), "corpus.long_heldout file not found"),
    (lambda c: c["recipes"][0].update(epochs=[7, 7]), "recipes[0]: epochs as a grid is a list of distinct numbers"),
    (lambda c: c["recipes"][0].update(epochs=[0, 7]), "recipes[0]: epochs must be at least 1, not 0"),
])
def test_config_errors_name_the_field(config, change, message):
    with pytest.raises(InputError, match=re.escape(message)) as error:
        build_graph(load_experiment(config(change)))
    assert "experiment.yaml" in str(error.value)


def test_seeds_baseline_shares_and_long_held_out_documents_become_stages(config, tmp_path):
    """seeds: 2 trains every recipe twice (blend and initialization seeds + 1); the baseline samples shares
    of the real dataset and trains the real recipe on each with its compute; long-context loss reads the
    long held-out documents; `--recipes` without the real recipe leaves the baseline out."""
    from megadoc_megatron.experiment.runner import select_recipes

    (tmp_path / "long.jsonl").write_text(json.dumps({"id": "long0", "text": "A long held-out text. " * 50}) + "\n")

    def change(c):
        c.update(seeds=2, baseline={"fractions": [0.25, 0.5]})
        c["corpus"]["long_heldout"] = "long.jsonl"
    experiment = load_experiment(config(change))
    plan = build_graph(experiment)
    stages = {s.name: s for s in plan.graph.stages}
    assert plan.runs_of["real"] == ["real", "real-seed2"] and plan.runs_of["real_f0.25"] == ["real_f0.25",
                                                                                             "real_f0.25-seed2"]
    assert len(plan.trains) == 2 * (len(experiment.recipes) + 2) and set(plan.evals) == set(plan.trains)

    def argv(stage, number=0):
        return stage.argv(stage.commands[number])

    first, second = argv(stages["train-stitch_g2"]), argv(stages["train-stitch_g2-seed2"])
    assert first[first.index("--seed") + 1] == "1234" and second[second.index("--seed") + 1] == "1235"
    assert "seed" not in json.loads(stages["train-stitch_g2"].files["train.yaml"])
    assert json.loads(stages["train-stitch_g2-seed2"].files["train.yaml"])["seed"] == 1235
    assert json.loads(stages["train-stitch_g2-seed2"].files["ckpt/recipe.json"])["seed"] == 2
    sample = argv(stages["sample-train-f0.25"])
    assert sample[:2] == ["merge", "--data-path"] and sample[sample.index("--sample-fraction") + 1] == "0.25"
    assert sample[2] == str(stages["preprocess-train"].folder / "real_text_document")
    baseline = argv(stages["train-real_f0.25-seed2"])
    assert baseline[baseline.index("--real-data-path") + 1].startswith(str(stages["sample-train-f0.25"].folder))
    assert baseline[baseline.index("-E") + 1] == "64"  # 16 epochs / 0.25: the full run's compute
    long_context = argv(stages["eval-stitch_g2-seed2"], 1)
    held_out = long_context[long_context.index("--valid-data-path") + 1]
    assert held_out.startswith(str(stages["preprocess-long-heldout"].folder))
    decontaminate = argv(stages["synthetic-stitch-g2"], 1)
    assert str(tmp_path / "long.jsonl") in decontaminate
    assert not [n for n in build_graph(select_recipes(experiment, ["stitch_g2"])).runs_of if n.startswith("real")]

    def own_epochs_and_refresh(c):
        change(c)
        c["baseline"]["same_compute"] = False
        c["recipes"][3].update(refresh={"rounds": 1}, train={"logging": {"eval_interval": 2}})
    other = load_experiment(config(own_epochs_and_refresh, "other.yaml"))
    stages = {s.name: s for s in build_graph(other).graph.stages}
    baseline = argv(stages["train-real_f0.25"])
    assert baseline[baseline.index("-E") + 1] == "16"  # same_compute: false keeps the recipe's E
    assert {"tune-stitch_g2-r1", "tune-stitch_g2-seed2-r1", "train-stitch_g2-seed2-r1"} <= set(stages)  # per seed


def test_grid_recipes_train_every_point_and_each_baseline_share_tunes_the_real_grid(config):
    """Lists make a grid: one train stage per point (and seed), named by the point's settings and labelled
    with them for the report; each baseline share trains the real recipe's grid on one sample stage;
    `--recipes` takes the grid's name; `megadoc sweep` refuses a recipe that is a grid already; a grid
    extended later keeps the stages of the points it had."""
    from megadoc_megatron.experiment.runner import select_recipes
    from megadoc_megatron.experiment.sweep import Sweep

    def change(c):
        c["recipes"][0]["epochs"] = [7, 14]
        c["recipes"][3].update(epochs=[4, 7], train={"optimizer": {"weight_decay": [0.1, 0.4]}})
        c.update(baseline={"fractions": [0.25, 0.5], "same_compute": False}, sweep={"recipe": "stitch_g2"})
    path = config(change)
    plan = build_graph(load_experiment(path))
    stages = {s.name: s for s in plan.graph.stages}
    assert [n for n in plan.runs_of if n.startswith("real")] == ["real_f0.25-E7", "real_f0.25-E14", "real_f0.5-E7",
                                                                  "real_f0.5-E14", "real-E7", "real-E14"]
    assert [n for n in plan.runs_of if n.startswith("stitch_g2")] == ["stitch_g2-E4-wd0.1", "stitch_g2-E4-wd0.4",
                                                                       "stitch_g2-E7-wd0.1", "stitch_g2-E7-wd0.4"]
    point = stages["train-stitch_g2-E7-wd0.4"]
    assert json.loads(point.files["ckpt/recipe.json"])["grid"] == {
        "recipe": "stitch_g2", "point": {"epochs": 7, "synthetic_weight": 0.5, "lr": None, "weight_decay": 0.4}}
    optimizer = json.loads(point.files["train.yaml"])["optimizer"]
    assert optimizer["weight_decay"] == 0.4 and optimizer["lr"] == 3.0e-3  # the rest from the train section
    blend = point.argv(point.commands[0])
    assert blend[blend.index("-E") + 1] == "7" and blend[blend.index("-w") + 1] == "0.5"
    assert [n for n in stages if n.startswith("sample-")] == ["sample-train-f0.25", "sample-train-f0.5"]
    share = stages["train-real_f0.25-E14"]
    assert share.argv(share.commands[0])[share.argv(share.commands[0]).index("-E") + 1] == "14"
    assert json.loads(share.files["ckpt/recipe.json"])["grid"]["recipe"] == "real_f0.25"
    assert "grid" not in json.loads(stages["train-simple_g2"].files["ckpt/recipe.json"])  # a point: as before
    chosen = build_graph(select_recipes(load_experiment(path), ["real"])).runs_of
    assert list(chosen) == ["real_f0.25-E7", "real_f0.25-E14", "real_f0.5-E7", "real_f0.5-E14", "real-E7", "real-E14"]
    with pytest.raises(InputError, match="sweep.recipe 'stitch_g2' gives a grid already"):
        Sweep(str(path), [])

    def extended(c):  # a grid extended later keeps the points it has trained
        change(c)
        c["recipes"][0]["epochs"] = [7, 14, 28]
    folders, more = stage_folders(path), stage_folders(config(extended, "extended.yaml"))
    assert [n for n, f in folders.items() if more.get(n) != f] == ["report"] and "train-real-E28" in more


def test_a_held_out_document_or_id_that_is_also_trained_on_is_refused_before_any_stage(config, tmp_path, capsys):
    path = config()
    train = (tmp_path / "train.jsonl").read_text().splitlines()
    held_out = (tmp_path / "heldout.jsonl").read_text()
    leaked = {**json.loads(train[1]), "id": "held-copy"}
    near = {"id": "held-near", "text": json.loads(train[2])["text"].replace("topic 2.", "topic two.", 3)}
    (tmp_path / "heldout.jsonl").write_text(held_out + json.dumps(leaked) + "\n")
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "1 training document(s) overlap held-out documents (training 'doc1' and held-out 'held-copy': 100% of " \
           "13-grams shared, limit 50%)" in capsys.readouterr().err
    (tmp_path / "heldout.jsonl").write_text(held_out + json.dumps(near) + "\n")  # 3 of 20 sentences changed
    assert main(["run", str(path), "--dry-run"]) == 2
    assert re.search(r"\(training 'doc2' and held-out 'held-near': [5-9]\d% of 13-grams", capsys.readouterr().err)
    assert main(["run", str(path), "--dry-run", "--set", "decontaminate.overlap_threshold=0.95"]) == 0
    (tmp_path / "heldout.jsonl").write_text(json.dumps({"id": "doc1", "text": "Another text."}) + "\n")
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "1 document id(s) are in both corpora (e.g. 'doc1')" in capsys.readouterr().err
    (tmp_path / "heldout.jsonl").write_text(held_out)  # the long held-out documents are checked too
    (tmp_path / "long.jsonl").write_text(json.dumps(leaked) + "\n")
    assert main(["run", str(path), "--dry-run", "--set", f"corpus.long_heldout={tmp_path / 'long.jsonl'}"]) == 2
    error = capsys.readouterr().err
    assert "long.jsonl" in error and "(training 'doc1' and held-out 'held-copy': 100% of 13-grams" in error


def test_a_changed_setting_changes_only_the_keys_of_the_stages_that_depend_on_it(config, tmp_path):
    base = stage_folders(config())
    assert stage_folders(config(name="again.yaml")) == base  # the file's own path does not matter

    def changed(change):
        other = stage_folders(config(change, "changed.yaml"))
        return sorted(name for name in base if other[name] != base[name])

    def stitch_lr(c):
        c["recipes"][3]["train"] = {"optimizer": {"lr": 1e-3}}
    assert changed(stitch_lr) == ["eval-stitch_g2", "report", "train-stitch_g2"]
    assert changed(lambda c: c["rationale"].update(max_new_tokens=8)) == [
        "eval-stretch_g2", "report", "synth-rationale-g2", "synthetic-stretch-g2", "train-stretch_g2"]
    assert changed(lambda c: c["decontaminate"].update(overlap_threshold=0.9)) == [  # what synthetic data feeds
        name for name in sorted(base) if name.split("-")[0] in ("synthetic", "train", "eval", "report")
        and not name.endswith("-real")]
    assert changed(lambda c: c["eval"]["loss"].update(max_tokens=100)) == [
        name for name in sorted(base) if name.startswith("eval-") or name == "report"]
    (tmp_path / "heldout.jsonl").write_text((tmp_path / "heldout.jsonl").read_text().replace("Document", "Doc"))
    assert "preprocess-train" not in changed(lambda c: None) and "preprocess-heldout" in changed(lambda c: None)


SMALLER = ("--set", "rephrase.max_new_tokens=24", "--set", "rationale.max_new_tokens=16", "--set",
           "generator.min_length_ratio=0", "--set", "seeds=1", "--set", "baseline.fractions=[]",  # too few documents
           "--set", f"recipes={json.dumps(example_at_one_point())}")
# for a baseline; seeds and baseline: test_seeds_baseline_shares_and_long_held_out_documents_become_stages


def run_example(work: Path, *extra, wait=True, recipes=("real", "stitch_g2", "stretch_g2")):
    """The README's demo script with a still smaller corpus, generations and recipe list."""
    command = ["bash", str(REPO / "examples/tiny_cpu/run.sh"), *(["--recipes", *recipes] if recipes else []),
               *SMALLER, *extra]
    if extra[:1] == ("sweep",):
        command = ["bash", str(REPO / "examples/tiny_cpu/run.sh"), "sweep", *SMALLER, *extra[1:]]
    env = {**os.environ, "WORK": str(work), "TRAIN_DOCUMENTS": "6"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def started(output: str) -> list[str]:
    return re.findall(r"^\[\d+/\d+\] (\S+) +running", output, re.MULTILINE)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    return work, run_example(work)


@pytest.mark.e2e
def test_the_example_runs_every_stage_and_reports(demo):
    work, output = demo
    assert started(output)[:5] == ["preprocess-train", "preprocess-heldout", "preprocess-long-heldout", "train-real",
                                   "synth-rephrase"]  # real-only training needs no generation: it comes first
    assert len(started(output)) == 14
    report = json.loads((work / "report/report.json").read_text())
    losses = {run["name"]: run["iid_loss"] for run in report["runs"]}
    assert set(losses) == {"real", "stitch_g2", "stretch_g2"} and all(2 < v < 12 for v in losses.values())
    assert {run["recipe"] for run in report["runs"]} == {"real", "stitch", "stretch"}
    for plot in ("loss_vs_generations.png", "loss_vs_position.png"):
        assert (work / "report" / plot).stat().st_size > 10_000
    assert "| real |" in output and "report:" in output
    states = read_status(work)
    assert len(states) == 14 and {s.state for s in states} == {"done"}  # megadoc status: the run's plan, all done
    blend = Blend.load(work / "runs/stitch_g2/blend/blend.json")
    assert [d.stream for d in blend.datasets] == ["real", "synthetic"] and blend.epochs == 16
    megadocs = [json.loads(line) for line in next(work.glob("stages/synthetic-stitch-g2.*/megadocs.jsonl")).open()]
    assert len(megadocs) == 6 and all(len(m["generation_ids"]) <= 2 for m in megadocs)
    decontamination = json.loads(next(work.glob("stages/synthetic-stitch-g2.*/decontamination.json")).read_text())
    held_out = [line for name in ("heldout", "heldout_long") for line in (work / f"corpus/{name}.jsonl").open()]
    assert decontamination["records"] == 6 and decontamination["references"] == len(held_out)
    converted = next(work.glob("stages/synthetic-stitch-g2.*/synthetic_text_document.idx"))
    assert read_index(str(converted)[:-len(".idx")]).num_documents == 6 - decontamination["contaminated"]
    # the corpus is real text, and the trained tokenizer keeps its layout: decoding gives the text back
    real = read_index(str(next(work.glob("stages/preprocess-train.*/real_text_document.idx")))[:-len(".idx")])
    tokenizer = load_tokenizer("SentencePieceTokenizer", work / "corpus/tokenizer.model")
    first = json.loads((work / "corpus/train.jsonl").read_text().splitlines()[0])["text"]
    assert real.num_documents == 6 and tokenizer.decode(real.document_tokens(0)[:-1]) == first


@pytest.mark.e2e
@pytest.mark.slow
def test_rerun_skips_finished_stages_and_a_change_reruns_only_its_dependents_even_after_kills(demo):
    """The fault harness: `megadoc run` killed with -9 at random moments (MEGADOC_FAULT_KILLS times, 2 by
    default; the seed is printed), then run to the end. Nothing may be lost or done twice: every stage
    finishes in its one folder, each training logs every iteration once, and each blend is byte for byte
    what its command writes afresh."""
    import random

    work, _ = demo
    again = run_example(work)
    assert started(again) == [] and "14 stages, 14 done, 0 to run" in again

    changed = ("--set", "blend.seed=7")  # every training stage and what follows; no data stage
    kills, seed = int(os.environ.get("MEGADOC_FAULT_KILLS", "2")), random.randrange(1 << 30)
    print(f"fault harness: {kills} kills, seed {seed}")
    rng, survived = random.Random(seed), 0
    while survived < kills:
        process = run_example(work, *changed, wait=False)
        time.sleep(rng.uniform(1.0, 15.0))  # the changed stages take about a minute: most kills land in them
        if process.poll() is not None:  # finished before this kill came
            break
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        survived += 1
    resumed = run_example(work, *changed)
    assert "report:" in resumed and {s.state for s in read_status(work)} == {"done"}
    rerun = [p for p in work.glob("stages/*") if p.name.split(".")[0].startswith(("train-", "eval-", "report"))
             and p.name not in again]
    assert sorted(p.name.split(".")[0] for p in rerun) == ["eval-real", "eval-stitch_g2", "eval-stretch_g2", "report",
                                                           "train-real", "train-stitch_g2", "train-stretch_g2"]
    def logged(train: Path) -> list[int]:
        return [row["iteration"] for _, row in metric_rows(train / "ckpt") if "loss" in row]

    first_runs = {p.name.split(".")[0]: p for p in work.glob("stages/train-*") if p.name in again}
    for train in (p for p in rerun if p.name.startswith("train-")):  # each logged iteration once, none missing
        assert logged(train) == logged(first_runs[train.name.split(".")[0]]), train.name
        blend_command = json.loads((train / "stage.json").read_text())["commands"][0]
        fresh = work.parent / f"fresh-{train.name}"
        argv = shlex.split(blend_command)  # `blend ...`, as the stage ran it
        argv[argv.index("--output-dir") + 1] = str(fresh)
        assert main(argv) == 0
        assert (fresh / "blend.json").read_text().replace(str(fresh), str(train / "blend")) == \
            (train / "blend/blend.json").read_text()
    print(f"fault harness: survived {survived} kills, nothing lost or duplicated")


@pytest.mark.e2e
@pytest.mark.slow
def test_local_sweep_runs_the_start_point_and_its_neighbours_until_tuned(demo):
    work, _ = demo
    output = run_example(work, "sweep", "--set", "sweep.recipe=stitch_g2", "--set", "sweep.lr=[0.003, 0.01]",
                         "--set", "sweep.weight_decay=[0.1]", "--execute", "local")
    assert started(output).count("synth-rephrase") == 0  # the data stages are shared with the runs above
    assert re.search(r"^tuned: stitch_g2-E16-w0.5-lr0\.0(03|1)-wd0.1 beats every neighbour", output, re.MULTILINE)
    report = json.loads((work / "report/report.json").read_text())
    assert sorted(run["lr"] for run in report["runs"]) == [0.003, 0.01]


REFRESH = {"name": "stitch_refresh", "kind": "stitch", "generations": 2, "epochs": 16, "synthetic_weight": 0.5,
           "train": {"logging": {"eval_interval": 4}},
           "refresh": {"rounds": 1, "patience": 2, "tune": {
               "steps": 1, "num_generations": 2, "max_new_tokens": 24, "floor_chars": 20, "max_documents": 2,
               "max_source_chars": 300, "influence_steps": 1}}}


def test_each_refresh_round_tunes_the_last_generator_against_the_last_checkpoint(config):
    """The plan of two rounds: round 2 tunes round 1's generator against round 1's checkpoint,
    regenerates with it, and continues from that checkpoint with both synthetic sets."""
    def two_rounds(c):
        c["recipes"] = [{**REFRESH, "refresh": {**REFRESH["refresh"], "rounds": 2}}]
    stages = {s.name: s for s in build_graph(load_experiment(config(two_rounds))).graph.stages}
    tune, first, second = (stages["tune-stitch_refresh-r2"], stages["tune-stitch_refresh-r1"],
                           stages["train-stitch_refresh-r1"])
    (command,) = tune.commands
    assert command[command.index("--model") + 1] == f"{first.folder}/generator"
    assert command[command.index("--checkpoint") + 1] == f"{second.folder}/ckpt"
    (synth,) = stages["synth-rephrase-stitch_refresh-r2"].commands
    assert synth[synth.index("--model") + 1] == f"{tune.folder}/generator"
    final = json.loads(stages["train-stitch_refresh-r2"].files["train.yaml"])
    assert final["checkpoint"]["init_from"] == f"{second.folder}/ckpt"
    blend = stages["train-stitch_refresh-r2"].commands[0]
    synthetic = blend[blend.index("--synthetic-data-path") + 1:blend.index("-w")]
    assert [s.split("/")[-2].split(".")[0] for s in synthetic] == [
        "synthetic-stitch-g2", "synthetic-stitch_refresh-r1", "synthetic-stitch_refresh-r2"]


@pytest.mark.e2e
@pytest.mark.slow
def test_a_refresh_round_tunes_regenerates_continues_and_records_its_lineage(demo):
    """Pre-train; then a round: GRPO-tune the generator (every reward live) against the newest
    checkpoint, regenerate with it (the hf backend loads it), continue from that checkpoint with
    every synthetic set so far. The data stages before the loop are the demo's, cached."""
    from megatron.core import dist_checkpointing

    from megadoc_megatron.train.checkpoint import iteration_dir
    from megadoc_megatron.tune.grpo import REWARDS

    work, _ = demo
    output = run_example(work, "--set", f"recipes=[{json.dumps(REFRESH)}]", "--no-report", recipes=())
    assert started(output) == ["train-stitch_refresh", "tune-stitch_refresh-r1", "synth-rephrase-stitch_refresh-r1",
                               "synthetic-stitch_refresh-r1", "train-stitch_refresh-r1", "eval-stitch_refresh"]
    rounds = json.loads((work / "lineage/stitch_refresh.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1] and "lineage of stitch_refresh:" in output
    assert rounds[0]["generator"] == "SmolLM2-135M-Instruct" and rounds[0]["tuned_against"] is None
    for before, entry in zip(rounds, rounds[1:]):
        generator = Path(entry["generator"])
        assert entry["tuned_against"] == before["checkpoint"]
        tuned = json.loads((generator / "tune.json").read_text())
        assert tuned["checkpoint"] == before["checkpoint"] and tuned["style"] == "faithful_rephrase"
        assert tuned["weights"] == {name: 1.0 for name in REWARDS} and not (generator / "trainer").exists()
        assert not (generator.parent / ".generator.partial").exists()
        assert tuned["base_model"] == ("SmolLM2-135M-Instruct" if entry["round"] == 1 else before["generator"])
        logged = [json.loads(line) for line in (generator / "rewards.jsonl").read_text().splitlines()]
        assert logged and all(math.isfinite(e[f"rewards/{name}/mean"]) for e in logged for name in REWARDS)
        records = [json.loads(line) for f in work.glob(f"stages/synth-rephrase-stitch_refresh-r{entry['round']}.*/"
                                                       "shard-*.jsonl") for line in f.read_text().splitlines()]
        assert records and {r["generator"]["model"] for r in records} == {str(generator)}
        common = dist_checkpointing.load_common_state_dict(
            str(iteration_dir(entry["checkpoint"], entry["iterations"])))
        assert common["info"]["init_from"]["dir"] == before["checkpoint"]
    for entry in rounds:
        assert entry["stopped"] in ("plateau", "end") and 0 < entry["iterations"] <= entry["planned_iterations"]
        assert (entry["stopped"] == "plateau") == (entry["iterations"] < entry["planned_iterations"])
    final = json.loads((work / "runs/stitch_refresh/blend/blend.json").read_text())
    assert [Path(d["prefix"]).parent.name.split(".")[0] for d in final["datasets"]] == [
        "preprocess-train", "synthetic-stitch-g2", "synthetic-stitch_refresh-r1"]
    # killed once the tuned generator was complete but before the stage was marked done: a rerun runs only that
    # stage (every other round is recorded as done), and it finds the generator already tuned
    tune = next(work.glob("stages/tune-stitch_refresh-r1.*"))
    (tune / "stage.json").unlink()
    tuned = (tune / "generator/tune.json").read_text()
    again = run_example(work, "--set", f"recipes=[{json.dumps(REFRESH)}]", "--no-report", recipes=())
    assert started(again) == ["tune-stitch_refresh-r1"] and (tune / "generator/tune.json").read_text() == tuned
    assert "already holds a generator tuned with these settings" in again


@pytest.mark.e2e
@pytest.mark.slow
def test_mixture_study_trains_every_share_and_budget_and_fits_each_share(demo):
    """w = 0 (real only) and w = 1 (synthetic only) at two token budgets: real blends, real
    training, the report and its plot (the fits: the test below)."""
    work, _ = demo
    output = run_example(work, "sweep", "--preset", "mixture", "--execute", "local",
                         "--set", "mixture.data=[{name: hq, kind: simple, generations: 2}]",
                         "--set", "mixture.synthetic_weight=[0, 1]",
                         "--set", "mixture.train_tokens=[4096, 12288]",
                         "--set", "train.optimizer.warmup_iters=1", "--set", "eval.long_context=null")
    assert "synth-rephrase" not in started(output)  # the demo's generations
    assert "4 of 4 points finished, 0 needed" in output
    synthetic_only = Blend.load(next(work.glob("stages/train-hq-w1-D12288.*/blend/blend.json")))
    assert [d.stream for d in synthetic_only.datasets] == ["synthetic"]
    assert synthetic_only.train_iters == 12288 // (4 * 256) and synthetic_only.synthetic_weight_realized == 1
    summary = json.loads((work / "mixture/mixture.json").read_text())["hq"]
    for weight in ("0", "1"):
        losses = summary["fits"][weight]["losses"]
        assert list(losses) == ["4096", "12288"] and losses["12288"] < losses["4096"]
        assert "needs at least 4" in summary["fits"][weight]["note"]
    for budget in (4096, 12288):  # the best w of each budget: the lower of the two trained losses, read apart
        measured = {}
        for stage in work.glob(f"stages/train-*-D{budget}.*"):
            [result] = (stage / "ckpt/eval").glob("loss.*.json")
            weight = Blend.load(stage / "blend/blend.json").synthetic_weight_requested
            measured[weight] = json.loads(result.read_text())["metrics"]["loss"]
        assert len(measured) == 2 and summary["best_weight"][str(budget)] == min(measured, key=measured.get)
    assert ((work / "mixture/mixture.png").stat().st_size > 10_000
            and "| 1 |" in (work / "mixture/mixture.md").read_text())


def test_mixture_summary_fits_each_share_and_finds_the_best_one(tmp_path):
    from megadoc_megatron.experiment.mixture import MixturePoint, mixture_summary, write_mixture_report

    budgets, laws = [1e6, 2e6, 4e6, 8e6, 16e6], {0.0: (2.0, 0.3, 3.0), 0.3: (1.5, 0.3, 2.9), 1.0: (2.0, 0.3, 3.2)}
    losses = {MixturePoint("real" if not w else "hq", w, int(b)): A / (b / 1e6) ** B + C
              for w, (A, B, C) in laws.items() for b in budgets}
    summary = mixture_summary(list(losses), ["hq"], losses)
    for weight, (A, B, C) in laws.items():
        fit = summary["hq"]["fits"][f"{weight:.4g}"]["fit"]
        assert (fit["A"], fit["B"], fit["C"]) == pytest.approx((A, B, C), abs=0.02)
    assert set(summary["hq"]["best_weight"].values()) == {0.3}
    write_mixture_report(tmp_path, summary, [int(b) for b in budgets])
    assert (tmp_path / "mixture/mixture.png").stat().st_size > 10_000


@pytest.mark.parametrize("script,env,expected", [
    ("preprocess.sbatch", {"INPUT": "real/a.jsonl", "PREFIX": "data/real", "TOKENIZER_MODEL": "/models/tok"},
     [("preprocess", "input", ["real/a.jsonl"]), ("preprocess", "tokenizer_type", "HuggingFaceTokenizer")]),
    ("preprocess.sbatch", {"INPUT": "real/*.jsonl", "PREFIX": "data/real", "TOKENIZER_MODEL": "/m", "SHARDS": "4",
                           "SLURM_ARRAY_TASK_ID": "2"}, [("preprocess", "shard", (2, 4))]),
    ("preprocess.sbatch", {"INPUT": "real/*.jsonl", "PREFIX": "data/real", "TOKENIZER_MODEL": "/m", "SHARDS": "4",
                           "MERGE": "1", "JSON_KEYS": "text title"},
     [("merge", "data_path", ["data/real_shard*of00004_text_document.idx"]),
      ("merge", "output_prefix", "data/real_title_document")]),
    ("eval.sbatch", {"CHECKPOINTS": "runs/a/ckpt runs/b/ckpt", "DATA": "data/held", "TASKS": "piqa sciq"},
     [("eval", "evaluator", "loss"), ("eval", "evaluator", "long-context"), ("eval", "tasks", ["piqa", "sciq"])]),
    ("run.sbatch", {"CONFIG": "exp.yaml", "SET": "work_dir=/scratch/x", "ARGS": "--recipes real"},
     [("run", "overrides", ["launch.train=torchrun --standalone --nproc-per-node 8", "work_dir=/scratch/x"])]),
])
def test_slurm_scripts_build_valid_commands(script, env, expected):
    import shlex

    from megadoc_megatron.cli import build_parser

    path = REPO / "examples/slurm" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    printed = subprocess.run(["bash", str(path)], env={**os.environ, "DRY_RUN": "1", **env}, check=True,
                             capture_output=True, text=True).stdout.splitlines()
    parsed = []
    for line in printed:
        words = shlex.split(line)
        assert words[:4] == ["srun", "python", "-m", "megadoc_megatron.cli"]
        parsed.append(build_parser().parse_args(words[4:]))
    for stage, field, value in expected:
        assert any(args.stage == stage and getattr(args, field, None) == value for args in parsed), (field, printed)


def test_local_optimum_needs_every_neighbour_and_names_the_edges():
    from megadoc_megatron.evaluate.grids import AXES, grid, local_optimum

    axes = {"epochs": [2, 4, 8], "synthetic_weight": [0.5, 0.75], "lr": [1e-3], "weight_decay": [0.1, 0.4, 0.8]}
    points = {p.values: p for p in grid(axes)}
    assert len(points) == 18 and AXES[0] == "epochs"
    center = points[(4, 0.75, 1e-3, 0.4)]
    losses = {center: 3.0, points[(2, 0.75, 1e-3, 0.4)]: 3.2}
    verdict = local_optimum(axes, losses)
    assert verdict.best == center and not verdict.tuned and verdict.edges == ["synthetic_weight"]
    assert {p.values for p in verdict.missing} == {(8, 0.75, 1e-3, 0.4), (4, 0.5, 1e-3, 0.4), (4, 0.75, 1e-3, 0.1),
                                                   (4, 0.75, 1e-3, 0.8)}
    losses.update({p: 3.1 for p in verdict.missing})
    assert local_optimum(axes, losses).tuned
    losses[points[(8, 0.75, 1e-3, 0.4)]] = 2.9  # a better neighbour: the search moves on
    moved = local_optimum(axes, losses)
    assert moved.best.values == (8, 0.75, 1e-3, 0.4) and not moved.tuned and "epochs" in moved.edges


def test_sweep_submits_one_slurm_job_per_needed_point(config, capsys):
    from megadoc_megatron.cli import build_parser, main

    def with_sweep(c):
        c["sweep"] = {"recipe": "stitch_g2", "epochs": [2, 4, 8], "weight_decay": [0.05, 0.1, 0.2]}
    path = config(with_sweep)
    assert main(["sweep", str(path), "--set", "blend.seed=7", "--execute", "slurm", "--dry-run",
                 "--sbatch-args", "--nodes 1 --time 1:00:00"]) == 0
    out = capsys.readouterr().out
    jobs = [line for line in out.splitlines() if line.startswith("sbatch")]
    assert len(jobs) == 1 and "no point has finished yet; start: stitch_g2-E4-w0.5-lr0.003-wd0.1" in out
    import shlex

    words = shlex.split(jobs[0])
    assert words[:7] == ["sbatch", "--job-name", "stitch_g2-E4-w0.5-lr0.003-wd0.1", "--nodes", "1", "--time", "1:00:00"]
    job = build_parser().parse_args(shlex.split(words[words.index("--wrap") + 1])[1:])
    assert (job.stage, job.point, job.overrides) == ("sweep", "stitch_g2-E4-w0.5-lr0.003-wd0.1", ["blend.seed=7"])
    assert main(["sweep", str(path), "--mode", "grid"]) == 0
    assert capsys.readouterr().out.count("needed") == 9


def test_paper_experiment_config_builds_its_stages(tmp_path, hf_tokenizer):
    for name in ("train", "heldout"):
        (tmp_path / f"{name}.jsonl").write_text('{"id": "a", "text": "b"}\n')
    experiment = load_experiment(REPO / "examples/repro_300m/experiment.yaml", [
        f"work_dir={tmp_path}/work", f"corpus.train={tmp_path}/train.jsonl", f"corpus.heldout={tmp_path}/heldout.jsonl",
        f"tokenizer.model={hf_tokenizer}"])
    plan = build_graph(experiment)
    names = [s.name for s in plan.graph.stages]
    assert names[:4] == ["preprocess-train", "preprocess-heldout", "train-real", "synth-rephrase"]  # real-only first
    assert "synth-rationale-g16" in names and "synthetic-stitch-g32" in names
    rephrase = next(s for s in plan.graph.stages if s.name == "synth-rephrase").commands[0]
    assert rephrase[rephrase.index("-G") + 1] == 32 and "vllm" in rephrase
    assert plan.trains["stitch_g32"].launcher.startswith("torchrun")


def test_dockerfile_installs_existing_extras_and_copies_the_package():
    text = (REPO / "Dockerfile").read_text()
    extras = [e for group in re.findall(r'pip install .*-e "\.\[([a-z,]+)\]"', text) for e in group.split(",")]
    setup = (REPO / "setup.py").read_text()
    assert {"openai", "gpu"} <= set(extras) and all(f'"{extra}": [' in setup for extra in extras)
    assert all(f"COPY {folder} /{folder}" in text for folder in ("megadoc_megatron", "tools", "examples"))
    images = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert [i.split()[2] for i in images] == ["source", "generate", "train"]  # train: the default target
    assert all("COPY --from=source / ./" in image and "pip install" in image for image in images[1:])


@pytest.mark.parametrize("launcher", ["", "python"])
def test_a_stage_runs_in_process_or_under_a_launcher_and_a_failure_names_its_log(tmp_path, spm_model, launcher):
    import sys

    from conftest import make_dataset

    from megadoc_megatron.experiment.stages import OUT, Graph, Stage, run_stage

    prefix = make_dataset(tmp_path, "docs", ["one document", "another document"], "SentencePieceTokenizer", spm_model)
    graph = Graph(tmp_path / "work")
    launcher = sys.executable if launcher else ""
    good = graph.add(Stage("inspect", [["inspect", prefix]], files={"note.txt": f"made in {OUT}"}, launcher=launcher))
    assert run_stage(good) == "ran" and run_stage(good) == "cached"
    assert "one document" in (good.folder / "log.txt").read_text()
    assert (good.folder / "note.txt").read_text() == f"made in {good.folder}"
    bad = graph.add(Stage("inspect-missing", [["inspect", str(tmp_path / "missing")]], launcher=launcher))
    with pytest.raises(InputError, match="stage inspect-missing failed") as error:
        run_stage(bad)
    assert str(bad.folder / "log.txt") in str(error.value) and not bad.done


def dry_run_jobs(output: str) -> tuple[dict[str, str], list[list[str]]]:
    """The scripts (path -> text) and sbatch command lines that `--execute slurm --dry-run` printed."""
    scripts, submissions, current = {}, [], None
    for line in output.splitlines():
        if line.startswith("# ") and line.endswith(".sbatch"):
            current = line[2:]
            scripts[current] = ""
        elif line.startswith("sbatch "):
            submissions.append(shlex.split(line))
            current = None
        elif current is not None:
            scripts[current] += line + "\n"
    return scripts, submissions


def test_the_papers_setup_submits_as_a_graph_of_slurm_jobs(config, tmp_path, capsys, hf_tokenizer):
    """examples/repro_300m as a cluster user submits it: one job per stage with its kind's resources,
    synthesis as 32-task GPU arrays, conversions as 8-task CPU arrays, afterok edges exactly where a stage
    reads another's output (and the report after every evaluation), and every job's command one our own CLI
    accepts."""
    from megadoc_megatron.cli import build_parser
    from megadoc_megatron.experiment.status import stage_needs

    repro = REPO / "examples/repro_300m/experiment.yaml"
    overrides = [f"work_dir={tmp_path / 'work'}", f"corpus.train={tmp_path / 'train.jsonl'}",
                 f"corpus.heldout={tmp_path / 'heldout.jsonl'}", f"tokenizer.model={hf_tokenizer}"]
    sets = [item for override in overrides for item in ("--set", override)]
    assert main(["run", str(repro), "--execute", "slurm", "--dry-run", *sets]) == 0
    scripts, submissions = dry_run_jobs(capsys.readouterr().out)
    stages = build_graph(load_experiment(repro, overrides)).graph.stages
    needs = stage_needs(stages)
    assert not (tmp_path / "work/slurm").exists()  # a dry run writes nothing
    by_job = {}
    for command in submissions:
        name = next(o.split("=", 1)[1] for o in command if o.startswith("--job-name="))[len("megadoc-"):]
        by_job.setdefault(name, []).append(command)
    assert set(by_job) == {s.name for s in stages}
    for stage in stages:
        *array, final = by_job[stage.name]
        after = next((o.split(":", 1)[1] for o in final if o.startswith("--dependency=afterok:")), "")
        if stage.name.startswith("synth-"):
            [array] = array
            assert "--array=0-31" in array and "--gpus-per-node" in array
            assert after == f"<{stage.name} array>" and "--gpus-per-node" not in final
        elif stage.name.startswith("preprocess-"):  # CPU tasks, then the merge
            [array] = array
            assert "--array=0-7" in array and "--cpus-per-task" in array and after == f"<{stage.name} array>"
        else:
            assert not array and (after.split(":") if after else []) == [f"<{n}>" for n in needs[stage.name]]
        script = scripts[final[-1]]
        [command] = [line for line in script.splitlines() if "-m megadoc_megatron.cli" in line]
        args = build_parser().parse_args(shlex.split(command.split(" -m megadoc_megatron.cli ", 1)[1])[:-1])  # &
        assert (args.stage, args.only_stage, args.config) == ("run", stage.name, str(repro))
        assert load_experiment(repro, args.overrides).work_dir == str(tmp_path / "work")
        if stage.name.startswith("train-"):
            assert "--nodes" in final and "--exclusive" in final and "--ntasks-per-node" in final
            assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in script
        for job in by_job[stage.name]:  # time limits: USR1 before the limit, the job requeues itself, logs appended
            assert {"--requeue", "--open-mode=append", "--signal=B:USR1@300"} <= set(job)
        # each kind's environment: synthesis in the vLLM image; a training's stage process outside the NGC
        # image, whose srun starts its ranks (rank_launcher); the other kinds inside it
        image = "megadoc-megatron+generate.sqsh" if stage.name.startswith("synth-") else "megadoc-megatron.sqsh"
        python = command.split(" -m megadoc_megatron.cli ")[0]
        if stage.name.startswith(("train-", "eval-")):
            assert python == sys.executable
        elif array:
            assert image in scripts[array[-1]].split(" -m megadoc_megatron.cli ")[0]
        else:
            assert image in python
    assert set(needs["report"]) >= {s.name for s in stages if s.name.startswith("eval-")}
    assert needs["train-stitch_g8"] == ["preprocess-train", "preprocess-heldout", "synthetic-stitch-g8"]
    assert needs["eval-stitch_g8"] == ["preprocess-heldout", "train-stitch_g8"] and needs["synth-rephrase"] == []


def test_slurm_submission_skips_finished_and_queued_stages_and_resumes_after_failures(config, tmp_path, capsys,
                                                                                      monkeypatch, spm_model):
    """sbatch and scontrol stand-ins record what is submitted: a second submission while the jobs are queued
    submits nothing; once they are gone, only the unfinished stages go again; a job runs its stage, and
    refuses to run before the stages it reads."""
    fake, path = tmp_path / "fake", config(lambda c: c["tokenizer"].update(model=str(spm_model)))
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/bash\nn=$(( $(cat "$FAKE/count" 2>/dev/null || echo 100) + 1 ))\n'
                                 'echo $n > "$FAKE/count"; echo "${@: -1}" >> "$FAKE/submitted"; echo "$n"\n')
    (fake / "scontrol").write_text('#!/bin/bash\nwhile read -r job; do echo "JobId=$job JobState=RUNNING"; done '
                                   '< <(cat "$FAKE/running" 2>/dev/null)\nexit 0\n')
    for tool in ("sbatch", "scontrol"):
        (fake / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE", str(fake))
    work = tmp_path / "work"

    def submitted() -> list[str]:
        return (fake / "submitted").read_text().splitlines() if (fake / "submitted").is_file() else []

    assert main(["run", str(path), "--execute", "slurm"]) == 0
    stages = build_graph(load_experiment(path)).graph.stages
    first = submitted()
    assert len(first) == len(stages) and all(Path(script).is_file() for script in first)
    jobs = json.loads((work / "slurm/jobs.json").read_text())
    (fake / "running").write_text("\n".join(jobs.values()) + "\n")
    assert main(["run", str(path), "--execute", "slurm"]) == 0
    assert submitted() == first and "still queued or running" in capsys.readouterr().out

    (fake / "running").write_text("")  # the jobs failed or were preempted
    assert main(["run", str(path), "--stage", "train-real"]) == 2
    assert "stage train-real reads preprocess-train, preprocess-heldout: not done yet" in capsys.readouterr().err
    assert main(["run", str(path), "--stage", "preprocess-heldout"]) == 0  # what that stage's job runs
    assert main(["run", str(path), "--execute", "slurm"]) == 0
    again = submitted()[len(first):]
    assert len(again) == len(stages) - 1 and not any("preprocess-heldout" in script for script in again)
    assert [s.state for s in read_status(work)].count("done") == 1


def test_without_sbatch_the_submission_names_the_stage_and_the_fix_and_records_nothing(config, tmp_path, capsys,
                                                                                    monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    assert main(["run", str(config()), "--execute", "slurm"]) == 2
    error = capsys.readouterr().err
    assert "stage preprocess-train: sbatch is not on PATH" in error and "tools/local_slurm.sh start" in error
    assert not (tmp_path / "work/slurm/jobs.json").exists()


def test_a_conversion_run_as_an_array_then_merged_is_the_conversion_itself(config, tmp_path, monkeypatch, capsys,
                                                                            spm_model):
    """launch.preprocess_tasks: the jobs of --execute slurm, run here by hand: each task converts its share
    (SLURM_ARRAY_TASK_ID), the stage's own job merges them into the bytes one conversion writes."""
    def arrays(c):
        c.update(launch={"preprocess_tasks": 2, "slurm": {"preprocess": "--cpus-per-task 2"}})
        c["tokenizer"].update(model=str(spm_model))
    path = config(arrays)
    assert main(["run", str(path), "--execute", "slurm", "--dry-run"]) == 0
    scripts, submissions = dry_run_jobs(capsys.readouterr().out)
    array = next(c for c in submissions if "--job-name=megadoc-preprocess-train" in c and "--array=0-1" in c)
    assert "--cpus-per-task" in array and "--array-size=2 --array-task" in scripts[array[-1]]
    for task in ("0", "1"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        assert main(["run", str(path), "--stage", "preprocess-train", "--array-size=2", "--array-task"]) == 0
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert main(["run", str(path), "--stage", "preprocess-train", "--array-size=2"]) == 0
    merged = next((tmp_path / "work/stages").glob("preprocess-train.*"))
    assert (merged / "stage.json").is_file() and len(list(merged.glob("real_shard0000*of00002_text_document.bin"))) == 2
    whole = config(lambda c: (arrays(c), c.update(work_dir=str(tmp_path / "whole"), launch={})), "whole.yaml")
    assert main(["run", str(whole), "--stage", "preprocess-train"]) == 0
    [single] = (tmp_path / "whole/stages").glob("preprocess-train.*")
    for suffix in (".bin", ".idx"):
        assert (merged / f"real_text_document{suffix}").read_bytes() == \
            (single / f"real_text_document{suffix}").read_bytes()


def test_a_corpus_split_that_passed_is_not_read_again_until_it_changes(config, tmp_path, monkeypatch):
    from megadoc_megatron.experiment.runner import check_corpus_split

    monkeypatch.setenv("MEGADOC_CACHE", str(tmp_path / "cache"))
    experiment = load_experiment(config())
    check_corpus_split(experiment)

    def unread(*args, **kwargs):
        raise AssertionError("the corpora were read again")
    with monkeypatch.context() as patch:
        patch.setattr("megadoc_megatron.data.overlap.NgramIndex", unread)
        check_corpus_split(experiment)
    train = (tmp_path / "train.jsonl").read_text().splitlines()
    with open(tmp_path / "heldout.jsonl", "a") as out:
        out.write(json.dumps({**json.loads(train[1]), "id": "held-copy"}) + "\n")
    with pytest.raises(InputError, match="overlap held-out documents"):
        check_corpus_split(experiment)


def test_ranks_start_with_srun_in_jobs_of_several_tasks_or_whose_python_is_an_srun():
    from megadoc_megatron.experiment.config import LaunchConfig
    from megadoc_megatron.experiment.slurm import rank_launcher, stage_python

    plain = LaunchConfig(train="torchrun --standalone --nproc-per-node 8", python="/venv/bin/python")
    job = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}
    assert rank_launcher(plain, "train", job) == "srun --kill-on-bad-exit=1 /venv/bin/python"
    assert rank_launcher(plain, "train", {**job, "SLURM_NTASKS": "1"}) == ""  # one task: launch.train (torchrun)
    assert rank_launcher(plain, "train", {"SLURM_NTASKS": "16"}) == ""  # not in a job: megadoc run, locally
    assert rank_launcher(plain, "synth", job) == ""  # one process per stage
    pyxis = LaunchConfig(environments={"default": "srun --container-image=/i/train.sqsh python",
                                       "synth": "apptainer exec --nv /i/vllm.sif python"})
    assert rank_launcher(pyxis, "eval", {**job, "SLURM_NTASKS": "1"}) == \
        "srun --kill-on-bad-exit=1 --container-image=/i/train.sqsh python"
    assert stage_python(pyxis, "train") == sys.executable  # the srun in the image starts the ranks
    assert stage_python(pyxis, "report") == "srun --container-image=/i/train.sqsh python"
    assert stage_python(pyxis, "synth") == "apptainer exec --nv /i/vllm.sif python"


def test_megadoc_status_says_what_slurm_says_of_a_stages_job(tmp_path):
    from megadoc_megatron.experiment.status import describe_job

    log = tmp_path / "job.out"
    log.write_text("=== megadoc: job 12 attempt 1 ===\nRuntimeError: old\n=== megadoc: job 12 attempt 2 ===\n"
                   "loading\nInputError: the disk is full\nexit\n")
    assert describe_job("12", {"JobState": "PENDING", "Reason": "BeginTime", "Restarts": "2"}, log) == \
        ("job 12 pending (BeginTime) requeued 2x", None)
    assert describe_job("12", {"JobState": "RUNNING", "Reason": "None", "NodeList": "gpu7", "Restarts": "0"}, log) \
        == ("job 12 running on gpu7", None)
    assert describe_job("12", {"JobState": "FAILED", "Reason": "NonZeroExitCode", "ExitCode": "1:0"}, log) == \
        ("job 12 failed (NonZeroExitCode) exit 1:0", "InputError: the disk is full")  # the last attempt's
    assert describe_job("12", None, log) == ("job 12 ended", "InputError: the disk is full")  # SLURM forgot it
