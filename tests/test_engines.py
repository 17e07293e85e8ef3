"""megatron-core's GPU training engine, run on CPU (`megatron_core_on_cpu`): DistributedDataParallel,
the distributed optimizer with overlapped gradient reduce-scatter and parameter all-gather, the
no-pipelining and 1F1B schedules, finalize_model_grads. It must train exactly like the portable
engine, log the true loss whatever the micro-batch count, skip updates with non-finite gradients,
and save checkpoints that resume under other layouts."""

import json
import math
import shutil
import sys
import types

import pytest
import torch
from conftest import ITERS, SAVE_AT, run_training, write_config

from megadoc_megatron.distributed import LaunchEnvironment, free_port
from megadoc_megatron.errors import InputError
from megadoc_megatron.train import checkpoint
from megadoc_megatron.train.config import ModelConfig, ParallelConfig, PrecisionConfig, TrainConfig
from megadoc_megatron.train.faults import nan_loss_at


def metrics(checkpoint_dir) -> tuple[dict[int, dict], dict[int, float]]:
    """(training rows by iteration, validation losses by iteration) of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (checkpoint_dir / "metrics.jsonl").read_text().splitlines()]
    return ({row["iteration"]: row for row in rows if "loss" in row},
            {row["iteration"]: row["valid_loss"] for row in rows if "valid_loss" in row})


def train_run(tmp_path, blend_json, name: str, *overrides: str):
    target = tmp_path / name
    run_training(write_config(tmp_path, blend_json, target), overrides=list(overrides))
    return target, *metrics(target)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, blend_json):
    """One uninterrupted run per engine: 4 micro-batches of 2 per iteration, FP32."""
    tmp = tmp_path_factory.mktemp("engines")
    return {engine: train_run(tmp, blend_json, engine, f"engine={engine}") for engine in ("megatron", "portable")}


def test_megatron_core_engine_trains_like_the_portable_engine(runs):
    _, megatron, megatron_valid = runs["megatron"]
    _, portable, portable_valid = runs["portable"]
    assert sorted(megatron) == sorted(portable) == list(range(1, ITERS + 1))
    for step in portable:
        assert megatron[step]["loss"] == pytest.approx(portable[step]["loss"], rel=1e-6)
        assert megatron[step]["lr"] == portable[step]["lr"]
        # megatron-core's norm without apex/TE is torch.norm, which on CPU is off by ~1e-4 (the
        # gradients themselves are bit-identical); the portable engine sums squares.
        assert megatron[step]["grad_norm"] == pytest.approx(portable[step]["grad_norm"], rel=1e-3)
    assert megatron_valid == pytest.approx(portable_valid, rel=1e-6)
    assert megatron[1]["warmup"] and not any(megatron[step]["warmup"] for step in range(2, ITERS + 1))


def test_logged_loss_does_not_depend_on_the_micro_batch_count(runs, tmp_path, blend_json):
    """megatron-core's schedule divides the loss it is given by the micro-batch count, in place."""
    _, four, four_valid = runs["megatron"]
    _, one, one_valid = train_run(tmp_path, blend_json, "one", "engine=megatron", "data.micro_batch_size=8")
    for step in four:
        assert one[step]["loss"] == pytest.approx(four[step]["loss"], rel=1e-5)
    assert one_valid == pytest.approx(four_valid, rel=1e-5)


def test_document_masking_trains_alike_on_both_engines(runs, tmp_path, blend_json):
    """data.reset_attention_mask: each micro-batch goes in as one packed row with document bounds."""
    _, unmasked, _ = runs["portable"]
    _, megatron, megatron_valid = train_run(tmp_path, blend_json, "megatron", "engine=megatron",
                                            "data.reset_attention_mask=true")
    _, portable, portable_valid = train_run(tmp_path, blend_json, "portable", "engine=portable",
                                            "data.reset_attention_mask=true")
    for step in portable:
        assert megatron[step]["loss"] == pytest.approx(portable[step]["loss"], rel=1e-5)
    assert megatron_valid == pytest.approx(portable_valid, rel=1e-5)
    assert any(abs(portable[step]["loss"] - unmasked[step]["loss"]) > 1e-4 for step in portable)  # masks matter


