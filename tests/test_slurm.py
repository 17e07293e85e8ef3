"""`megadoc run --execute slurm` on a real SLURM (slurmctld, slurmd, munged: `bash tools/local_slurm.sh
start` runs one on this machine; .ci/run starts it and sets MEGADOC_REQUIRE_SLURM=1, so that these
tests fail there instead of skipping).

One module fixture runs a smaller tiny CPU demo twice, on the same corpus and config: here, stage after
stage (`--execute local`, training with torchrun over 2 processes), and as SLURM jobs (synthesis and
conversions as 2-task arrays, each training as a 2-task job whose ranks srun starts, with a 1-minute
time limit that the real-only training, about a minute of work and its startups, outlives: it finishes through
requeues). The tests read what the two runs wrote; the interruption harness then reruns the trainings
and synthesis as jobs while requeueing and cancelling them at random moments."""

import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from megadoc_megatron.cli import main
from megadoc_megatron.experiment.status import format_status, read_status, recorded_jobs
from megadoc_megatron.train.metrics import metric_rows

pytestmark = pytest.mark.e2e
EXAMPLE = REPO / "examples/tiny_cpu"
TIME_LIMIT_TRAIN = "--ntasks 2 --time 1"  # minutes: the real-only training needs two or more jobs' time


@pytest.fixture(scope="module")
def slurm():
    """A SLURM controller that answers, or a skip (a failure under MEGADOC_REQUIRE_SLURM=1)."""
    try:
        answered = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
        idle = answered.returncode == 0 and answered.stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        idle = False
    if not idle:
        reason = "no SLURM controller answers here (sinfo): start one with `bash tools/local_slurm.sh start`"
        if os.environ.get("MEGADOC_REQUIRE_SLURM"):
            pytest.fail(reason)
        pytest.skip(reason)


def experiment_config(folder: Path) -> Path:
    """The tiny CPU demo with two recipes, one seed, short generations, 2 ranks per training; the
    real-only recipe trains 22x longer than stitch_g2 (the time-limit test needs a training longer than a job:
    about a minute of 2 ranks' compute, where a job's first attempt trains 15-40 s)."""
    corpus = folder / "corpus"
    subprocess.run([sys.executable, str(EXAMPLE / "make_corpus.py"), "--output-dir", str(corpus), "--max-chars",
                    "1500", "--heldout-fraction", "0.3", "--max-train-documents", "6", "--long-min-chars", "2000"],
                   check=True, capture_output=True)
    config = yaml.safe_load((EXAMPLE / "experiment.yaml").read_text())
    config.update(corpus={"train": str(corpus / "train.jsonl"), "heldout": str(corpus / "heldout.jsonl"),
                          "long_heldout": str(corpus / "heldout_long.jsonl")},
                  tokenizer={"type": "SentencePieceTokenizer", "model": str(corpus / "tokenizer.model")},
                  seeds=1, baseline={},
                  recipes=[{"name": "real", "kind": "real", "train_tokens": 400 * 8 * 256},  # 400 iterations:
                           {"name": "stitch_g2", "kind": "stitch", "generations": 2, "epochs": 16,
                            "synthetic_weight": 0.5}],
                  launch={"train": f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node 2",
                          "grace_seconds": 20, "synth_tasks": 2, "preprocess_tasks": 2,
                          "slurm": {"train": TIME_LIMIT_TRAIN}})
    config["blend"]["global_batch_size"] = 8  # 2 data-parallel ranks of 4
    config["train"]["data"]["micro_batch_size"] = 4
    config["rephrase"]["max_new_tokens"] = 24
    config["rationale"]["max_new_tokens"] = 16
    config["generator"]["min_length_ratio"] = 0
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def megadoc(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "megadoc_megatron.cli", *argv], capture_output=True, text=True,
                          timeout=1200)
    assert not check or done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def queued(work: Path) -> set[str]:
    """The jobs recorded in a work folder (arrays by their array's id) that SLURM still has queued or
    running."""
    listed = subprocess.run(["squeue", "-h", "-o", "%F"], capture_output=True, text=True, check=True).stdout
    return set(listed.split()) & set(recorded_jobs(work).values())


