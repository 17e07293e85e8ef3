"""The GPU demo (examples/gpu_demo) as a step of benchmarks/gpu_check.py (`--demo`, `--demo-only`): run
it afresh, then read back its report's table, each recipe's settings, the baseline fit and the time
each part took (from the stage records `megadoc run` writes)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN_SCRIPT = REPO / "examples" / "gpu_demo" / "run.sh"
LIMIT_SECONDS = 540  # the demo's budget is 8 minutes; one command on the device machine may run 10
# The CPU form (gpu_check --tiny): the GPU config through overrides, a real-only recipe of 8 epochs with the
# baseline (four real-only amounts, the report's fit) on 20 documents, a tiny GPT, a short context and one
# seed. Generation on a CPU takes minutes: `megadoc run --dry-run` checks its stages.
TINY_DOCUMENTS = 20
TINY_SETTINGS = ["--set", "train.model.preset=tiny", "--set", "train.precision.bf16=false", "--set", "seeds=1",
                 "--set", "blend.seq_length=128", "--set", "blend.global_batch_size=8",
                 "--set", "train.data.micro_batch_size=8", "--set", "eval.long_context.threshold=128",
                 "--set", "eval.long_context.offset=64", "--set", "eval.long_context.buckets=[0,32,64,128]",
                 "--set", "train.optimizer.lr=3.0e-3", "--set", "recipes=[{name: real, kind: real, epochs: 8}]"]
PARTS = {"preprocess": "data", "sample": "data", "synth": "generation", "synthetic": "megadocs",
         "train": "training", "eval": "evaluation", "report": "report"}  # stage name prefix -> part
SETTINGS = ("epochs", "synthetic_weight", "lr", "weight_decay", "parameters")  # of each recipe, in the summary


def run_demo(work: Path, tiny: bool) -> dict:
    """Run examples/gpu_demo/run.sh in a fresh work folder (its output in WORK/demo.log) and summarize it."""
    folder = work / "demo"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run: its times are the whole method's
    folder.mkdir(parents=True)
    env = {**os.environ, "WORK": str(folder), "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if tiny:
        env["TRAIN_DOCUMENTS"] = str(TINY_DOCUMENTS)
    settings = TINY_SETTINGS if tiny else []
    log = work / "demo.log"
    started = time.perf_counter()
    status = run_within_limit(["bash", str(RUN_SCRIPT), *settings], env, log)
    seconds = time.perf_counter() - started
    result = {"command": " ".join(["bash", str(RUN_SCRIPT.relative_to(REPO)), *settings]), "work": str(folder),
              "log": str(log), "seconds": round(seconds, 1), "exit_status": status,
              "seconds_by_part": seconds_by_part(folder, seconds) if (folder / "plan.json").is_file() else None}
    if status != 0 or not (folder / "report" / "report.json").is_file():
        why = f"stopped after {LIMIT_SECONDS} s" if status is None else "failed"
        return {**result, "ok": False, "error": f"the demo {why}; the end of its log:\n"
                                               + "\n".join(log.read_text(errors="replace").splitlines()[-40:])}
    return {**result, **report_summary(folder / "report")}


def run_within_limit(command: list[str], env: dict, log: Path) -> int | None:
    """The command's exit status, its output in `log`; None when it ran past LIMIT_SECONDS and was stopped
    (SIGTERM: a training saves and exits; then SIGKILL), so that the times of what finished still come back."""
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, cwd=REPO,
                                   start_new_session=True)
        try:
            return process.wait(timeout=LIMIT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            return None


def seconds_by_part(work: Path, total: float) -> dict:
    """Seconds of each part (data, generation, megadocs, training, evaluation, report) from the records
    of the finished stages in the run's plan; what lies outside them (corpus, tokenizer, start-up) too."""
    parts = dict.fromkeys(PARTS.values(), 0.0)
    for entry in json.loads((work / "plan.json").read_text())["stages"]:
        record = work / "stages" / entry["folder"] / "stage.json"
        if record.is_file():
            part = PARTS.get(entry["name"].split("-")[0], "other_stages")
            parts[part] = parts.get(part, 0.0) + json.loads(record.read_text())["seconds"]
    parts["outside_stages"] = total - sum(parts.values())
    return {part: round(seconds, 1) for part, seconds in parts.items()}


def report_summary(folder: Path) -> dict:
    """The report's table (markdown lines), each recipe's settings (of the point kept, for a grid, with
    the verdict of its tuning), the baseline fit and the reference loss, and whether every run has a
    finite i.i.d. loss."""
    report = json.loads((folder / "report.json").read_text())
    lines = (folder / "report.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    runs = {}
    for run in report["runs"]:
        runs.setdefault(run["name"], run)
    settings = {}
    for recipe in report["recipes"]:
        tuning = recipe["tuning"]
        kept = runs[tuning["kept"] if tuning else recipe["name"]]
        settings[recipe["name"]] = {**{key: kept[key] for key in SETTINGS}, "steps": recipe["iterations"],
                                    "tuned": tuning["verdict"] if tuning else None}
    losses = [run["iid_loss"] for run in report["runs"]]
    return {"table": lines[start:end], "settings": settings, "baseline_fit": report["baseline_fit"],
            "baseline_note": report["baseline_note"], "reference": report["reference"],
            "efficiency_note": report["efficiency_note"],
            "report": str(folder / "report.md"),
            "ok": bool(losses) and all(loss is not None and math.isfinite(loss) for loss in losses)}
