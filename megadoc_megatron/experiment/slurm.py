"""`megadoc run CONFIG --execute slurm`: every stage its own SLURM job, chained by `afterok` dependencies.

Each job runs `megadoc run CONFIG --stage NAME` (the same config and overrides), which runs that one
stage under its lock, so the shared work folder stays the single source of truth: finished stages are
not submitted, a stage whose job is still queued or running is not submitted twice (the job ids are
kept in WORK/slurm/jobs.json, written after each job SLURM accepted, and asked of `scontrol`), and
resubmitting after a failure continues from what the stages wrote. Synthesis stages can run as an array
of GPU tasks (each takes its share of the shards: `megadoc synth` reads SLURM_ARRAY_TASK_ID), followed
by a short job that checks the shards and marks the stage done; conversions as an array of CPU tasks
(`megadoc preprocess --shard`), followed by `megadoc merge`, which writes exactly the bytes of one
conversion. Resources come from the config's `launch.slurm` (sbatch options per stage kind: the stage
name up to its first "-"), and how each kind starts Python from `launch.environments`.

Time limits and preemption: every job is submitted with `--requeue`, `--open-mode=append` (each
attempt's output is kept, after a line naming the attempt) and `--signal=B:USR1@launch.grace_seconds`.
The job script passes USR1 on to its stage: training finishes the step in flight, saves a checkpoint
and exits with status 75 (errors.Interrupted); any other stage stops where it is (they all resume from
their files). The job then requeues itself (`scontrol requeue`: the same job id, so the jobs that
depend on it keep waiting), and the next attempt resumes the stage. A job SLURM requeues or cancels
itself (`scontrol requeue`, preemption, `scancel`) gets SIGTERM, which the trainer takes the same way.
A train or eval job of several tasks starts one process per task with `srun` (`--nodes N
--ntasks-per-node 8`); one task uses launch.train / launch.eval (e.g. torchrun on one node).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from megadoc_megatron.errors import InputError, Interrupted
from megadoc_megatron.experiment.status import ACTIVE, JOBS, job_states, recorded_jobs, stage_needs
from megadoc_megatron.files import write_text_atomic

KINDS = ("preprocess", "sample", "synth", "synthetic", "tune", "train", "eval", "report")


def kind_of(stage) -> str:
    return stage.name.split("-")[0]


def check_launch(launch, where) -> None:
    for section in ("slurm", "environments"):
        unknown = sorted(set(getattr(launch, section)) - {"default", *KINDS})
        if unknown:
            raise InputError(f"launch.{section}.{unknown[0]} is not a stage kind", where,
                             fix=f"use default or one of {', '.join(KINDS)}")


def python_of(launch, kind: str) -> str:
    """How a kind's processes start Python: launch.environments, else launch.python, else this Python."""
    return launch.environments.get(kind) or launch.environments.get("default") or launch.python or sys.executable


def _launches_ranks(kind: str) -> bool:
    return kind in ("train", "eval")


def _srun(python: str) -> bool:
    return shlex.split(python)[0] == "srun"


def stage_python(launch, kind: str) -> str:
    """What runs a job's stage process. Where a train or eval stage's Python is an srun (a pyxis image),
    that srun starts the ranks, and the stage process that starts them runs outside it."""
    python = python_of(launch, kind)
    return (launch.python or sys.executable) if _launches_ranks(kind) and _srun(python) else python


def rank_launcher(launch, kind: str, env=os.environ) -> str:
    """Inside a SLURM job of several tasks (or whose Python is an srun), a train or eval stage starts one
    process per task, on every node of the allocation, with srun (ranks from SLURM_PROCID and SLURM_NTASKS:
    distributed.py); "" otherwise (launch.train or launch.eval, e.g. torchrun on one node)."""
    python = python_of(launch, kind)
    several = int(env.get("SLURM_NTASKS", "1")) > 1
    if not _launches_ranks(kind) or "SLURM_JOB_ID" not in env or not (several or _srun(python)):
        return ""
    words = shlex.split(python)
    return shlex.join(["srun", "--kill-on-bad-exit=1", *(words[1:] if _srun(python) else words)])