def wait_for_jobs(work: Path, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while queued(work):
        assert time.time() < deadline, f"jobs still queued after {timeout} s:\n{format_status(read_status(work))}"
        time.sleep(3)


def report_table(work: Path) -> list[str]:
    return [line for line in (work / "report/report.md").read_text().splitlines() if line.startswith("|")]


def losses(train_stage: Path) -> list[tuple[int, float]]:
    return [(row["iteration"], row["loss"]) for _, row in metric_rows(train_stage / "ckpt") if "loss" in row]


def same_curve(interrupted: list[tuple[int, float]], uninterrupted: list[tuple[int, float]]) -> bool:
    """Each iteration logged once, and every iteration the uninterrupted run logged with the same loss (a
    run that stopped to resume also logged the iteration it stopped at)."""
    iterations = [i for i, _ in interrupted]
    return iterations == sorted(set(iterations)) and set(uninterrupted) <= set(interrupted)


@pytest.fixture(scope="module")
def runs(slurm, tmp_path_factory):
    """(local work folder, SLURM work folder, config, seconds of the SLURM run)."""
    folder = tmp_path_factory.mktemp("slurm")
    config = experiment_config(folder)
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # torchrun's default for several ranks; srun's ranks get the same
    try:
        local, jobs = folder / "local", folder / "jobs"
        megadoc("run", str(config), "--set", f"work_dir={local}")
        start = time.time()
        submitted = megadoc("run", str(config), "--set", f"work_dir={jobs}", "--execute", "slurm")
        assert "--array=0-1" in submitted.stdout
        wait_for_jobs(jobs)
        seconds = time.time() - start
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    return local, jobs, config, seconds


def stage(work: Path, name: str) -> Path:
    [folder] = (work / "stages").glob(f"{name}.*")
    return folder


def test_the_demo_as_jobs_reports_the_same_table_as_a_local_run(runs):
    local, jobs, config, seconds = runs
    states = read_status(jobs)
    assert {s.state for s in states} == {"done"}, format_status(states)
    again = megadoc("run", str(config), "--set", f"work_dir={jobs}")  # every stage done: the report, here
    assert re.search(r"(\d+) stages, \1 done, 0 to run", again.stdout)
    assert report_table(jobs) == report_table(local)
    print(f"demo as jobs: {len(states)} stages in {seconds:.0f} s; table identical to the local run's")
    logs = list((jobs / "slurm").glob("megadoc-synth-rephrase-*_*.out"))  # the array's two tasks
    assert len(logs) == 2 and all("attempt 1" in log.read_text() for log in logs)


def test_training_across_two_srun_tasks_logs_the_local_two_process_losses(runs):
    local, jobs, _, _ = runs
    for name in ("train-real", "train-stitch_g2"):
        log = (stage(jobs, name) / "log.txt").read_text()
        assert "$ srun --kill-on-bad-exit=1 " in log and "'data': 2" in log
        assert "torch.distributed.run" in (stage(local, name) / "log.txt").read_text()
        assert same_curve(losses(stage(jobs, name)), losses(stage(local, name)))


def test_a_training_longer_than_its_time_limit_finishes_through_requeues(runs):
    local, jobs, _, _ = runs
    job = recorded_jobs(jobs)[stage(jobs, "train-real").name]
    out = (jobs / "slurm" / f"megadoc-train-real-{job}.out").read_text()
    attempts = re.findall(r"=== megadoc: job \d+ attempt (\d+)", out)
    assert len(attempts) >= 2 and attempts == [str(i) for i in range(1, len(attempts) + 1)], out[-2000:]
    assert out.count("stopped to resume: requeueing job") == len(attempts) - 1
    curve, uninterrupted = losses(stage(jobs, "train-real")), losses(stage(local, "train-real"))
    assert same_curve(curve, uninterrupted)
    print(f"time limit: 1 minute, {len(attempts) - 1} requeues (stopped at iterations "
          f"{sorted({i for i, _ in curve} - {i for i, _ in uninterrupted})}), the {len(uninterrupted)} losses of the "
          "uninterrupted run identical")


def test_interrupted_jobs_lose_nothing_and_duplicate_nothing(runs):
    """The SLURM harness: the synthesis, trainings, evaluations and report run again as jobs (other
    generation and shuffle settings), while a seeded random choice of their jobs is requeued (`scontrol
    requeue`, as a preemption does) or signalled (`scancel --full --signal=TERM`: the stage stops; a
    job that ends failed is submitted again by `megadoc run --execute
    slurm` again, as a user does) at random moments; until every stage is done."""
    _, jobs, config, _ = runs
    changed = ["--set", f"work_dir={jobs}", "--set", "blend.seed=7", "--set", "rephrase.max_new_tokens=20",
               "--set", "launch.slurm.train=--ntasks 2",  # no time limit: the interruptions are the harness's
               "--recipes", "stitch_g2"]  # the long real-only training is the time-limit test's
    interruptions, seed = int(os.environ.get("MEGADOC_SLURM_INTERRUPTIONS", "4")), random.randrange(1 << 30)
    print(f"slurm harness: {interruptions} interruptions, seed {seed}")
    rng, survived, deadline = random.Random(seed), [], time.time() + 900
    megadoc("run", str(config), *changed, "--execute", "slurm")
    while time.time() < deadline:
        if not queued(jobs):
            if {s.state for s in read_status(jobs)} == {"done"}:
                break
            megadoc("run", str(config), *changed, "--execute", "slurm")  # what was cancelled goes again
            continue
        running = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%A %F %j"], capture_output=True,
                                 text=True, check=True).stdout.splitlines()
        ours = [line.split() for line in running if line.split()[1] in queued(jobs)]
        ours = [job for job in ours if sum(job[2] in hit for hit in survived) < 2]  # spread over the graph
        if ours and len(survived) < interruptions:
            job, _, name = rng.choice(ours)
            time.sleep(rng.uniform(1, 8))
            how = rng.choice(["requeue", "cancel"])
            command = ["scontrol", "requeue", job] if how == "requeue" else ["scancel", "--full", "--signal=TERM", job]
            if subprocess.run(command, capture_output=True).returncode == 0:
                survived.append(f"{how} {name}")
        time.sleep(2)
    states = read_status(jobs)
    assert {s.state for s in states} == {"done"}, format_status(states)
    print(f"slurm harness: survived {len(survived)} interruptions ({', '.join(survived)})")
    assert len(survived) >= min(interruptions, 2)
    megadoc("run", str(config), *changed)  # all done: nothing runs, the report prints
    check_nothing_lost(jobs)


