"""Stopping on request (the `exit` section of the training config): a signal, to one process, to a whole
job (as SLURM sends it) or to one rank of two, or a wall-time budget ends `megadoc train` after the
iteration in flight with a checkpoint and exit status 75, and running the same command again resumes
exactly: every iteration logged once, the same losses as a run never stopped."""

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, run_training, write_config

from megadoc_megatron.cli import main
from megadoc_megatron.distributed import free_port
from megadoc_megatron.errors import InputError, Interrupted
from megadoc_megatron.train import checkpoint
from megadoc_megatron.train.config import ExitConfig, load_config
from megadoc_megatron.train.stopping import StopRequests

# Long enough that a signal sent once iteration SIGNAL_AFTER is logged lands well before the end.
ITERS, SIGNAL_AFTER = 16, 5


def exit_config(tmp_path, blend_json, train_iters: int = ITERS, **sections) -> str:
    """write_config's run (checkpoints and validation every 4 iterations), `train_iters` long."""
    path = Path(write_config(tmp_path, blend_json, tmp_path / "ckpt", **sections))
    path.write_text(json.dumps({**json.loads(path.read_text()), "train_iters": train_iters}))
    return str(path)


def training_log(checkpoint_dir) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(iteration, loss) of every training row of metrics.jsonl, in order, and (iteration, loss) of
    every validation row."""
    rows = [json.loads(line) for line in (checkpoint_dir / "metrics.jsonl").read_text().splitlines()]
    return ([(row["iteration"], row["loss"]) for row in rows if "loss" in row],
            [(row["iteration"], row["valid_loss"]) for row in rows if "valid_loss" in row])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, blend_json):
    """(config, training rows, validation rows) of a run that nothing stops."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    config = exit_config(tmp, blend_json)
    run_training(config)
    return config, *training_log(tmp / "ckpt")


class Train:
    """`megadoc train CONFIG` in a process group of its own (a job step of its own), or one rank of two;
    its output goes to files (a pipe nobody reads while waiting on another rank could fill up)."""

    def __init__(self, config, rank: int | None = None, port: int = 0):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if rank is not None:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        command = [sys.executable, "-m", "megadoc_megatron.cli", "train", str(config)]
        self.stdout, self.stderr = (tempfile.TemporaryFile("w+") for _ in range(2))
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self.stdout, stderr=self.stderr,
                                        text=True, start_new_session=True)
        STARTED.append(self.process)

    def output(self) -> str:
        return read(self.stdout) + read(self.stderr)

    def wait_for_iteration(self, checkpoint_dir, iteration: int) -> None:
        metrics = checkpoint_dir / "metrics.jsonl"
        while not (metrics.is_file() and any(json.loads(line).get("iteration", 0) >= iteration
                                             for line in metrics.read_text().splitlines() if line.endswith("}"))):
            assert self.process.poll() is None, f"training ended before iteration {iteration}:\n{self.output()}"
            time.sleep(0.02)

    def finish(self) -> tuple[int, str]:
        """(exit status, stderr)."""
        self.process.wait(timeout=300)
        return self.process.returncode, read(self.stderr)


def read(stream) -> str:
    stream.seek(0)
    return stream.read()


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_training_left_running():
    """A failed test ends the training processes it started (each leads a process group of its own)."""
    yield
    for process in STARTED:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    STARTED.clear()


def train_ranks(config) -> list[Train]:
    port = free_port()
    return [Train(config, rank=rank, port=port) for rank in (0, 1)]


@pytest.mark.e2e
@pytest.mark.slow
def test_a_signal_to_the_whole_job_stops_with_a_checkpoint_and_a_rerun_resumes_exactly(uninterrupted, tmp_path,
                                                                                       blend_json):
    """SIGUSR1 to every process of the job, as SLURM sends it before a time limit: megatron-core's
    checkpoint writer (a process started at the first save) must survive it for the stop's save."""
    _, expected, expected_validation = uninterrupted
    config = exit_config(tmp_path, blend_json)
    run = Train(config)
    run.wait_for_iteration(tmp_path / "ckpt", SIGNAL_AFTER)  # after the save of iteration 4
    os.killpg(run.process.pid, signal.SIGUSR1)
    status, stderr = run.finish()
    assert status == Interrupted.exit_status == 75, stderr
    stopped_at = checkpoint.latest_iteration(tmp_path / "ckpt")
    logged, _ = training_log(tmp_path / "ckpt")
    assert SIGNAL_AFTER <= stopped_at < ITERS and logged[-1][0] == stopped_at
    assert stderr.count("received SIGUSR1") == 1
    assert f"stopped at iteration {stopped_at} of {ITERS} on SIGUSR1 and saved a checkpoint in {tmp_path / 'ckpt'}" \
        ". Fix: run the same command again: it resumes from that checkpoint" in stderr

    status, stderr = Train(config).finish()
    assert status == 0, stderr
    logged, validation = training_log(tmp_path / "ckpt")
    assert [i for i, _ in logged] == list(range(1, ITERS + 1))  # each exactly once
    assert logged == expected and validation == expected_validation  # the same floats
    assert checkpoint.latest_iteration(tmp_path / "ckpt") == ITERS