def job_script(stage, argv: list[str], python: str, array_size: int = 0, task: bool = False) -> str:
    """The batch script of one stage (or, with `task`, of the tasks of its array): it runs the stage,
    passes the stop signals on, and requeues the job when the stage stopped to resume."""
    environment = ["export PYTHONUNBUFFERED=1"]
    if kind_of(stage) == "train":  # tensor parallelism needs ordered kernel launches (Megatron-LM's rule)
        environment.append("export CUDA_DEVICE_MAX_CONNECTIONS=1")
    command = shlex.join([*shlex.split(python), "-m", "megadoc_megatron.cli", *argv, "--stage", stage.name,
                          *([f"--array-size={array_size}"] if array_size else []), *(["--array-task"] if task else [])])
    return "\n".join([
        "#!/bin/bash", f"# megadoc stage {stage.name}{' (array task)' if task else ''}: {stage.folder}",
        "set -uo pipefail", f"cd {shlex.quote(str(Path.cwd()))}", *environment,
        'echo "=== megadoc: job ${SLURM_JOB_ID:-?} attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )) on $(hostname) '
        'at $(date \'+%F %T\') ==="',
        "stop=", f"{command} &", "child=$!",
        "# USR1: the time limit is near (sbatch --signal); TERM: SLURM stops the job. The stage saves and stops.",
        "trap 'stop=USR1; kill -USR1 $child 2>/dev/null' USR1",
        "trap 'stop=TERM; kill -TERM $child 2>/dev/null' TERM",
        "status=",
        'while [ -z "$status" ]; do  # a trapped signal interrupts wait: wait again while the stage runs',
        '  wait "$child"; code=$?', '  kill -0 "$child" 2>/dev/null || status=$code', "done",
        f'if [ "$status" -eq {Interrupted.exit_status} ] || {{ [ "$stop" = USR1 ] && [ "$status" -ne 0 ]; }}; then',
        f'  echo "megadoc: stage {stage.name} stopped to resume: requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
        '  echo "megadoc: error: job $SLURM_JOB_ID could not requeue itself; resubmit: megadoc run CONFIG '
        '--execute slurm"', "fi", 'exit "$status"', ""])


def _submit(command: list[str], stage, dry_run: bool, placeholder: str) -> str:
    """Submit one job; its id once SLURM accepted it, or an InputError naming the stage and the fix."""
    print(shlex.join(command), flush=True)
    if dry_run:
        return placeholder
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise InputError(f"stage {stage.name}: sbatch is not on PATH", command[-1],
                         fix="run on a SLURM login node (or start one here: bash tools/local_slurm.sh start), "
                             "or use --execute local") from None
    except subprocess.TimeoutExpired:
        raise InputError(f"stage {stage.name}: sbatch got no answer in 300 s", command[-1],
                         fix="check the controller with `sinfo`, then submit again") from None
    said = " ".join((done.stderr or done.stdout).split())
    if done.returncode != 0:
        unreachable = "contact" in said.lower() or "connect" in said.lower()
        raise InputError(f"stage {stage.name}: SLURM did not accept its job ({said or f'status {done.returncode}'})",
                         command[-1], fix="the controller does not answer: check `sinfo` and `scontrol ping`, "
                         "then submit again" if unreachable else f"correct launch.slurm.{kind_of(stage)} (or "
                         "launch.slurm.default): the options above; jobs already accepted are kept")
    return done.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"


def submit_stages(stages: list, work: Path, launch, argv: list[str], dry_run: bool) -> dict[str, str]:
    """Submit every unfinished stage (see the module docstring); returns {stage name: job id}."""
    check_launch(launch, "launch")
    folder = work / "slurm"
    if not dry_run:
        folder.mkdir(parents=True, exist_ok=True)
    recorded = recorded_jobs(work)
    needs, jobs = stage_needs(stages), {}
    slurm = {} if dry_run else job_states(list(recorded.values()))  # one question to SLURM for all of them

    def record(key: str, job: str) -> None:
        recorded[key] = job
        if not dry_run:  # after each job SLURM accepted: a failed submission leaves the others known
            write_text_atomic(folder / JOBS, json.dumps(recorded, indent=2) + "\n")

    for stage in stages:
        if stage.done:
            continue
        known = recorded.get(stage.folder.name)
        if known and slurm.get(known, {}).get("JobState") in ACTIVE:
            print(f"{stage.name}: job {known} is still queued or running", flush=True)
            jobs[stage.name] = known
            continue
        after = [jobs[name] for name in needs[stage.name] if name in jobs]
        kind = kind_of(stage)
        sbatch = ["sbatch", "--parsable", f"--job-name=megadoc-{stage.name}", "--requeue", "--open-mode=append",
                  f"--signal=B:USR1@{launch.grace_seconds}"]
        python = stage_python(launch, kind)
        tasks = {"synth": launch.synth_tasks, "preprocess": launch.preprocess_tasks}.get(kind, 0)
        tasks = tasks if tasks > 1 else 0
        if tasks:
            script = folder / f"{stage.folder.name}.array.sbatch"
            _write(script, job_script(stage, argv, python, tasks, task=True), dry_run)
            array = _submit([*sbatch, f"--output={folder}/%x-%A_%a.out", *_options(launch, kind),
                             f"--array=0-{tasks - 1}", *_dependency(after), str(script)], stage, dry_run,
                            f"<{stage.name} array>")
            record(f"{stage.folder.name}.array", array)
            after, kind = [array], "default"  # the stage's own job checks or merges the shards: no GPU
            python = stage_python(launch, "default")
        script = folder / f"{stage.folder.name}.sbatch"
        _write(script, job_script(stage, argv, python, tasks), dry_run)
        jobs[stage.name] = _submit([*sbatch, f"--output={folder}/%x-%j.out", *_options(launch, kind),
                                    *_dependency(after), str(script)], stage, dry_run, f"<{stage.name}>")
        record(stage.folder.name, jobs[stage.name])
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