def check_nothing_lost(work: Path) -> None:
    """Every generation once, every training's iterations once and complete, every blend the bytes its
    command writes afresh."""
    for synth in (work / "stages").glob("synth-*"):
        records = [json.loads(line) for shard in synth.glob("shard-*.jsonl") if "rejected" not in shard.name
                   for line in shard.read_text().splitlines()]
        ids = [record["id"] for record in records]
        assert records and len(ids) == len(set(ids)), synth.name
    for train in (work / "stages").glob("train-*"):
        iterations = [i for i, _ in losses(train)]
        planned = json.loads((train / "blend/blend.json").read_text())["train_iters"]
        assert iterations == sorted(set(iterations)) and iterations[-1] == planned, train.name
        command = shlex.split(json.loads((train / "stage.json").read_text())["commands"][0])
        fresh = work.parent / f"fresh-{train.name}"
        command[command.index("--output-dir") + 1] = str(fresh)
        assert main(command) == 0
        assert (fresh / "blend.json").read_text().replace(str(fresh), str(train / "blend")) == \
            (train / "blend/blend.json").read_text()


@pytest.fixture()
def small_config(slurm, tmp_path):
    return experiment_config(tmp_path)


def cancel_recorded(work: Path) -> None:
    jobs = sorted(set(recorded_jobs(work).values()))
    if jobs:
        subprocess.run(["scancel", *jobs], check=False)


@pytest.mark.parametrize("option, said, fix", [
    ("--partition nosuch", "invalid partition specified: nosuch", "correct launch.slurm.train"),
    ("--gpus-per-node 1", "Invalid generic resource (gres) specification", "correct launch.slurm.train")])
def test_a_job_slurm_refuses_names_its_stage_and_the_fix_and_is_not_recorded(small_config, tmp_path, capsys, option,
                                                                              said, fix):
    """A CPU-only partition refuses GPUs: launch.slurm.train replaces what the config asks for."""
    work = tmp_path / "work"
    try:
        assert main(["run", str(small_config), "--set", f"work_dir={work}", "--set", f"launch.slurm.train={option}",
                     "--execute", "slurm"]) == 2
        error = capsys.readouterr().err
        assert "stage train-real: SLURM did not accept its job" in error and said in error and fix in error
        recorded = recorded_jobs(work)
        assert len(recorded) == 6 and not any(name.startswith("train-") for name in recorded)  # the 3 conversions
        # (arrays and their merges) that come first were accepted, and are kept
    finally:
        cancel_recorded(work)


def test_a_controller_that_does_not_answer_is_named_with_the_fix(small_config, tmp_path, capsys, monkeypatch):
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
    dead = tmp_path / "slurm.conf"
    dead.write_text(re.sub(r"^SlurmctldHost=.*$", r"\g<0>\nSlurmctldPort=6999", conf, flags=re.MULTILINE))
    monkeypatch.setenv("SLURM_CONF", str(dead))
    assert main(["run", str(small_config), "--set", f"work_dir={tmp_path / 'work'}", "--execute", "slurm"]) == 2
    error = capsys.readouterr().err
    assert "stage preprocess-train: SLURM did not accept its job" in error and "Unable to contact slurm controller" \
        in error and "check `sinfo` and `scontrol ping`" in error
    assert recorded_jobs(tmp_path / "work") == {}