@pytest.mark.parametrize("engine", ["megatron", "portable"])
def test_non_finite_gradients_skip_the_update(engine, runs, tmp_path, blend_json):
    _, reference, _ = runs[engine]
    with nan_loss_at({3}):
        target, rows, valid = train_run(tmp_path, blend_json, "nan", f"engine={engine}")
    assert math.isnan(rows[3]["grad_norm"]) and (rows[3]["skipped"], rows[3]["skipped_total"]) == (1, 1)
    assert rows[4]["lr"] == reference[3]["lr"]  # the schedule did not advance either
    assert all(math.isfinite(rows[step]["loss"]) for step in rows if step != 3)
    assert all(math.isfinite(loss) for loss in valid.values())
    assert rows[ITERS]["skipped_total"] == 1

    with nan_loss_at(set(range(1, ITERS + 1))), pytest.raises(InputError, match="training diverged: "
                                                                                  "the last 3 updates"):
        train_run(tmp_path, blend_json, "diverged", f"engine={engine}", "optimizer.max_skipped_in_a_row=3")
    rows, _ = metrics(tmp_path / "diverged")
    assert rows[3]["skipped_total"] == 3 and max(rows) == 3


def _rank(rank, port, config, overrides, world_size=2):
    run_training(config, LaunchEnvironment(rank, world_size, rank, "127.0.0.1", port, "test"), overrides)


def resume_copy(source, tmp_path):
    """A checkpoint folder holding only iteration SAVE_AT of source."""
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint.iteration_dir(source, SAVE_AT), checkpoint.iteration_dir(target, SAVE_AT))
    (target / checkpoint.TRACKER).write_text(f"{SAVE_AT}\n")
    return target


@pytest.fixture(scope="module")
def reshardable_run(tmp_path_factory, blend_json):
    """The megatron-core run again, its distributed-optimizer state saved in model space."""
    tmp = tmp_path_factory.mktemp("reshardable")
    return train_run(tmp, blend_json, "run", "engine=megatron", "checkpoint.reshardable_optimizer=true")


@pytest.mark.parametrize("layout", ["parallel.tensor=2", "parallel.pipeline=2", "data.micro_batch_size=2"],
                         ids=["TP2", "PP2", "DP2"])
@pytest.mark.e2e
def test_megatron_core_engine_layouts_continue_the_single_process_run(request, runs, tmp_path, blend_json, layout):
    """Two gloo processes resume the single-process checkpoint and match its losses: tensor parallel
    or the 1F1B schedule (from model-space optimizer state), or the distributed optimizer sharded
    over two data-parallel ranks (from its bucket-space state) with overlapped reduce-scatter and
    all-gather, validated and saved after parameter all-gathers the next forward would finish."""
    data_parallel = layout.startswith("data")
    source, expected, expected_valid = runs["megatron"] if data_parallel else request.getfixturevalue("reshardable_run")
    target = resume_copy(source, tmp_path)
    config = write_config(tmp_path, blend_json, target)
    torch.multiprocessing.spawn(_rank, args=(free_port(), config, ["engine=megatron", layout]), nprocs=2, join=True)
    assert_continues(target, expected, expected_valid)


def assert_continues(target, expected, expected_valid) -> None:
    """The resumed iterations of a run log the uninterrupted run's losses, gradient norms and validation."""
    resumed, valid = metrics(target)
    assert sorted(resumed) == list(range(SAVE_AT + 1, ITERS + 1))
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5)
        assert resumed[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-3)
    assert valid[ITERS] == pytest.approx(expected_valid[ITERS], rel=1e-5)


FOUR_LAYERS = "model.overrides={num_layers: 4}"  # pipeline 2 x virtual 2 stages of one layer


@pytest.fixture(scope="module")
def four_layer_run(tmp_path_factory, blend_json):
    """The megatron-core engine on one process with four layers, its optimizer state in model space."""
    tmp = tmp_path_factory.mktemp("four_layers")
    return train_run(tmp, blend_json, "run", "engine=megatron", FOUR_LAYERS, "checkpoint.reshardable_optimizer=true")


