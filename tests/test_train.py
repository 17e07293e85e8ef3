"""`megadoc train`: the tiny model learns from a real blend; resume is exact; TP=2, PP=2 and DP=2
(real gloo processes) continue a TP=1/PP=1/DP=1 checkpoint with the same losses and gradient norms;
an interrupted save is never taken as the latest; config and launch errors are clear."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import pytest
import torch

from megadoc_megatron.errors import InputError
from megadoc_megatron.model import PRESETS, parameter_count, transformer_config
from megadoc_megatron.train import checkpoint
from megadoc_megatron.train.config import load_config
from megadoc_megatron.train.distributed import LaunchEnvironment, first_slurm_host, free_port, launch_environment
from megadoc_megatron.train.metrics import training_flops

from conftest import ITERS, REPO, SAVE_AT, run_training, write_config

def read_metrics(checkpoint_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (checkpoint_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["iteration"]: row for row in rows if "loss" in row}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, blend_json):
    """An uninterrupted single-process run: (config path, checkpoint dir, metrics by iteration)."""
    tmp = tmp_path_factory.mktemp("reference")
    config = write_config(tmp, blend_json, tmp / "ckpt")
    run_training(config)
    return config, tmp / "ckpt", read_metrics(tmp / "ckpt")


def test_tiny_model_learns_from_the_blend(reference):
    _, checkpoint_dir, metrics = reference
    assert sorted(metrics) == list(range(1, ITERS + 1))
    assert metrics[ITERS]["loss"] < metrics[1]["loss"] - 0.3
    assert all(torch.isfinite(torch.tensor(row["grad_norm"])) and row["tokens_per_s"] > 0 for row in metrics.values())
    assert metrics[1]["lr"] == 0.0 and metrics[3]["lr"] == pytest.approx(3.0e-3)  # Megatron's warmup from 0
    validation = [json.loads(line) for line in (checkpoint_dir / "metrics.jsonl").read_text().splitlines()
                  if "valid_loss" in line]
    assert [row["iteration"] for row in validation] == [SAVE_AT, ITERS]
    assert checkpoint.latest_iteration(checkpoint_dir) == ITERS


def resume_copy(reference, tmp_path):
    """A checkpoint folder holding only the reference's iteration SAVE_AT."""
    _, source, _ = reference
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint.iteration_dir(source, SAVE_AT), checkpoint.iteration_dir(target, SAVE_AT))
    (target / checkpoint.TRACKER).write_text(f"{SAVE_AT}\n")
    return target


def test_resume_is_exact(reference, tmp_path):
    config, _, expected = reference
    target = resume_copy(reference, tmp_path)
    run_training(config, overrides=[f"checkpoint.dir={target}"])
    resumed = read_metrics(target)
    assert sorted(resumed) == list(range(SAVE_AT + 1, ITERS + 1))
    for step in resumed:
        assert (resumed[step]["loss"], resumed[step]["grad_norm"], resumed[step]["lr"]) == \
            (expected[step]["loss"], expected[step]["grad_norm"], expected[step]["lr"])


def _rank(rank, port, config, overrides):
    run_training(config, LaunchEnvironment(rank, 2, rank, "127.0.0.1", port, "test"), overrides)


@pytest.mark.parametrize("layout", ["parallel.tensor=2", "parallel.pipeline=2", "data.micro_batch_size=2"],
                         ids=["TP2", "PP2", "DP2"])
def test_two_process_layouts_continue_the_single_process_run(reference, tmp_path, layout):
    """TP=2 / PP=2 / DP=2 (gloo) resume the TP=1 checkpoint (resharded) and match its losses."""
    config, _, expected = reference
    target = resume_copy(reference, tmp_path)
    overrides = [f"checkpoint.dir={target}", layout]
    torch.multiprocessing.spawn(_rank, args=(free_port(), config, overrides), nprocs=2, join=True)
    resumed = read_metrics(target)
    assert sorted(resumed) == list(range(SAVE_AT + 1, ITERS + 1))
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5)
        assert resumed[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-4)


def test_an_interrupted_save_is_not_the_latest(reference, tmp_path):
    """Killed after writing its files but before marking: the run resumes from the previous one."""
    from megatron.core import dist_checkpointing

    config, _, expected = reference
    target = resume_copy(reference, tmp_path)
    real_save = dist_checkpointing.save

    def save_then_die(state, directory, **kwargs):
        real_save(state, directory, **kwargs)
        raise KeyboardInterrupt("killed")

    with mock.patch.object(dist_checkpointing, "save", save_then_die), pytest.raises(KeyboardInterrupt):
        run_training(config, overrides=[f"checkpoint.dir={target}"])
    assert checkpoint.iteration_dir(target, ITERS).is_dir()
    assert checkpoint.latest_iteration(target) == SAVE_AT
    run_training(config, overrides=[f"checkpoint.dir={target}"])  # resumes and overwrites the partial one
    assert checkpoint.latest_iteration(target) == ITERS
    assert read_metrics(target)[ITERS]["loss"] == expected[ITERS]["loss"]


