"""`megadoc train` (the portable engine; megatron-core's: test_engines.py): the tiny model learns
from a real blend; resume is exact; PP=2 and DP=2 (real gloo processes) continue a single-process
checkpoint with the same losses and gradient norms; an interrupted save is never taken as the
latest; config and launch errors are clear, and every documented launch can run its config."""

import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from conftest import ITERS, REPO, SAVE_AT, make_dataset, run_training, write_config
from megatron.core.transformer.module import MegatronModule

from megadoc_megatron.distributed import LaunchEnvironment, first_slurm_host, free_port, launch_environment
from megadoc_megatron.errors import InputError
from megadoc_megatron.model.gpt import transformer_config
from megadoc_megatron.model.presets import PRESETS, parameter_count
from megadoc_megatron.train import checkpoint
from megadoc_megatron.train.config import OptimizerConfig, load_config
from megadoc_megatron.train.metrics import training_flops


def read_metrics(checkpoint_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (checkpoint_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["iteration"]: row for row in rows if "loss" in row}


@pytest.fixture(scope="module")
def reference(trained_run):
    """An uninterrupted single-process run: (config path, checkpoint dir, metrics by iteration)."""
    config, checkpoint_dir = trained_run
    return config, checkpoint_dir, read_metrics(checkpoint_dir)


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


def test_a_metrics_line_torn_by_a_crash_is_dropped_on_resume(reference, tmp_path):
    config, source, _ = reference
    target = resume_copy(reference, tmp_path)
    lines = (source / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["iteration"] <= SAVE_AT]
    torn = next(line for line in lines if json.loads(line)["iteration"] > SAVE_AT)[:25]  # no newline
    (target / "metrics.jsonl").write_text("".join(line + "\n" for line in kept) + torn)
    run_training(config, overrides=[f"checkpoint.dir={target}"])
    after = [json.loads(line) for line in (target / "metrics.jsonl").read_text().splitlines()]
    assert after[:len(kept)] == [json.loads(line) for line in kept]
    assert [row["iteration"] for row in after if "loss" in row] == list(range(1, ITERS + 1))


def test_a_run_killed_during_validation_validates_that_iteration_on_resume(reference, tmp_path):
    """The checkpoint of a validation iteration is saved before the validation: killed during it, the
    run resumes with that validation, so history and patience match the uninterrupted run's."""
    config, source, _ = reference
    target = resume_copy(reference, tmp_path)
    rows = [json.loads(line) for line in (source / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if row["iteration"] <= SAVE_AT and "valid_loss" not in row]
    (target / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in logged))
    run_training(config, overrides=[f"checkpoint.dir={target}"])
    after = [json.loads(line) for line in (target / "metrics.jsonl").read_text().splitlines()]

    def validations(rows):
        return [(row["iteration"], row["valid_loss"]) for row in rows if "valid_loss" in row]
    assert validations(after) == validations(rows) and [i for i, _ in validations(rows)] == [SAVE_AT, ITERS]


def test_resume_refuses_another_model_and_changed_data_unless_allowed(reference, tmp_path, capsys):
    config, _, expected = reference
    target = resume_copy(reference, tmp_path)
    with pytest.raises(InputError, match="this checkpoint holds another model: model.overrides") as error:
        run_training(config, overrides=[f"checkpoint.dir={target}", "model.overrides={num_layers: 1}"])
    assert str(checkpoint.iteration_dir(target, SAVE_AT)) in str(error.value)
    other_seed = [f"checkpoint.dir={target}", f"data.blend={reblend(config, tmp_path)}"]
    with pytest.raises(InputError, match=r"the data differ from the checkpoint's \(blend .* \(draws \w+\) -> "):
        run_training(config, overrides=other_seed)
    assert not (target / "metrics.jsonl").exists() or not read_metrics(target)  # nothing trained
    run_training(config, overrides=[*other_seed, "checkpoint.allow_changed_data=true"])
    assert "changed since the checkpoint: blend" in capsys.readouterr().out
    assert sorted(read_metrics(target)) == list(range(SAVE_AT + 1, ITERS + 1))


def reblend(config, tmp_path) -> str:
    """The reference's blend again with another shuffle seed: other draws of the same datasets."""
    from megadoc_megatron.blend.weights import Blend, BlendConfig, make_blend

    blend = Blend.load(json.loads(Path(config).read_text())["data"]["blend"])
    by_stream = {s: [d.prefix for d in blend.datasets if d.stream == s] for s in ("real", "synthetic")}
    return make_blend(BlendConfig(by_stream["real"], by_stream["synthetic"], blend.synthetic_weight_requested,
                                  blend.epochs, blend.seq_length, blend.global_batch_size, str(tmp_path / "reblend"),
                                  seed=blend.seed + 1, valid_data=blend.validation_prefixes())).files.plan


def _rank(rank, port, config, overrides):
    run_training(config, LaunchEnvironment(rank, 2, rank, "127.0.0.1", port, "test"), overrides)


@pytest.mark.e2e
@pytest.mark.parametrize("layout", ["parallel.pipeline=2", "data.micro_batch_size=2"], ids=["PP2", "DP2"])
def test_two_process_layouts_continue_the_single_process_run(reference, tmp_path, layout):
    """The portable engine's own schedule (PP=2) and gradient all-reduce (DP=2) over gloo resume
    the single-process checkpoint (resharded) and match its losses (tensor parallelism is
    megatron-core's layers: test_model.py and test_engines.py)."""
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


def test_every_dataset_of_the_run_must_share_the_tokenizer(reference, tmp_path, golden_lines, hf_tokenizer):
    """Held-out data of another tokenizer is refused before training, with or without its sidecar."""
    from megadoc_megatron.blend.weights import Blend, BlendConfig, make_blend

    config, _, _ = reference
    blend = Blend.load(json.loads(Path(config).read_text())["data"]["blend"])
    other = make_dataset(tmp_path, "hf", [json.loads(line)["text"] for line in golden_lines[:5]],
                         "HuggingFaceTokenizer", hf_tokenizer)
    mixed = make_blend(BlendConfig([d.prefix for d in blend.datasets if d.stream == "real"],
                                   [d.prefix for d in blend.datasets if d.stream == "synthetic"], 0.5, 1, 64, 8,
                                   str(tmp_path / "mixed"), valid_data=[other])).files.plan
    overrides = [f"data.blend={mixed}", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    with pytest.raises(InputError, match="tokenized with .*hf_tokenizer, the run's tokenizer is .*spm8k"):
        run_training(config, overrides=overrides)
    Path(f"{other}.json").unlink()  # as if made by Megatron-LM
    with pytest.raises(InputError, match="beyond the vocabulary of 8000"):
        run_training(config, overrides=overrides)


def test_datasets_without_sidecars_train_alike_with_the_tokenizer_named(reference, tmp_path, spm_model):
    """Datasets made by Megatron-LM (no sidecar): the train config names the tokenizer, and the run is the
    one the same datasets with sidecars give."""
    from megadoc_megatron.blend.weights import Blend, BlendConfig, make_blend

    config, _, expected = reference
    blend = Blend.load(json.loads(Path(config).read_text())["data"]["blend"])
    copies = {}
    for dataset in [*blend.datasets, *[SimpleNamespace(prefix=p) for p in blend.validation_prefixes()]]:
        copies[dataset.prefix] = str(tmp_path / Path(dataset.prefix).name)
        for suffix in (".bin", ".idx"):
            shutil.copy(dataset.prefix + suffix, copies[dataset.prefix] + suffix)
    bare = make_blend(BlendConfig([copies[d.prefix] for d in blend.datasets if d.stream == "real"],
                                  [copies[d.prefix] for d in blend.datasets if d.stream == "synthetic"], 0.5, 1, 64, 8,
                                  str(tmp_path / "blend"), valid_data=[copies[p] for p in blend.validation_prefixes()]))
    overrides = [f"data.blend={bare.files.plan}", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    with pytest.raises(InputError, match="no sidecar naming its tokenizer"):
        run_training(config, overrides=overrides)
    run_training(config, overrides=[*overrides, "data.tokenizer_type=SentencePieceTokenizer",
                                    f"data.tokenizer_model={spm_model}"])
    losses = read_metrics(tmp_path / "ckpt")
    assert [losses[i]["loss"] for i in range(1, ITERS + 1)] == [expected[i]["loss"] for i in range(1, ITERS + 1)]


def test_a_tracker_naming_a_missing_checkpoint_names_the_repair(tmp_path):
    for iteration in (4, 8):
        checkpoint.iteration_dir(tmp_path, iteration).mkdir(parents=True)
    for named, fix in (("12", "write 8 into it to resume from iter_0000008"),
                       ("x", "write the iteration of the newest complete save into it (iter_ folders: 4, 8)")):
        (tmp_path / checkpoint.TRACKER).write_text(named + "\n")
        with pytest.raises(InputError, match="which is not a checkpoint here") as error:
            checkpoint.latest_iteration(tmp_path)
        assert fix in error.value.fix and "delete" not in error.value.fix


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
    with pytest.raises(InputError, match="optimizer.lr must be a number, not 'fast'"):
        load_config(config, ["optimizer.lr=fast"])
    # fields whose default is None are checked too: YAML reads 1e3 as text, which is read as a number
    assert load_config(config, ["train_iters=1e3"]).train_iters == 1000
    assert load_config(config, ["optimizer.lr=null"]).optimizer.lr == OptimizerConfig().lr  # null: the default
    for override, message in (("train_iters=2.5", "train_iters must be an integer, not 2.5"),
                              ("train_iters=abc", "train_iters must be an integer, not 'abc'"),
                              ("precision.fp8=5", "precision.fp8 must be a string, not 5"),
                              ("model.overrides={colour: 1}", "model.overrides.colour is not a field")):
        with pytest.raises(InputError, match=re.escape(message)) as error:
            load_config(config, [override])
        assert str(error.value).startswith(str(config))
    with pytest.raises(InputError, match="data.blend is not set"):
        load_config(config, ["data.blend="])
    (tmp_path / "bad.yaml").write_text("data:\n  blend: [unclosed\n")
    with pytest.raises(InputError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"data:\n  blend: caf\xe9.json\n")
    with pytest.raises(InputError, match=r"latin1.yaml:2: not UTF-8 text"):
        load_config(tmp_path / "latin1.yaml")
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


def documented_sbatch_launches():
    """Every `CONFIG=... sbatch ...` example in the comments of the shipped configs and scripts:
    (where, script, config, SET overrides, nodes)."""
    launches = []
    for source in sorted((REPO / "examples").rglob("*")):
        if source.suffix not in (".sbatch", ".yaml"):
            continue
        comment = "\n".join(line.lstrip("#").strip() for line in source.read_text().splitlines()
                            if line.startswith("#"))
        for command in comment.replace("\\\n", " ").splitlines():
            words = shlex.split(command) if "sbatch" in command and "CONFIG=" in command else []
            if words:
                assigned = dict(word.split("=", 1) for word in words[:words.index("sbatch")] if "=" in word)
                script = REPO / next(word for word in words if word.endswith(".sbatch"))
                nodes = words[words.index("--nodes") + 1] if "--nodes" in words else \
                    re.search(r"#SBATCH --nodes=(\d+)", script.read_text()).group(1)
                launches.append((source.name, script, REPO / assigned["CONFIG"], assigned.get("SET", "").split(),
                                 int(nodes)))
    return launches


def test_every_documented_launch_can_run_its_config(golden):
    """Each example launch of a shipped config: world size from the script (nodes x tasks per node,
    or torchrun's processes), global batch and sequence length from the experiment beside it."""
    from megadoc_megatron.config import merge_dicts
    from megadoc_megatron.experiment.config import load_experiment
    from megadoc_megatron.train.config import config_from_dict
    from megadoc_megatron.train.layout import launcher_world_size, plan_layout

    launches = documented_sbatch_launches()
    assert {(script.name, nodes) for _, script, *_, nodes in launches} >= {("train.sbatch", 1), ("train.sbatch", 2),
                                                                           ("train.sbatch", 4), ("run.sbatch", 1)}
    corpus = [f"corpus.{split}={golden / 'golden_input.jsonl'}" for split in ("train", "heldout")]  # not read here
    for where, script, config_path, overrides, nodes in launches:
        experiment = load_experiment(config_path.parent / "experiment.yaml",
                                     [*corpus, "launch.train=torchrun --standalone --nproc-per-node 8"])
        blend = experiment.blend
        if script.name == "train.sbatch":
            tasks = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", script.read_text()).group(1))
            config = load_config(config_path, ["logging.tensorboard_dir=", *overrides])
            plan_layout(config, nodes * tasks, blend.global_batch_size, blend.seq_length, where)
        else:  # run.sbatch: the experiment's recipes, trained by torchrun on the node's GPUs
            for recipe in experiment.recipes:
                config = config_from_dict(merge_dicts(experiment.train, recipe.train), config_path)
                plan_layout(config, launcher_world_size(experiment.launch.train), blend.global_batch_size,
                            blend.seq_length, where)


def test_a_launch_that_cannot_run_is_refused_before_it_starts(tmp_path, blend_json):
    from megadoc_megatron.cli import main
    from megadoc_megatron.train.layout import launcher_world_size

    config = write_config(tmp_path, blend_json, tmp_path / "ckpt")  # global batch 8 x 64 tokens, micro-batch 2
    assert main(["train", config, "--dry-run", "--world-size", "4"]) == 0
    with pytest.raises(InputError, match="8 processes cannot run this config: the global batch of 8 sequences does "
                                         "not split into micro-batches of 2 on 8 data-parallel.*Fix: set "
                                         "data.micro_batch_size to a divisor of 1"):
        run_training(config, LaunchEnvironment(0, 8, 0, "127.0.0.1", 1, "test"))  # no process group: refused before
    with pytest.raises(InputError, match="tensor 8 does not divide the 4 attention heads"):
        run_training(config, LaunchEnvironment(0, 8, 0, "127.0.0.1", 1, "test"), ["parallel.tensor=8"])
    with pytest.raises(InputError, match="2 layers do not split into pipeline 4"):
        run_training(config, LaunchEnvironment(0, 4, 0, "127.0.0.1", 1, "test"), ["parallel.pipeline=4"])
    with pytest.raises(InputError, match="interleaved schedule needs the 1 micro-batches per rank to be a multiple"):
        run_training(config, LaunchEnvironment(0, 2, 0, "127.0.0.1", 1, "test"),
                     ["parallel.pipeline=2", "parallel.virtual_pipeline=1", "data.micro_batch_size=8",
                      "model.overrides={num_layers: 4}"])
    assert launcher_world_size("torchrun --nnodes 2 --nproc-per-node=8") == 16
    assert launcher_world_size("") == 1 and launcher_world_size("torchrun --nproc-per-node gpu") is None


def test_memory_estimate_asks_for_recomputation_where_megatron_lm_would():
    """The 1.5B preset at micro-batch 8 x 4096 on 8 GPUs does not fit 80 GB; full recomputation or a
    micro-batch of 4 does (Llama-3 vocabulary)."""
    from megadoc_megatron.train.layout import memory_estimate_gb, plan_layout

    def estimate(*overrides):
        config = load_config(REPO / "examples" / "repro_300m" / "train.yaml",
                             ["logging.tensorboard_dir=", "model.preset=1.5B", *overrides])
        return memory_estimate_gb(config, plan_layout(config, 8, 64, 4096), 4096, 128256)

    assert estimate() > 80 > estimate("model.recompute=full") and estimate("data.micro_batch_size=4") < 80


MEMORY_CASES = [  # (preset, sequence length, micro-batch, micro-batches, BF16, vocabulary, settings)
    ("tiny", 256, 2, 1, True, 4096, []), ("tiny", 512, 1, 2, True, 32000, []), ("tiny", 256, 2, 1, False, 4096, []),
    ("150M", 256, 1, 1, True, 4096, ["model.overrides={num_layers: 2}"]),  # BF16 matrix products are slow on CPU
    ("150M", 512, 2, 1, False, 4096, []), ("150M", 512, 1, 2, False, 4096, [])]


def memory_config(preset: str, micro: int, bf16: bool, settings: list):
    return load_config(REPO / "examples" / "repro_300m" / "train.yaml", [
        "logging.tensorboard_dir=", f"model.preset={preset}", "model.backend=portable", f"precision.bf16={bf16}",
        f"data.micro_batch_size={micro}", *settings])


def storage_bytes(tensors) -> dict[int, int]:
    """Bytes of the distinct storages of `tensors`, by address (scalars such as Adam's step count left out)."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None and t.dim()}


class SavedForBackward:
    """saved_tensors_hooks counting the bytes of the distinct storages autograd keeps for backward
    (the parameters' left out), now and at the most. A storage counts until the last tensor saved
    on it is freed (a finalizer), so the peak is the schedule's: the micro-batches it has in flight."""

    def __init__(self, parameters):
        self.parameters = set(storage_bytes(parameters))
        self.live, self.now, self.peak = {}, 0, 0  # live: address -> [bytes, saved tensors on it]

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address in self.parameters:
            return tensor
        if address not in self.live:
            self.live[address] = [storage.nbytes(), 0]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        self.live[address][1] += 1
        weakref.finalize(tensor, self._release, address)
        return tensor

    def _release(self, address):
        entry = self.live[address]
        entry[1] -= 1
        if not entry[1]:
            del self.live[address]
            self.now -= entry[0]


def states_kept(engine) -> dict[int, int]:
    """Storages of the parameters, FP32 main gradients, master weights and Adam moments: the
    portable engine's masters (their .grad the main gradients), or megatron-core's DDP buffers
    (main_grad) and its (distributed) optimizer's shards."""
    params = [p for chunk in engine.chunks for p in chunk.parameters()]
    adams = engine.optimizer._torch_adams() if engine.name == "megatron" else [engine.optimizer.optimizer]
    tensors = params + [getattr(p, "main_grad", None) for p in params]
    for adam in adams:
        for master in (master for group in adam.param_groups for master in group["params"]):
            tensors += [master, master.grad, *adam.state[master].values()]
    return storage_bytes(tensors)


def saved_for_backward_and_states(config, vocab: int, seq_length: int, micro_batches: int) -> int:
    """Ground truth on CPU, for this rank: the most bytes of distinct storages that autograd keeps
    saved at once during one step of the config's engine (the portable engine's GPipe keeps every
    micro-batch until the backward pass, megatron-core's 1F1B those in flight), plus those of the
    parameters, main gradients and optimizer state after the update."""
    from megadoc_megatron.model.build import build_model
    from megadoc_megatron.train.engines import build_engine, resolve_engine
    from megadoc_megatron.train.engines.cuda_on_cpu import megatron_core_on_cpu
    from megadoc_megatron.train.trainer import forward_step

    cpu = torch.device("cpu")
    name, micro = resolve_engine(config.engine, cpu), config.data.micro_batch_size
    with megatron_core_on_cpu() if name == "megatron" else contextlib.nullcontext():
        model_config, chunks, _ = build_model(config, vocab, seq_length, cpu, name)
        engine = build_engine(name, chunks, model_config, config, "portable")
        generator = torch.Generator().manual_seed(0)
        batches = [{"tokens": torch.randint(0, vocab, (micro, seq_length), generator=generator),
                    "labels": torch.randint(0, vocab, (micro, seq_length), generator=generator),
                    "loss_mask": torch.ones(micro, seq_length),
                    "position_ids": torch.arange(seq_length).expand(micro, -1)} for _ in range(micro_batches)]
        per_chunk = [iter(batches) for _ in chunks]  # the interleaved schedule reads one iterator per model chunk
        saved = SavedForBackward(p for chunk in chunks for p in chunk.parameters())
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
            engine.forward_backward(forward_step_func=lambda data, model: forward_step(data, model, cpu),
                                    data_iterator=per_chunk[0] if len(chunks) == 1 else per_chunk,
                                    model=engine.model, num_microbatches=micro_batches, seq_length=seq_length,
                                    micro_batch_size=micro)
        engine.optimizer.step()
        return saved.peak + sum(states_kept(engine).values())


def print_memory_error(label: str, measured: int, estimate: float, capsys) -> float:
    error = estimate / measured - 1
    with capsys.disabled():
        print(f"\n{label}: measured {measured / 2 ** 20:.1f} MiB, estimate {estimate / 2 ** 20:.1f} MiB, "
              f"error {error:+.1%}")
    return error


@pytest.mark.parametrize("preset, seq_length, micro, micro_batches, bf16, vocab, settings", MEMORY_CASES)
def test_memory_estimate_is_within_10_percent_of_what_autograd_saves(preset, seq_length, micro, micro_batches,
                                                                     bf16, vocab, settings, capsys):
    """TP = PP = DP = 1 and no recomputation (megatron-core's checkpointing needs CUDA's RNG tracker)
    only; the estimate's kept terms (everything but the GPU's transient peaks)."""
    from megadoc_megatron.distributed import single_process
    from megadoc_megatron.train.layout import memory_estimate, plan_layout

    config = memory_config(preset, micro, bf16, settings)
    layout = plan_layout(config, 1, micro * micro_batches, seq_length)
    torch.manual_seed(0)
    with single_process():
        measured = saved_for_backward_and_states(config, vocab, seq_length, micro_batches)
    estimate = memory_estimate(config, layout, seq_length, vocab, "cpu")
    label = (f"{preset} seq {seq_length} x micro {micro} x {micro_batches} {'bf16' if bf16 else 'fp32'} vocab "
             f"{vocab} {' '.join(settings)}")
    assert abs(print_memory_error(label, measured, estimate.kept, capsys)) < 0.10


TWO_PROCESS_MEMORY_CASES = {  # name: (sequence length, micro-batch, micro-batches per rank, BF16, settings)
    "TP2": (512, 1, 2, True, ["parallel.tensor=2"]),
    "TP2 megatron": (256, 2, 1, False, ["parallel.tensor=2", "engine=megatron"]),
    "PP2 GPipe": (256, 1, 4, False, ["parallel.pipeline=2"]),
    "PP2 1F1B": (512, 1, 4, True, ["parallel.pipeline=2", "engine=megatron"]),
    "PP2 x VP2 interleaved": (512, 1, 4, True, ["parallel.pipeline=2", "parallel.virtual_pipeline=2",
                                                "engine=megatron", "model.overrides={num_layers: 4}"]),
    "PP2 x VP2, all in warm-up": (512, 1, 2, True, ["parallel.pipeline=2", "parallel.virtual_pipeline=2",
                                                     "engine=megatron", "model.overrides={num_layers: 4}"]),
    "DP2 distributed optimizer": (256, 2, 1, True, ["engine=megatron"]),
}
TWO_PROCESS_VOCAB = 1024  # small beside the layers' activations, which the schedules keep


def _measure_memory_cases(rank, port, out_dir):
    from megatron.core import parallel_state

    from megadoc_megatron.distributed import initialize, shutdown

    launch, measured = LaunchEnvironment(rank, 2, rank, "127.0.0.1", port, "test"), {}
    try:
        for name, (seq_length, micro, micro_batches, bf16, settings) in TWO_PROCESS_MEMORY_CASES.items():
            config = memory_config("tiny", micro, bf16, settings)
            initialize(config.parallel, launch)  # the process group stays, the model-parallel groups are new
            torch.manual_seed(0)
            stage = (parallel_state.is_pipeline_first_stage(ignore_virtual=True),
                     parallel_state.is_pipeline_last_stage(ignore_virtual=True))
            measured[name] = [stage, saved_for_backward_and_states(config, TWO_PROCESS_VOCAB, seq_length,
                                                                   micro_batches)]
            parallel_state.destroy_model_parallel()
    finally:
        shutdown()
    (out_dir / f"{rank}.json").write_text(json.dumps(measured))


@pytest.fixture(scope="module")
def two_process_memory(tmp_path_factory) -> list[dict]:
    """Per rank, each case's (first stage, last stage) and measured bytes: all cases in one pair of processes."""
    out_dir = tmp_path_factory.mktemp("memory")
    torch.multiprocessing.spawn(_measure_memory_cases, args=(free_port(), out_dir), nprocs=2, join=True)
    return [json.loads((out_dir / f"{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("case", TWO_PROCESS_MEMORY_CASES)
def test_memory_estimate_of_each_rank_is_within_10_percent_of_what_autograd_saves(case, two_process_memory,
                                                                                  capsys):
    """Tensor, pipeline and data parallelism on two gloo processes (tiny preset, both engines), each
    rank against its own pipeline stage's estimate; under pipelining the saved bytes are counted at
    the schedule's peak. Sequence parallelism is not measured: megatron-core refuses it with the
    portable layers (WrappedTorchNorm), the only ones that run on CPU."""
    from megadoc_megatron.train.layout import memory_estimates_by_stage, plan_layout

    seq_length, micro, micro_batches, bf16, settings = TWO_PROCESS_MEMORY_CASES[case]
    config = memory_config("tiny", micro, bf16, settings)
    data = 2 // (config.parallel.tensor * config.parallel.pipeline)
    layout = plan_layout(config, 2, micro * micro_batches * data, seq_length)
    estimates = memory_estimates_by_stage(config, layout, seq_length, TWO_PROCESS_VOCAB, "cpu")
    errors = []
    for rank, results in enumerate(two_process_memory):
        (first, last), measured = results[case]
        stage = "first and last" if first and last else "first" if first else "last"
        label = (f"{case} rank {rank} ({stage} stage) seq {seq_length} x micro {micro} x "
                 f"{micro_batches} {'bf16' if bf16 else 'fp32'}")
        errors.append(print_memory_error(label, measured, estimates[first, last].kept, capsys))
    assert max(map(abs, errors)) < 0.10


def test_paper_config_is_valid():
    config = load_config(REPO / "examples" / "repro_300m" / "train.yaml", ["logging.tensorboard_dir="])
    assert (config.model.preset, config.precision.bf16, config.optimizer.min_lr) == ("300M", True, 0.0)


def test_the_command_line_loads_without_torch():
    """Every `megadoc` command builds the full parser: training's heavy imports wait for `run`."""
    code = ("import sys, megadoc_megatron.cli as c; c.build_parser(); "
            "print(sorted({'torch', 'megatron'} & set(sys.modules)))")
    printed = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert printed.strip() == "[]"


def plan_300m(*overrides, world_size=8, seq_length=4096):
    from megadoc_megatron.train.layout import plan_layout

    config = load_config(REPO / "examples" / "repro_300m" / "train.yaml", ["logging.tensorboard_dir=", *overrides])
    return plan_layout(config, world_size, 64, seq_length)


@pytest.mark.parametrize("backend,te_installed,refused", [("portable", True, True), ("auto", False, True),
                                                          ("auto", True, False), ("te", True, False)])
def test_sequence_parallel_is_refused_where_the_portable_layers_would_run(monkeypatch, backend, te_installed,
                                                                          refused):
    """megatron-core's portable norm (WrappedTorchNorm) asserts `not sequence_parallel`, and `auto`
    picks the portable layers wherever Transformer Engine does not import."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: (
        (object() if te_installed else None) if name == "transformer_engine" else find_spec(name, *args)))
    overrides = [f"model.backend={backend}", "parallel.tensor=2", "parallel.sequence_parallel=true"]
    if not refused:
        assert plan_300m(*overrides).tensor == 2
        return
    with pytest.raises(InputError, match=r"sequence parallelism needs the Transformer Engine layers.*Fix: install "
                                         r"Transformer Engine.*or unset parallel.sequence_parallel"):
        plan_300m(*overrides)


def test_fp8_shapes_are_checked_before_launch():
    """FP8 GEMMs need the tokens of a micro-batch (per tensor rank under sequence parallelism) a
    multiple of 8 and the hidden and feed-forward sizes multiples of 16."""
    fp8 = ["model.backend=te", "precision.fp8=hybrid"]
    assert plan_300m(*fp8, "data.micro_batch_size=1", seq_length=4104).micro_batch_size == 1
    with pytest.raises(InputError, match=r"FP8 needs the tokens of a micro-batch \(1 x 4099 = 4099\) to be a "
                                         r"multiple of 8.*Fix:"):
        plan_300m(*fp8, "data.micro_batch_size=1", seq_length=4099)
    with pytest.raises(InputError, match=r"\(1 x 4104 / tensor 2 = 2052\) to be a multiple of 8"):
        plan_300m(*fp8, "data.micro_batch_size=1", "parallel.tensor=2", "parallel.sequence_parallel=true",
                  seq_length=4104)
    with pytest.raises(InputError, match=r"FP8 needs the hidden size \(776\) and the feed-forward size per tensor "
                                         r"rank \(2688 / 1\) to be multiples of 16.*Fix:"):
        plan_300m(*fp8, "model.overrides={hidden_size: 776}")
    with pytest.raises(InputError, match=r"feed-forward size per tensor rank \(2696 / 1\)"):
        plan_300m(*fp8, "model.overrides={ffn_hidden_size: 2696}")
    assert plan_300m("model.overrides={ffn_hidden_size: 2696}").data == 8  # BF16 has no such rule


class FirstMicrobatchFlag(torch.nn.Linear):
    """Transformer Engine's side of the FP8 weight cache, without TE: each forward reads
    `is_first_microbatch` (True: quantize the weights afresh) and clears it."""

    def __init__(self):
        super().__init__(4, 4)
        self.is_first_microbatch, self.seen = True, []

    def forward(self, tokens):
        self.seen.append(self.is_first_microbatch)
        self.is_first_microbatch = False
        return super().forward(tokens)


class Fp8Chunk(MegatronModule):
    """A model chunk of an FP8 run (megatron-core's MegatronModule, whose set_is_first_microbatch
    flags every module that has the attribute) with one stand-in TE layer."""

    def __init__(self):
        super().__init__(SimpleNamespace(fp8="hybrid", fp4=None, sequence_parallel=False, hidden_size=4,
                                         pipeline_dtype=None, params_dtype=torch.float32))
        self.layer = FirstMicrobatchFlag()

    def set_input_tensor(self, tensor):
        pass

    def forward(self, tokens, position_ids=None, attention_mask=None, labels=None):
        return self.layer(tokens)


def mean_loss(output):
    return output.mean(), {"lm loss": output.detach().mean()}


def test_the_portable_engine_has_fp8_weights_requantized_at_every_step():
    """TE reuses a layer's FP8 weights until a micro-batch is flagged first; megatron-core's schedules
    flag the first of each step. Without it an FP8 run would train on the first step's weights."""
    from megadoc_megatron.distributed import single_process
    from megadoc_megatron.train.config import TrainConfig
    from megadoc_megatron.train.engines.plain_torch import torch_engine

    chunk = Fp8Chunk()
    with single_process():
        engine = torch_engine([chunk], TrainConfig(), "te")
        for forward_only in (False, False, True):
            engine.forward_backward(forward_step_func=lambda data, model: (model(next(data)), mean_loss),
                                    data_iterator=iter(torch.randn(3, 2, 1, 4)), model=engine.model,
                                    num_microbatches=3, seq_length=2, micro_batch_size=1, forward_only=forward_only)
    assert chunk.layer.seen == [True, False, False] * 3


def test_the_benchmarks_bare_step_has_fp8_weights_requantized_at_every_step(monkeypatch):
    from megadoc_megatron.distributed import single_process
    from megadoc_megatron.train.config import TrainConfig
    from megadoc_megatron.train.engines.plain_torch import torch_engine

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from train_step import bare_step

    chunk = Fp8Chunk()
    batches = [{"tokens": torch.randn(2, 1, 4), "position_ids": None, "labels": None} for _ in range(3)]
    with single_process():
        trainer = SimpleNamespace(engine=torch_engine([chunk], TrainConfig(), "te"))
        bare_step(trainer, batches)
        bare_step(trainer, batches)
    assert chunk.layer.seen == [True, False, False] * 2
