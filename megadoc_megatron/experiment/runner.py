"""Run an experiment's stage graph: every stage cached and resumable (`megadoc run`, and each point
of `megadoc sweep`), the refresh lineage, the summary table."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from megadoc_megatron.blend.weights import Blend
from megadoc_megatron.errors import InputError
from megadoc_megatron.files import write_text_atomic


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s" if seconds >= 60 else f"{seconds:.1f}s"


def run_experiment(experiment, report: bool = True, dry_run: bool = False, cost: dict | None = None,
                   slurm_argv: list[str] | None = None) -> dict:
    """Run (or, dry, describe and cost: `cost` holds experiment_costs' options) the stages; returns
    {stage name: 'cached' | 'ran' | 'to run' | 'done'}. With `slurm_argv` (how a job repeats this run's
    config and overrides), submit each unfinished stage as a SLURM job instead; returns {stage: job id}."""
    from megadoc_megatron.experiment.plan import build_graph
    from megadoc_megatron.experiment.stages import point_link, run_stage
    from megadoc_megatron.experiment.status import write_plan

    plan = build_graph(experiment)
    check_corpus_split(experiment)
    stages = [s for s in plan.graph.stages if report or s is not plan.report]
    work = plan.graph.work_dir
    pending = [s for s in stages if not s.done]
    if not dry_run:
        work.mkdir(parents=True, exist_ok=True)
        write_plan(work, stages)
    if slurm_argv is not None:
        from megadoc_megatron.experiment.slurm import submit_stages

        print(f"megadoc run: {len(stages)} stages, {len(stages) - len(pending)} done, {len(pending)} to submit "
              f"(work dir {work})", flush=True)
        return submit_stages(stages, work, experiment.launch, slurm_argv, dry_run)
    print(f"megadoc run: {len(stages)} stages, {len(stages) - len(pending)} done, {len(pending)} to run "
          f"(work dir {work})", flush=True)
    status = {}
    for number, stage in enumerate(stages, 1):
        where = stage.folder.relative_to(work)
        if dry_run:
            status[stage.name] = "done" if stage.done else "to run"
            print(f"[{number}/{len(stages)}] {stage.name:<28} {status[stage.name]:<7} {where}")
            for command in stage.commands:
                launcher = f"{stage.launcher} -m megadoc_megatron.cli" if stage.launcher else "megadoc"
                print(f"      {launcher} {shlex.join(stage.argv(command))}")
            continue
        print(f"[{number}/{len(stages)}] {stage.name:<28} {'cached' if stage.done else 'running'}  {where}", flush=True)
        start = time.time()
        status[stage.name] = run_stage(stage)
        if status[stage.name] == "ran":
            print(f"[{number}/{len(stages)}] {stage.name:<28} done in {_duration(time.time() - start)}", flush=True)
    if dry_run:
        from megadoc_megatron.experiment.cost import experiment_costs, format_costs

        print(format_costs(experiment_costs(experiment, plan, **(cost or {}))), flush=True)
    else:
        for name, train in plan.trains.items():
            point_link(work / "runs" / name, train.folder)
            if (train.folder / "lineage.json").is_file():
                rounds = lineage(train.folder)
                (work / "lineage").mkdir(exist_ok=True)
                write_text_atomic(work / "lineage" / f"{name}.json", json.dumps(rounds, indent=2) + "\n")
                print(format_lineage(name, rounds))
        if report:
            point_link(work / "report", plan.report.folder)
            print((plan.report.folder / "report.md").read_text() if status["report"] == "cached" else "")
            print(f"report: {work / 'report' / 'report.md'} (and report.html, *.png)")
    return status


def check_corpus_split(experiment) -> None:
    """The held-out corpora (i.i.d. and long) must share no document id with the training corpus (which
    synth rephrases), and no held-out document may (nearly) repeat a training one (word n-grams, the
    decontaminate section's settings): refused before any stage runs, where `megadoc blend` would refuse
    only after synthesis. A split that passed is not read again until a corpus or a setting changes (a
    mark in the cache, keyed by all of them)."""
    import hashlib

    from megadoc_megatron.files import cache_root, content_digest

    corpus, settings = experiment.corpus, experiment.decontaminate
    held_out_files = [corpus.heldout, *([corpus.long_heldout] if corpus.long_heldout else [])]
    key = json.dumps([content_digest(corpus.train), *[content_digest(f) for f in held_out_files], corpus.id_key,
                      corpus.text_key, settings.overlap_ngram, settings.overlap_threshold])
    passed = cache_root() / "checks" / f"corpus-split-{hashlib.sha256(key.encode()).hexdigest()[:32]}"
    if passed.is_file():
        return
    _check_held_out(experiment, held_out_files)
    try:
        passed.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(passed, key + "\n")
    except OSError:  # a read-only cache costs time, not correctness
        pass


def _check_held_out(experiment, held_out_files: list[str]) -> None:
    """One pass over the training corpus against every held-out document (of all the held-out files)."""
    from megadoc_megatron.data.overlap import NgramIndex, text_units
    from megadoc_megatron.jsonl import expand_inputs, read_documents

    corpus, settings = experiment.corpus, experiment.decontaminate
    held_out = [(file, document_id, text) for file in held_out_files
                for document_id, text in read_documents(expand_inputs([file]), corpus.id_key, corpus.text_key)]
    train_ids = []

    def train_units():
        for document_id, text in read_documents(expand_inputs([corpus.train]), corpus.id_key, corpus.text_key):
            train_ids.append(document_id)
            yield text_units(text)

    index = NgramIndex((text_units(text) for _, _, text in held_out), settings.overlap_ngram)
    found = [o for o in index.overlaps(train_units()) if o.fraction >= settings.overlap_threshold]
    train_set = set(train_ids)
    same_ids = {document_id: file for file, document_id, _ in reversed(held_out) if document_id in train_set}
    if same_ids:  # synth rephrases the training corpus: it must never be given a held-out id
        first = min(same_ids)
        raise InputError(f"{len(same_ids)} document id(s) are in both corpora (e.g. {first!r})", same_ids[first],
                         fix="give held-out documents ids of their own (the training corpus is what synth rephrases)")
    if found:
        worst = max(found, key=lambda o: o.fraction)
        file, held_id, _ = held_out[worst.reference]
        pair = f"training {train_ids[worst.query]!r} and held-out {held_id!r}"
        raise InputError(f"{len(found)} training document(s) overlap held-out documents ({pair}: {worst.fraction:.0%} "
                         f"of {settings.overlap_ngram}-grams shared, limit {settings.overlap_threshold:.0%})",
                         file, fix="hold out documents the training corpus does not contain (deduplicate the "
                                   "split), or raise decontaminate.overlap_threshold")


def lineage(train_folder: Path) -> list[dict]:
    """The refresh rounds up to a train stage (its lineage.json: generator, data, checkpoint), with
    what each round's training did: iterations, why it stopped, best validation loss, and the
    tuned generator's final rewards."""
    from megadoc_megatron.train.checkpoint import latest_iteration
    from megadoc_megatron.train.metrics import metric_rows

    rounds = json.loads((train_folder / "lineage.json").read_text())["rounds"]
    for entry in rounds:
        checkpoint = Path(entry["checkpoint"])
        planned = Blend.load(checkpoint.parent / "blend" / "blend.json").train_iters
        rows = [row for _, row in metric_rows(checkpoint)]
        entry["iterations"] = latest_iteration(checkpoint)
        entry["planned_iterations"] = planned
        entry["stopped"] = "plateau" if entry["iterations"] < planned else "end"
        entry["best_valid_loss"] = min((r["valid_loss"] for r in rows if "valid_loss" in r), default=None)
        tuned = Path(entry["generator"]) / "tune.json"
        entry["generator_rewards"] = json.loads(tuned.read_text())["final_rewards"] if tuned.is_file() else None
    return rounds


def format_lineage(name: str, rounds: list[dict]) -> str:
    lines = [f"lineage of {name}:", f"  {'round':<6} {'stopped':<8} {'iterations':>12} {'best valid':>11}  generator"]
    for entry in rounds:
        loss = f"{entry['best_valid_loss']:.4f}" if entry["best_valid_loss"] is not None else "—"
        lines.append(f"  {entry['round']:<6} {entry['stopped']:<8} "
                     f"{entry['iterations']:>5}/{entry['planned_iterations']:<6}"
                     f" {loss:>11}  {entry['generator']}")
    return "\n".join(lines)


def select_recipes(experiment, names: list[str] | None):
    """The recipes named (a grid by its name: all its points, or one point by its own)."""
    from megadoc_megatron.experiment.config import declared_name

    if names:
        known = {r.name for r in experiment.recipes} | {declared_name(r) for r in experiment.recipes}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InputError(f"no recipe named {unknown[0]!r}", experiment.source,
                             fix=f"choose from {', '.join(sorted(known))}")
        experiment.recipes = [r for r in experiment.recipes if r.name in names or declared_name(r) in names]
    return experiment


def run_one_stage(experiment, name: str, array_task: bool = False, array_size: int = 0) -> str:
    """What each SLURM job of `--execute slurm` runs: one stage, once the stages it reads are done; of a
    stage that ran as an array of `array_size` tasks, one task, or what finishes it (see slurm.py)."""
    import os
    from dataclasses import replace

    from megadoc_megatron.experiment.plan import build_graph
    from megadoc_megatron.experiment.slurm import kind_of, rank_launcher
    from megadoc_megatron.experiment.stages import run_array_task, run_stage
    from megadoc_megatron.experiment.status import stage_needs

    stages = {s.name: s for s in build_graph(experiment).graph.stages}
    if name not in stages:
        raise InputError(f"this experiment has no stage named {name!r}", experiment.source,
                         fix="submit again with `megadoc run CONFIG --execute slurm` (the config changed since)")
    missing = [need for need in stage_needs(list(stages.values()))[name] if not stages[need].done]
    if missing:
        raise InputError(f"stage {name} reads {', '.join(missing)}: not done yet", experiment.source,
                         fix="`megadoc status WORK` shows why; resubmit with `megadoc run CONFIG --execute slurm`")
    stage = stages[name]
    launcher = rank_launcher(experiment.launch, kind_of(stage))
    if launcher:  # this job has several tasks, maybe on several nodes: one rank per task
        stage = replace(stage, launcher=launcher)
    converts = stage.commands[0][0] == "preprocess"
    if array_task:
        task = os.environ.get("SLURM_ARRAY_TASK_ID", "0")
        if converts:  # each task converts its share
            stage = replace(stage, commands=[[*c, "--shard", f"{task}/{array_size}"] for c in stage.commands])
        run_array_task(stage, task)
        return "ran"
    if converts and array_size > 1:
        stage = replace(stage, commands=[merge for c in stage.commands for merge in shard_merges(c, array_size)])
    return run_stage(stage)


def shard_merges(preprocess: list, count: int) -> list[list]:
    """`megadoc merge` commands that join the `count` shards of a `megadoc preprocess` command into the
    datasets it writes itself (one per JSON key; byte for byte the same)."""
    from megadoc_megatron.data.dataset_info import dataset_prefix
    from megadoc_megatron.data.preprocess import shard_prefix

    prefix = preprocess[preprocess.index("--output-prefix") + 1]
    keys = preprocess[preprocess.index("--json-keys") + 1:]
    keys = keys[:next((i for i, item in enumerate(keys) if str(item).startswith("--")), len(keys))] or ["text"]
    return [["merge", "--data-path", *[dataset_prefix(shard_prefix(prefix, i, count), key) for i in range(count)],
             "--output-prefix", dataset_prefix(prefix, key)] for key in keys]