def test_a_time_budget_stops_after_the_first_iteration_and_the_last_iteration_wins(tmp_path, blend_json, capsys):
    """1e-6 minutes are spent before the first iteration ends: each attempt trains one iteration and
    stops, except the one that reaches the end. The row of the stop is logged although log_interval
    skips it."""
    config = exit_config(tmp_path, blend_json, train_iters=2, optimizer={"warmup_iters": 1},
                         logging={"log_interval": 2}, exit={"duration_minutes": 1e-6})
    assert main(["train", config]) == 75
    assert checkpoint.latest_iteration(tmp_path / "ckpt") == 1
    assert [i for i, _ in training_log(tmp_path / "ckpt")[0]] == [1]
    out, err = capsys.readouterr()
    assert "stopped at iteration 1 of 2 on its time budget (exit.duration_minutes 1e-06): checkpoint saved" in out
    assert "resumes from that checkpoint" in err
    assert main(["train", config]) == 0
    assert [i for i, _ in training_log(tmp_path / "ckpt")[0]] == [1, 2]
    assert checkpoint.latest_iteration(tmp_path / "ckpt") == 2


def test_a_stop_without_checkpoint_dir_is_an_error_that_says_so(tmp_path, blend_json, capsys):
    config = exit_config(tmp_path, blend_json, train_iters=3, exit={"duration_minutes": 1e-6})
    assert main(["train", config, "--set", "checkpoint.dir="]) == 2
    assert "stopped at iteration 1 of 3 on its time budget (exit.duration_minutes 1e-06) with nothing saved " \
           "(checkpoint.dir is empty). Fix: set checkpoint.dir" in capsys.readouterr().err


@pytest.mark.e2e
@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_at_the_same_iteration(uninterrupted, tmp_path, blend_json):
    """Two data-parallel gloo ranks, SIGUSR1 to rank 1 alone: the ranks agree after every iteration,
    so both save the same iteration and exit 75, and both name the signal; the rerun completes."""
    _, expected, _ = uninterrupted
    config = exit_config(tmp_path, blend_json)
    ranks = train_ranks(config)
    ranks[0].wait_for_iteration(tmp_path / "ckpt", 2)
    os.kill(ranks[1].process.pid, signal.SIGUSR1)
    (status0, stderr0), (status1, stderr1) = (rank.finish() for rank in ranks)
    assert (status0, status1) == (75, 75), stderr0 + stderr1
    stopped_at = checkpoint.latest_iteration(tmp_path / "ckpt")
    assert training_log(tmp_path / "ckpt")[0][-1][0] == stopped_at < ITERS
    for stderr in (stderr0, stderr1):
        assert f"stopped at iteration {stopped_at} of {ITERS} on SIGUSR1 and saved a checkpoint" in stderr
    assert "received SIGUSR1" in stderr1 and "received" not in stderr0

    assert [rank.finish()[0] for rank in train_ranks(config)] == [0, 0]
    logged, _ = training_log(tmp_path / "ckpt")
    assert [i for i, _ in logged] == list(range(1, ITERS + 1))
    # close to one process's losses, not equal: DP=2 sums its gradients in another order
    assert [loss for _, loss in logged] == pytest.approx([loss for _, loss in expected], rel=1e-5)


def test_unknown_signal_names_are_refused(tmp_path, blend_json):
    config = exit_config(tmp_path, blend_json)
    for override in ("exit.signals=[SIGUSR3]", "exit.signals=[usr1]", "exit.signals=[SIGKILL]"):
        with pytest.raises(InputError, match=r"exit.signals names '\w+', which is not a signal training can stop on"
                                             r".*Fix: use some of SIGTERM, SIGUSR1") as error:
            load_config(config, [override])
        assert str(error.value).startswith(str(config))
    with pytest.raises(InputError, match="exit.signals must be a list"):
        load_config(config, ["exit.signals=SIGUSR1"])
    assert load_config(config, ["exit.signals=[]"]).exit.signals == []
    assert load_config(config).exit == ExitConfig(["SIGTERM", "SIGUSR1"], 0)


def test_without_signals_or_budget_nothing_listens_and_nothing_is_reduced():
    """No collective per iteration (agreed() needs no process group here), no handler installed."""
    requests = StopRequests(ExitConfig(signals=[], duration_minutes=0), started=0.0)
    before = signal.getsignal(signal.SIGUSR1)
    with requests.listening():
        assert signal.getsignal(signal.SIGUSR1) is before
        assert requests.agreed(device=None) is None


def test_handlers_are_restored_after_an_error():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    with pytest.raises(RuntimeError), StopRequests(ExitConfig(), started=0.0).listening():
        assert signal.getsignal(signal.SIGTERM) not in before
        raise RuntimeError("training failed")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before


def test_interrupted_keeps_its_kind_and_status_across_processes():
    error = pickle.loads(pickle.dumps(Interrupted("stopped", "ckpt", fix="run again")))
    assert type(error) is Interrupted and error.exit_status == 75 and str(error) == "ckpt: stopped. Fix: run again"
    assert InputError("bad").exit_status == 2