@pytest.mark.e2e
@pytest.mark.slow
def test_interleaved_pipeline_of_two_stages_continues_the_single_process_run(four_layer_run, tmp_path, blend_json):
    """Pipeline 2 x virtual 2 x data 2 (four gloo processes), 4 micro-batches of 1 per rank (the
    steady state, where sends go both ways at once). With two stages a rank's previous and next
    stage are the same peer: megatron-core's default batched sends hand over the wrong tensors,
    where Megatron-LM's overlapped ones do not; the schedule starts each chunk's gradient reduction
    and parameter gathers (grad_sync_func, param_sync_func)."""
    source, expected, expected_valid = four_layer_run
    target = resume_copy(source, tmp_path)
    config = write_config(tmp_path, blend_json, target)
    overrides = ["engine=megatron", FOUR_LAYERS, "parallel.pipeline=2", "parallel.virtual_pipeline=2",
                 "data.micro_batch_size=1"]
    torch.multiprocessing.spawn(_rank, args=(free_port(), config, overrides, 4), nprocs=4, join=True)
    assert_continues(target, expected, expected_valid)


def _interleaved_engine_hooks(rank, port):
    from megadoc_megatron.distributed import initialize, shutdown
    from megadoc_megatron.model.build import build_model
    from megadoc_megatron.train.engines import build_engine
    from megadoc_megatron.train.engines.cuda_on_cpu import megatron_core_on_cpu

    config = TrainConfig(model=ModelConfig(backend="portable", overrides={"num_layers": 4}),
                         parallel=ParallelConfig(pipeline=2, virtual_pipeline=2), engine="megatron")
    device = initialize(config.parallel, LaunchEnvironment(rank, 2, rank, "127.0.0.1", port, "test"))
    try:
        with megatron_core_on_cpu():
            model_config, chunks, _ = build_model(config, 256, 32, device, "megatron")
            model = build_engine("megatron", chunks, model_config, config, "portable").model
        assert (model_config.overlap_p2p_comm, model_config.batch_p2p_comm) == (True, False)
        assert model_config.no_sync_func == [chunk.no_sync for chunk in model]
        assert model_config.grad_sync_func == [chunk.start_grad_sync for chunk in model]
        assert model_config.param_sync_func == [chunk.start_param_sync for chunk in model]
        assert all(chunk.ddp_config.align_param_gather for chunk in model)
    finally:
        shutdown()


def test_megatron_lms_schedule_hooks_under_interleaving():
    """As Megatron-LM's training.py: under interleaving the schedule starts each model chunk's
    gradient reduction when its last backward is done, and its parameter all-gather."""
    torch.multiprocessing.spawn(_interleaved_engine_hooks, args=(free_port(),), nprocs=2, join=True)


@pytest.mark.parametrize("overrides,refused", [({}, False), ({"overlap_p2p_comm": False}, True)])
def test_interleaved_pipeline_of_two_stages_needs_overlapped_sends(overrides, refused):
    from megadoc_megatron.train.layout import plan_layout

    config = TrainConfig(model=ModelConfig(overrides={"num_layers": 4, **overrides}),
                         parallel=ParallelConfig(pipeline=2, virtual_pipeline=2))
    if not refused:
        assert plan_layout(config, 2, 8, 64).num_microbatches == 8
        return
    with pytest.raises(InputError, match=r"interleaved schedule with pipeline 2 needs overlapped point-to-point "
                                         r".*Fix: .*overlap_p2p_comm"):
        plan_layout(config, 2, 8, 64)
    assert plan_layout(TrainConfig(model=config.model, parallel=ParallelConfig(pipeline=4, virtual_pipeline=1)),
                       4, 8, 64).pipeline == 4  # more than two stages: distinct peers, batching is safe


@pytest.mark.e2e
def test_optimizer_state_that_cannot_be_taken_is_refused_on_resume(runs, tmp_path, blend_json):
    source, expected, _ = runs["megatron"]
    config = write_config(tmp_path, blend_json, resume_copy(source, tmp_path))
    with pytest.raises(InputError, match="kept by megatron-core's distributed optimizer, "
                                         "this run's is kept by portable"):
        run_training(config, overrides=["engine=portable"])
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="laid out for tensor 1 x pipeline 1 ranks, "
                                                                           "this run has tensor 2 x pipeline 1"):
        torch.multiprocessing.spawn(_rank, args=(free_port(), config, ["engine=megatron", "parallel.tensor=2"]),
                                    nprocs=2, join=True)


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, blend_json):
    """One run per engine in BF16 (with FP32 master weights)."""
    tmp = tmp_path_factory.mktemp("bf16")
    return {engine: train_run(tmp, blend_json, engine, f"engine={engine}", "precision.bf16=true")
            for engine in ("megatron", "portable")}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("engines", [("megatron", "portable"), ("portable", "megatron")],
                         ids=["to-portable", "to-megatron"])
