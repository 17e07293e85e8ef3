"""`megadoc status WORK`: every stage of the last `megadoc run` planned on a work folder, and where it
stands (done, running where and how far, failed with its error line, waiting on what), read from the
files the stages write, so it can be run while a run is going, from any node; and, after `--execute
slurm`, what SLURM says of each unfinished stage's job (pending and why, running, requeued, failed)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from megadoc_megatron.errors import InputError
from megadoc_megatron.experiment.lock import HEARTBEAT, alive_here, read_holder
from megadoc_megatron.experiment.stages import LOCK
from megadoc_megatron.files import write_text_atomic

PLAN = "plan.json"
JOBS = "jobs.json"  # in WORK/slurm (`--execute slurm`): stage folder name -> job id (its array's: "NAME.array")
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
          "REQUEUE_FED", "RESIZING", "STOPPED", "SIGNALING"}  # SLURM's states of a job it still holds


def stage_needs(stages: list) -> dict[str, list[str]]:
    """Each stage's name -> the stages whose output it reads (their folders appear in its commands, or in
    the files it writes first, such as a training config that starts from another stage's checkpoint)."""
    folders = {stage.name: str(stage.folder) for stage in stages}

    def reads(stage, folder: str) -> bool:
        return any(arg == folder or arg.startswith(folder + "/") for command in stage.commands
                   for arg in stage.argv(command)) or any(folder in text for text in stage.files.values())

    return {stage.name: [name for name, folder in folders.items()
                         if name != stage.name and (reads(stage, folder) or name in stage.after)]
            for stage in stages}


def write_plan(work: Path, stages: list) -> None:
    """WORK/plan.json: the stages in the order they run, each with the stages whose output it reads."""
    needs = stage_needs(stages)
    entries = [{"name": stage.name, "folder": stage.folder.name, "needs": needs[stage.name]} for stage in stages]
    write_text_atomic(work / PLAN, json.dumps({"planned": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": entries},
                                              indent=2) + "\n")


@dataclass
class StageState:
    name: str
    state: str     # done | running | failed | waiting | to run
    detail: str


def _holder_alive(lock: Path) -> dict | None:
    """The lock's holder while it runs: on this host its pid is alive; elsewhere its heartbeat is recent."""
    holder = read_holder(lock)
    if holder is None:
        return None
    if holder.get("host") == socket.gethostname():
        return holder if alive_here(int(holder.get("pid", -1))) else None
    try:
        return holder if time.time() - lock.stat().st_mtime < 3 * HEARTBEAT else None
    except FileNotFoundError:
        return None


def _progress(folder: Path) -> str:
    """How far a running stage is, from what it writes: generations, or training iterations."""
    shards = [p for p in folder.glob("shard-*.jsonl") if not p.name.endswith(".rejected.jsonl")]
    if shards:
        generations = sum(p.read_bytes().count(b"\n") for p in shards)
        return f"{generations:,} generations written"
    metrics, blend = folder / "ckpt" / "metrics.jsonl", folder / "blend" / "blend.json"
    if metrics.is_file() and blend.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()[-20:] if line.endswith("}")]
        done = max((row["iteration"] for row in rows if "loss" in row), default=0)
        return f"iteration {done:,} of {json.loads(blend.read_text())['train_iters']:,}"
    return ""


def read_status(work: Path) -> list[StageState]:
    plan = Path(work) / PLAN
    if not plan.is_file():
        raise InputError("no plan in this work folder", work,
                         fix="start `megadoc run CONFIG` on it first (it writes plan.json), or pass its work_dir")
    entries = json.loads(plan.read_text())["stages"]
    jobs = recorded_jobs(work)
    slurm = job_states([jobs[e["folder"]] for e in entries if e["folder"] in jobs
                        and not (Path(work) / "stages" / e["folder"] / "stage.json").is_file()])
    states: dict[str, StageState] = {}
    for entry in entries:
        state = _stage_state(Path(work), entry, states)
        if entry["folder"] in jobs and state.state != "done":
            state = _with_job(Path(work), state, jobs[entry["folder"]], slurm)
        states[entry["name"]] = state
    return list(states.values())


def _stage_state(work: Path, entry: dict, states: dict) -> StageState:
    """Where a stage stands, from the files it wrote."""
    folder = work / "stages" / entry["folder"]
    holder = _holder_alive(folder / LOCK)
    error = last_error_line(folder / "log.txt")
    unfinished = [need for need in entry["needs"] if states[need].state != "done"]
    if (folder / "stage.json").is_file():
        record = json.loads((folder / "stage.json").read_text())
        return StageState(entry["name"], "done", f"{record['seconds']:.0f} s, finished {record['finished']}")
    if holder:
        where = f"{holder['host']} pid {holder['pid']}" + (f", job {holder['job']}" if holder.get("job") else "")
        return StageState(entry["name"], "running", ", ".join(filter(None, [where, _progress(folder)])))
    if error:
        return StageState(entry["name"], "failed", error)
    if unfinished:
        return StageState(entry["name"], "waiting", "for " + ", ".join(unfinished))
    return StageState(entry["name"], "to run", "interrupted: reruns from its files" if folder.is_dir() else "")


