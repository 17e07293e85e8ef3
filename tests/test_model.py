"""The Llama-style GPT on megatron-core: portable attention, causality, learning, presets, TP=2 == TP=1."""

import json
import math

import pytest
import torch
import torch.distributed as dist

from megadoc_megatron.distributed import LaunchEnvironment, free_port, initialize, shutdown, single_process
from megadoc_megatron.errors import InputError
from megadoc_megatron.model.build import placed
from megadoc_megatron.model.gpt import (
    PortableCoreAttention,
    build_gpt,
    document_packing,
    layer_spec,
    transformer_config,
    transformer_engine_available,
)
from megadoc_megatron.model.presets import PRESETS, parameter_count
from megadoc_megatron.train.config import ParallelConfig

VOCAB, SEQ, BATCH = 256, 32, 4


def init_parallel(rank: int, world_size: int, port: int, tensor_parallel: int) -> None:
    initialize(ParallelConfig(tensor=tensor_parallel),
               LaunchEnvironment(rank, world_size, rank, "127.0.0.1", port, "test"))


@pytest.fixture()
def one_process():
    with single_process():
        yield


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:], torch.arange(SEQ).expand(BATCH, -1)


def tiny_model(tensor_parallel=1, seed=1234):
    torch.manual_seed(seed)
    config = transformer_config("tiny", tensor_parallel=tensor_parallel)
    return build_gpt(config, VOCAB, SEQ)


def test_portable_attention_matches_naive_grouped_query_attention():
    config = transformer_config("tiny")
    seq, b, heads, groups, dim = 7, 2, 4, 2, 16
    q, k, v = torch.randn(seq, b, heads, dim), torch.randn(seq, b, groups, dim), torch.randn(seq, b, groups, dim)
    out = PortableCoreAttention(config, layer_number=1)(q, k, v)
    k_full, v_full = k.repeat_interleave(heads // groups, 2), v.repeat_interleave(heads // groups, 2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k_full) / math.sqrt(dim)
    scores = scores.masked_fill(torch.ones(seq, seq).triu(1).bool(), float("-inf"))
    expected = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v_full).reshape(seq, b, heads * dim)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_model_is_causal(one_process):
    model = tiny_model().eval()
    tokens, _, positions = batch()
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(tokens, positions, None), model(changed, positions, None)
    torch.testing.assert_close(before[:, :20], after[:, :20])
    assert not torch.allclose(before[:, 20:], after[:, 20:])


EOD = 0


def per_token_losses(model, rows: list[list[int]], packed: bool) -> torch.Tensor:
    """[rows, length - 1] losses of predicting each row's next tokens, the rows packed as in training."""
    tokens = torch.tensor(rows)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1]).expand_as(inputs)
    if not packed:
        return model(inputs, positions, None, labels=labels)
    flat = model(inputs.reshape(1, -1), positions.reshape(1, -1), None, labels=labels.reshape(1, -1),
                 packed_seq_params=document_packing(inputs, EOD))
    return flat.reshape(inputs.shape)


def test_a_documents_loss_is_the_same_packed_with_others_or_alone(one_process):
    """Document masking (megatron-core's packed "thd" format): attention stays inside each document
    and RoPE restarts at each; in a plain causal pass the same document sees its neighbours."""
    model = tiny_model().eval()
    generator = torch.Generator().manual_seed(3)
    document = lambda n: torch.randint(1, VOCAB, (n,), generator=generator).tolist() + [EOD]  # noqa: E731
    first, second, third, fourth = document(9), document(14), document(20), document(5)
    row = first + second + third[:10]
    packed_rows = [row, third[10:] + fourth + document(40)[:len(row) - len(third[10:]) - len(fourth)]]
    with torch.no_grad():
        packed = per_token_losses(model, packed_rows, packed=True)
        unmasked = per_token_losses(model, packed_rows, packed=False)
        alone = per_token_losses(model, [second], packed=False)[0]
        fourth_alone = per_token_losses(model, [fourth + [EOD]], packed=False)[0]
    start = len(first)  # `second` in row 0, predicting its tokens after its first one, up to its EOD
    torch.testing.assert_close(packed[0, start:start + len(second) - 1], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[0, start:start + len(second) - 1], alone, rtol=1e-3, atol=1e-3)
    start = len(third) - 10  # `fourth` in row 1, after the end of `third`
    torch.testing.assert_close(packed[1, start:start + len(fourth) - 1], fourth_alone[:len(fourth) - 1],
                               rtol=1e-5, atol=1e-5)


