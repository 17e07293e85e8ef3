"""`megadoc run CONFIG --execute slurm`: every stage its own SLURM job, chained by `afterok` dependencies.

Each job runs `megadoc run CONFIG --stage NAME` (the same config and overrides), which runs that one
stage under its lock, so the shared work folder stays the single source of truth: finished stages are
not submitted, a stage whose job is still queued or running is not submitted twice (the job ids are
kept in WORK/slurm/jobs.json and asked of `squeue`), and resubmitting after a failure or a preemption
continues from what the stages wrote. Synthesis stages can run as an array of GPU tasks (each takes its
share of the shards: `megadoc synth` reads SLURM_ARRAY_TASK_ID), followed by a short job that checks the
shards and marks the stage done; conversions as an array of CPU tasks (`megadoc preprocess --shard`),
followed by `megadoc merge`, which writes exactly the bytes of one conversion. Resources come from the
config's `launch.slurm` (sbatch options per stage kind: the stage name up to its first "-").
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from megadoc_megatron.errors import InputError
from megadoc_megatron.files import write_text_atomic

KINDS = ("preprocess", "sample", "synth", "synthetic", "tune", "train", "eval", "report")
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}


def kind_of(stage) -> str:
    return stage.name.split("-")[0]


def check_launch(slurm: dict, where) -> None:
    unknown = sorted(set(slurm) - {"default", *KINDS})
    if unknown:
        raise InputError(f"launch.slurm.{unknown[0]} is not a stage kind", where,
                         fix=f"use default or one of {', '.join(KINDS)}")


def job_script(stage, argv: list[str], python: str, array_size: int = 0, task: bool = False) -> str:
    """The batch script of one stage (or, with `task`, of the tasks of its array)."""
    environment = ["export PYTHONUNBUFFERED=1"]
    if kind_of(stage) == "train":  # tensor parallelism needs ordered kernel launches (Megatron-LM's rule)
        environment.append("export CUDA_DEVICE_MAX_CONNECTIONS=1")
    command = shlex.join([python, "-m", "megadoc_megatron.cli", *argv, "--stage", stage.name,
                          *([f"--array-size={array_size}"] if array_size else []), *(["--array-task"] if task else [])])
    return "\n".join(["#!/bin/bash", f"# megadoc stage {stage.name}{' (array task)' if task else ''}: "
                      f"{stage.folder}", "set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}",
                      *environment, command, ""])


def _active(job: str) -> bool:
    """Whether SLURM still has the job queued or running."""
    try:
        states = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                                timeout=60).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(state in ACTIVE for state in states)


def _submit(command: list[str], dry_run: bool, placeholder: str) -> str:
    print(shlex.join(command), flush=True)
    if dry_run:
        return placeholder
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise InputError("sbatch is not on PATH", fix="run on a SLURM login node, or use --execute local") from None
    except subprocess.CalledProcessError as error:
        raise InputError(f"sbatch refused a job: {error.stderr.strip()}", command[-1],
                         fix="check launch.slurm's options for this stage kind") from None
    return done.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"


def submit_stages(stages: list, work: Path, launch, argv: list[str], dry_run: bool) -> dict[str, str]:
    """Submit every unfinished stage (see the module docstring); returns {stage name: job id}."""
    from megadoc_megatron.experiment.status import stage_needs

    check_launch(launch.slurm, "launch.slurm")
    folder = work / "slurm"
    if not dry_run:
        folder.mkdir(parents=True, exist_ok=True)
    jobs_file = folder / "jobs.json"
    recorded = json.loads(jobs_file.read_text()) if jobs_file.is_file() else {}
    needs, jobs = stage_needs(stages), {}
    python = launch.python or sys.executable
    for stage in stages:
        if stage.done:
            continue
        known = recorded.get(stage.folder.name)
        if known and not dry_run and _active(known):
            print(f"{stage.name}: job {known} is still queued or running", flush=True)
            jobs[stage.name] = known
            continue
        after = [jobs[name] for name in needs[stage.name] if name in jobs]
        sbatch = ["sbatch", "--parsable", f"--job-name=megadoc-{stage.name}", f"--output={folder}/%x-%j.out"]
        kind = kind_of(stage)
        tasks = {"synth": launch.synth_tasks, "preprocess": launch.preprocess_tasks}.get(kind, 0)
        tasks = tasks if tasks > 1 else 0
        if tasks:
            script = folder / f"{stage.folder.name}.array.sbatch"
            _write(script, job_script(stage, argv, python, tasks, task=True), dry_run)
            array = _submit([*sbatch, *_options(launch, kind), f"--array=0-{tasks - 1}", *_dependency(after),
                             str(script)], dry_run, f"<{stage.name} array>")
            after, kind = [array], "default"  # the stage's own job checks or merges the shards: no GPU
        script = folder / f"{stage.folder.name}.sbatch"
        _write(script, job_script(stage, argv, python, tasks), dry_run)
        jobs[stage.name] = _submit([*sbatch, *_options(launch, kind), *_dependency(after), str(script)], dry_run,
                                   f"<{stage.name}>")
        recorded[stage.folder.name] = jobs[stage.name]
    if not dry_run:
        write_text_atomic(jobs_file, json.dumps(recorded, indent=2) + "\n")
    return jobs


def _options(launch, kind: str) -> list[str]:
    return shlex.split(launch.slurm.get(kind, launch.slurm.get("default", "")))


def _dependency(jobs: list[str]) -> list[str]:
    return [f"--dependency=afterok:{':'.join(jobs)}", "--kill-on-invalid-dep=yes"] if jobs else []


def _write(script: Path, text: str, dry_run: bool) -> None:
    if dry_run:
        print(f"# {script}\n{text}", flush=True)
    else:
        write_text_atomic(script, text)