def test_a_new_run_starts_from_the_other_engines_weights(engines, precision, request, tmp_path, blend_json, capsys):
    saved_by, engine = engines
    source, expected, _ = request.getfixturevalue("runs" if precision == "fp32" else "bf16_runs")[saved_by]
    overrides = [f"engine={engine}", f"checkpoint.init_from={source}", "train_iters=3"]
    result = run_training(write_config(tmp_path, blend_json, tmp_path / "next"),
                          overrides=overrides + (["precision.bf16=true"] if precision == "bf16" else []))
    assert result["iterations"] == 3
    assert "(its optimizer state is not taken: its optimizer state was kept by" in capsys.readouterr().out
    first, _ = metrics(tmp_path / "next")
    # the trained weights, after the first update too: a BF16 run's FP32 master weights start from them
    assert all(first[step]["loss"] < expected[step]["loss"] - 0.3 for step in first)


def test_megatron_lms_fast_paths_where_they_apply(monkeypatch):
    from megadoc_megatron.distributed import one_cuda_connection
    from megadoc_megatron.model.build import fast_paths, recompute_settings
    from megadoc_megatron.train.metrics import device_peak_tflops

    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda", types.ModuleType("apex stand-in"))
    assert fast_paths("megatron", "te", "cuda", True) == {"gradient_accumulation_fusion": True,
                                                          "deallocate_pipeline_outputs": True,
                                                          "cross_entropy_loss_fusion": True}
    # the portable engine has no FP32 gradient buffers to fuse into
    assert fast_paths("portable", "te", "cuda", True)["gradient_accumulation_fusion"] is False
    # on CPU gloo may still be sending the activations the schedule would free
    assert not any(fast_paths("megatron", "portable", "cpu", True)[k] for k in ("gradient_accumulation_fusion",
                                                                               "cross_entropy_loss_fusion",
                                                                               "deallocate_pipeline_outputs"))
    assert recompute_settings("full") == {"recompute_granularity": "full", "recompute_method": "uniform",
                                          "recompute_num_layers": 1}
    env = {}
    one_cuda_connection(TrainConfig(parallel=ParallelConfig(tensor=2)).parallel, env)
    assert env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    with pytest.raises(InputError, match="CUDA_DEVICE_MAX_CONNECTIONS is 8; tensor parallelism .2. needs 1"):
        one_cuda_connection(TrainConfig(parallel=ParallelConfig(tensor=2)).parallel,
                            {"CUDA_DEVICE_MAX_CONNECTIONS": "8"})
    assert [device_peak_tflops(name, None) for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
                                                        "NVIDIA H200", "NVIDIA GH200 480GB", "NVIDIA B200")] == \
        [989.0, 756.0, 835.0, 989.0, 989.0, 2250.0]
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", "hybrid") == 1979.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB", "hybrid") is None  # no FP8 on Ampere


def built_transformer_config(engine: str, backend: str, device_type: str, precision: PrecisionConfig):
    from megadoc_megatron.model.build import model_transformer_config

    # megatron-core checks the TE backend's fused RoPE against an installed TE: off, to build it without TE
    overrides = {"apply_rope_fusion": False} if backend == "te" else {}
    config = TrainConfig(model=ModelConfig(overrides=overrides), precision=precision)
    return model_transformer_config(config, backend, engine, device_type)


@pytest.mark.parametrize("apex", [False, True])
def test_gradient_accumulation_fusion_only_where_apex_provides_its_kernel(monkeypatch, apex):
    """megatron-core's own output layer (ColumnParallelLinear) raises under the flag when apex's
    fused_weight_gradient_mlp_cuda does not import; the gpu extra installs TE without apex."""
    kernel = types.ModuleType("fused_weight_gradient_mlp_cuda") if apex else None  # None: the import fails
    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda", kernel)
    config = built_transformer_config("megatron", "te", "cuda", PrecisionConfig(bf16=True))
    assert config.gradient_accumulation_fusion is apex