def test_tiny_model_learns_a_batch(one_process):
    model = tiny_model()
    tokens, labels, positions = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(tokens, positions, None, labels=labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(VOCAB), rel=0.1)  # starts near uniform
    assert losses[-1] < 0.5 * losses[0]


def test_a_placed_model_holds_every_tensor_on_its_device(one_process):
    """The GPU check found the rotary frequencies left on the CPU under a CUDA model (a plain
    attribute, which `.to()` does not move); the meta device shows the same on a CPU machine."""
    model = placed(tiny_model(), torch.device("meta"))
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [value for module in model.modules() for value in vars(module).values()
                if isinstance(value, torch.Tensor)]
    assert tensors and {t.device.type for t in tensors} == {"meta"}


def test_parameter_count_formula_matches_megatron_core(one_process):
    model = tiny_model()
    assert sum(p.numel() for p in model.parameters()) == parameter_count(PRESETS["tiny"], VOCAB)


@pytest.mark.parametrize("name,expected", [("150M", 154e6), ("300M", 300e6), ("600M", 602e6), ("1.5B", 1.54e9)])
def test_presets_have_the_papers_sizes_with_the_llama3_vocabulary(name, expected):
    assert parameter_count(PRESETS[name], 128256) == pytest.approx(expected, rel=0.01)


def test_te_backend_without_transformer_engine_is_a_clear_error():
    if transformer_engine_available():
        pytest.skip("Transformer Engine is installed")
    with pytest.raises(InputError, match="needs Transformer Engine"):
        layer_spec("te")
    with pytest.raises(InputError, match="FP8 needs the Transformer Engine"):
        transformer_config("tiny", backend="portable", fp8="hybrid")


@pytest.mark.skipif(not transformer_engine_available(), reason="needs Transformer Engine (GPU machines)")
def test_fp8_config_uses_the_transformer_engine_spec():
    config = transformer_config("150M", backend="te", bf16=True, fp8="hybrid", fp8_recipe="delayed")
    assert (config.fp8, config.fp8_amax_history_len, config.fp8_amax_compute_algo) == ("hybrid", 1024, "max")
    core_attention = layer_spec("te").submodules.self_attention.submodules.core_attention
    assert core_attention.__name__ == "TEDotProductAttention"


def loss_and_grad_norm(model) -> tuple[float, float]:
    """Loss on the fixed batch and the global gradient norm (sharded weights summed over TP ranks)."""
    from megatron.core import parallel_state

    tokens, labels, positions = batch()
    loss = model(tokens, positions, None, labels=labels).mean()
    loss.backward()
    sharded = sum(p.grad.pow(2).sum() for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    replicated = sum(p.grad.pow(2).sum() for p in model.parameters() if not getattr(p, "tensor_model_parallel", False))
    sharded = torch.as_tensor(sharded, dtype=torch.float64)
    dist.all_reduce(sharded, group=parallel_state.get_tensor_model_parallel_group())
    return loss.item(), float((sharded + replicated).sqrt())


def _tensor_parallel_rank(rank, port, out_dir):
    init_parallel(rank, 2, port, 2)
    try:
        loss, grad_norm = loss_and_grad_norm(tiny_model(tensor_parallel=2))
        (out_dir / f"rank{rank}.json").write_text(json.dumps([loss, grad_norm]))
    finally:
        shutdown()


@pytest.mark.e2e
def test_tensor_parallel_2_matches_1(tmp_path):
    torch.multiprocessing.spawn(_tensor_parallel_rank, args=(free_port(), tmp_path), nprocs=2, join=True)
    init_parallel(0, 1, free_port(), 1)
    try:
        expected = loss_and_grad_norm(tiny_model())
    finally:
        shutdown()
    for rank in range(2):
        loss, grad_norm = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert loss == pytest.approx(expected[0], rel=1e-5)
        assert grad_norm == pytest.approx(expected[1], rel=1e-4)