def _with_job(work: Path, state: StageState, job: str, slurm: dict) -> StageState:
    """A stage's state with its SLURM job beside it: pending and why, running, requeued, or failed with
    the last error line of its log (when the stage's own log has none)."""
    log = job_log(work, state.name, job)
    words, error = describe_job(job, slurm.get(job), log)
    if state.state == "failed" and slurm.get(job, {}).get("JobState") in ACTIVE:  # stopped to resume, requeued
        return StageState(state.name, "waiting" if "PENDING" in words.upper() else "running",
                          f"stopped to resume [{words}]")
    if error and state.state != "running":
        return StageState(state.name, "failed", f"{state.detail if state.state == 'failed' else error} "
                                                f"[{words}; log {log}]")
    return StageState(state.name, state.state, f"{state.detail} [{words}]".strip())


def format_status(states: list[StageState]) -> str:
    counts = {state: sum(s.state == state for s in states) for state in ("done", "running", "failed", "waiting")}
    width = max(len(s.name) for s in states) if states else 10
    lines = [f"{s.name:<{width}}  {s.state:<8}  {s.detail}" for s in states]
    summary = ", ".join(f"{count} {state}" for state, count in counts.items() if count)
    return "\n".join([*lines, f"{len(states)} stages: {summary or 'none started'}"])


def recorded_jobs(work: Path) -> dict[str, str]:
    path = Path(work) / "slurm" / JOBS
    return json.loads(path.read_text()) if path.is_file() else {}


def job_states(jobs: list[str]) -> dict[str, dict]:
    """What SLURM says of these jobs (job id -> `scontrol show job` fields: JobState, Reason, Restarts,
    StdOut, ExitCode, NodeList, ...); jobs it no longer knows are left out. Array jobs are asked by the
    array's id and come back per task (ArrayJobId). {} when SLURM cannot be asked."""
    if not jobs:
        return {}
    try:
        done = subprocess.run(["scontrol", "show", "job", "--oneliner"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    wanted, states = set(jobs), {}
    for line in done.stdout.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        job = fields.get("ArrayJobId") if fields.get("ArrayJobId") in wanted else fields.get("JobId")
        if job in wanted:
            states.setdefault(job, []).append(fields)
    return {job: _merged(tasks) for job, tasks in states.items()}


def _merged(tasks: list[dict]) -> dict:
    """One view of an array's tasks: the worst state first (failed, running, pending), restarts summed."""
    order = ["FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED", "RUNNING", "COMPLETING", "PENDING",
             "COMPLETED"]
    tasks = sorted(tasks, key=lambda t: order.index(t["JobState"]) if t["JobState"] in order else len(order))
    return {**tasks[0], "Restarts": str(sum(int(t.get("Restarts", 0)) for t in tasks))}


def describe_job(job: str, state: dict | None, log: Path) -> tuple[str, str | None]:
    """(what SLURM says of a stage's job, in a few words; the last error line of its log if it failed)."""
    if state is None:  # SLURM forgot it (MinJobAge): what its log says
        return f"job {job} ended", last_error_line(log)
    name, reason = state["JobState"], state.get("Reason", "None")
    restarts = int(state.get("Restarts", 0))
    words = [f"job {job} {name.lower()}"]
    if name == "RUNNING":
        words.append(f"on {state.get('NodeList', '?')}")
    elif reason not in ("None", ""):
        words.append(f"({reason})")
    if restarts:
        words.append(f"requeued {restarts}x")
    failed = name in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED")
    if failed:
        words.append(f"exit {state.get('ExitCode', '?')}")
    return " ".join(words), last_error_line(log) if failed else None


def last_error_line(log: Path) -> str | None:
    """The last line naming an error in a job's or stage's log, of its last attempt (lines '=== ...')."""
    if not log.is_file():
        return None
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    start = max((i for i, line in enumerate(lines) if line.startswith("=== ")), default=0)
    errors = [line for line in lines[start:] if "error" in line.lower()]
    return errors[-1][:200] if errors else None


def job_log(work: Path, stage_name: str, job: str) -> Path:
    """The output file of a stage's job (sbatch --output above)."""
    return Path(work) / "slurm" / f"megadoc-{stage_name}-{job}.out"