@pytest.mark.parametrize("backend,precision,fused", [("portable", PrecisionConfig(), False),
                                                     ("portable", PrecisionConfig(bf16=True), True),
                                                     ("te", PrecisionConfig(fp8="hybrid"), True)],
                         ids=["fp32", "bf16", "fp8"])
def test_fused_cross_entropy_only_where_its_bf16_gradient_is_the_runs_precision(backend, precision, fused):
    """megatron-core's native fused cross entropy casts its gradient to BF16: wrong for an FP32 run."""
    assert built_transformer_config("megatron", backend, "cuda", precision).cross_entropy_loss_fusion is fused


BF16 = TrainConfig(precision=PrecisionConfig(bf16=True), model=ModelConfig(backend="portable"))
VOCAB, SEQ = 256, 32


def built_engine(name: str, config: TrainConfig = BF16):
    from megadoc_megatron.model.build import build_model
    from megadoc_megatron.train.engines import build_engine

    model_config, chunks, _ = build_model(config, VOCAB, SEQ, torch.device("cpu"), name)
    return build_engine(name, chunks, model_config, config, "portable")


def random_batches(count: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (count, 2, SEQ + 1), generator=generator)
    return [{"tokens": row[:, :-1], "labels": row[:, 1:], "loss_mask": torch.ones(2, SEQ),
             "position_ids": torch.arange(SEQ).expand(2, -1)} for row in tokens]


def run_step(engine, batches: list[dict]) -> None:
    from functools import partial

    from megadoc_megatron.train.trainer import forward_step

    engine.forward_backward(forward_step_func=partial(forward_step, device=torch.device("cpu")),
                            data_iterator=iter(batches), model=engine.model, num_microbatches=len(batches),
                            seq_length=SEQ, micro_batch_size=2)


def test_both_engines_train_the_same_bf16_model_with_fp32_main_gradients():
    """megatron-core's engine casts every parameter to BF16 (Float16Module: the norms too) and
    accumulates micro-batch gradients in FP32 (grad_reduce_in_fp32); so must the portable one."""
    from megadoc_megatron.distributed import single_process
    from megadoc_megatron.train.engines.cuda_on_cpu import megatron_core_on_cpu

    batches = random_batches(4)
    with single_process():
        portable = built_engine("portable")
        with megatron_core_on_cpu():
            megatron = built_engine("megatron")
            megatron.chunks[0].load_state_dict(portable.chunks[0].state_dict())
            run_step(megatron, batches)
        run_step(portable, batches)
    portable_params = dict(portable.chunks[0].named_parameters())
    megatron_params = dict(megatron.chunks[0].named_parameters())
    assert {name: p.dtype for name, p in portable_params.items()} == \
        {name: p.dtype for name, p in megatron_params.items()}
    assert {p.dtype for p in portable_params.values()} == {torch.bfloat16}
    for name, param in portable_params.items():
        assert param.grad is None and param.master.grad.dtype == torch.float32, name
        torch.testing.assert_close(param.master.grad, megatron_params[name].main_grad, rtol=0.02, atol=1e-5)


def _data_parallel_bf16_gradients(rank, port):
    from unittest import mock

    import torch.distributed as dist
    from megatron.core import parallel_state

    from megadoc_megatron.distributed import initialize, shutdown

    initialize(BF16.parallel, LaunchEnvironment(rank, 2, rank, "127.0.0.1", port, "test"))
    try:
        torch.manual_seed(0)
        engine = built_engine("portable")
        reduced, all_reduce, data_parallel = [], dist.all_reduce, parallel_state.get_data_parallel_group()
        with mock.patch.object(dist, "all_reduce", lambda tensor, *args, group=None, **kwargs: (
                reduced.append(tensor.dtype) if group is data_parallel else None,
                all_reduce(tensor, *args, group=group, **kwargs))[1]):
            run_step(engine, random_batches(2, seed=rank))
        assert reduced == [torch.float32]
        main_grads = torch.cat([p.master.grad.reshape(-1) for p in engine.chunks[0].parameters()])
        both = [torch.empty_like(main_grads) for _ in range(2)]
        dist.all_gather(both, main_grads)
        assert torch.equal(*both)
    finally:
        shutdown()


def test_the_portable_engine_reduces_data_parallel_gradients_in_fp32():
    torch.multiprocessing.spawn(_data_parallel_bf16_gradients, args=(free_port(),), nprocs=2, join=True)