def test_patience_stops_on_a_plateau_and_a_rerun_stays_stopped(tmp_path, blend_json):
    """lr 0: the validation loss never improves, so patience 2 stops after the third validation."""
    config = write_config(tmp_path, blend_json, tmp_path / "ckpt", optimizer={"lr": 0.0, "min_lr": 0.0},
                          logging={"eval_interval": 1}, checkpoint={"save_interval": 0})
    result = run_training(config, overrides=["patience=2"])
    assert (result["stopped"], result["iterations"]) == ("plateau", 3)
    assert checkpoint.latest_iteration(tmp_path / "ckpt") == 3  # saved where it stopped
    again = run_training(config, overrides=["patience=2"])
    assert (again["stopped"], again["iterations"]) == ("plateau", 3)
    assert max(read_metrics(tmp_path / "ckpt")) == 3
    with pytest.raises(InputError, match="needs validation during training"):
        load_config(config, ["patience=2", "logging.eval_interval=0"])


def test_init_from_starts_a_new_run_from_another_runs_weights(reference, tmp_path):
    from megatron.core import dist_checkpointing

    config, source, expected = reference
    result = run_training(config, overrides=[f"checkpoint.dir={tmp_path / 'next'}", f"checkpoint.init_from={source}",
                                             "train_iters=3"])
    assert result["stopped"] == "end"
    continued = read_metrics(tmp_path / "next")
    assert sorted(continued) == [1, 2, 3] and continued[1]["lr"] == 0.0  # a fresh schedule, from the first sample
    assert continued[1]["loss"] < expected[1]["loss"] - 0.3  # but trained weights
    common = dist_checkpointing.load_common_state_dict(str(checkpoint.iteration_dir(tmp_path / "next", 3)))
    assert common["info"]["init_from"] == {"dir": str(source.resolve()), "iteration": ITERS}
    with pytest.raises(InputError, match="holds no checkpoint"):
        run_training(config, overrides=[f"checkpoint.dir={tmp_path / 'other'}", f"checkpoint.init_from={tmp_path}"])


def test_config_errors_name_the_field(tmp_path, blend_json):
    config = write_config(tmp_path, blend_json, tmp_path / "ckpt")
    with pytest.raises(InputError, match="unknown config field 'optimizer.lrr'"):
        load_config(config, ["optimizer.lrr=1"])
    with pytest.raises(InputError, match="optimizer.lr must be a float"):
        load_config(config, ["optimizer.lr=fast"])
    with pytest.raises(InputError, match="data.blend is not set"):
        load_config(config, ["data.blend="])
    (tmp_path / "bad.yaml").write_text("data:\n  blend: [unclosed\n")
    with pytest.raises(InputError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(InputError, match="the tensorboard package is not installed"):
            load_config(config, ["logging.tensorboard_dir=tb"])
    loaded = load_config(config, ["optimizer.lr=1e-3", "model.overrides={num_layers: 4}"])
    assert (loaded.optimizer.lr, loaded.model.overrides) == (1e-3, {"num_layers": 4})


def test_global_batch_must_split_into_micro_batches(tmp_path, blend_json):
    with pytest.raises(InputError, match="does not split into micro-batches of 3"):
        run_training(write_config(tmp_path, blend_json, tmp_path / "ckpt"), overrides=["data.micro_batch_size=3"])


def test_launch_environments():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "node1", "MASTER_PORT": "6000"}
    assert launch_environment(torchrun) == LaunchEnvironment(3, 8, 3, "node1", 6000, "torchrun")
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4321",
             "SLURM_JOB_NODELIST": "gpu[007-008]"}
    assert launch_environment(slurm) == LaunchEnvironment(9, 16, 1, "gpu007", 29821, "slurm")
    assert first_slurm_host("gpu[003-005,9],cpu1") == "gpu003" and first_slurm_host("node12") == "node12"
    assert launch_environment({}).world_size == 1


def test_flops_are_six_times_the_matmul_parameters_plus_attention():
    """Megatron-LM's formula restated: 6 x tokens x (parameters in matmuls) + causal attention."""
    vocab, seq, batch = 128256, 4096, 64
    for name, preset in PRESETS.items():
        config = transformer_config(name)
        matmul_parameters = parameter_count(preset, vocab) - vocab * preset.hidden_size \
            - (2 * preset.num_layers + 1) * preset.hidden_size  # input embedding and norms are not matmuls
        attention = 6 * preset.num_layers * preset.hidden_size * seq * batch * seq
        assert training_flops(config, vocab, seq, batch) == 6 * batch * seq * matmul_parameters + attention


def test_slurm_script_builds_the_srun_line():
    script = REPO / "examples" / "slurm" / "train.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = {**os.environ, "DRY_RUN": "1", "CONFIG": "cfg.yaml", "SET": "optimizer.lr=1e-3 parallel.tensor=2",
           "SLURM_JOB_ID": "1234", "MASTER_ADDR": "gpu001"}
    line = subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert line == ("MASTER_ADDR=gpu001 MASTER_PORT=29734 srun --kill-on-bad-exit=1 python -m megadoc_megatron.cli "
                    "train cfg.yaml --set optimizer.lr=1e-3 --set parallel.tensor=2")


def test_paper_config_is_valid():
    config = load_config(REPO / "examples" / "repro_300m" / "train.yaml", ["logging.tensorboard_dir="])
    assert (config.model.preset, config.precision.bf16, config.optimizer.min_lr) == ("300M", True, 0.0)


def test_the_command_line_loads_without_torch():
    """Every `megadoc` command builds the full parser: training's heavy imports wait for `run`."""
    code = "import sys, megadoc_megatron.cli as c; c.build_parser(); print(sorted({'torch', 'megatron'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip() == "[]"
