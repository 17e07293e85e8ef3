"""Cost before compute: `megadoc synth ... --dry-run` counts what a run submits (checked against
independent token counts and against the requests a real run sends), prices it at a throughput,
and `megadoc run --dry-run` costs training as 6 N D with N as megatron-core builds the model and
D as `megadoc blend` computes it."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import REPO

from megadoc_megatron.cli import build_parser, main
from megadoc_megatron.errors import InputError
from megadoc_megatron.synth.backends import Completion, chat_token_ids
from megadoc_megatron.synth.command import run as synth_run
from megadoc_megatron.synth.prompts import BUILTIN

TEXTS = {
    "tower": "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was built from 1887 to 1889.\n\n"
             "It is 330 metres tall, and artists criticised it when it was new.",
    "bees": "Honey bees live in colonies of tens of thousands of workers and a single queen. Workers gather nectar "
            "and pollen, and tell each other where flowers are with a waggle dance.",
    "river": "The Danube rises in the Black Forest and flows east for about 2,850 kilometres through ten countries "
             "to the Black Sea.",
    "press": " ".join(["Gutenberg's press spread printing across Europe within fifty years."] * 30),
    "short": "Salt dissolves in water.",
}
MAX_NEW, RATE, STYLES = 64, 1234.5, ("wikipedia", "qa")


def write_corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in TEXTS.items()))
    return path


def synth_args(corpus, output, tokenizer, *extra, generations=3, window=2048):
    return build_parser().parse_args([
        "synth", "rephrase", "--input", str(corpus), "--output-dir", str(output), "-G", str(generations),
        "--styles", *STYLES, "--backend", "vllm", "--model", str(tokenizer), "--window", str(window),
        "--max-new-tokens", str(MAX_NEW), "--docs-per-shard", "2", *extra])


def test_plan_counts_equal_an_independent_count_and_price_at_the_given_rate(tmp_path, hf_tokenizer, capsys):
    from transformers import AutoTokenizer

    plan = synth_run(synth_args(write_corpus(tmp_path), tmp_path / "out", hf_tokenizer, "--dry-run",
                                "--tokens-per-second", str(RATE)))
    assert json.loads(capsys.readouterr().out) == plan  # the JSON printed is the dict returned
    tokenizer = AutoTokenizer.from_pretrained(hf_tokenizer)
    prompt_tokens = estimate = 0
    for text in TEXTS.values():
        source = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        for index in range(3):
            content = BUILTIN[STYLES[index % 2]].text.replace("{document}", text)
            chat = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                 tokenize=False)
            prompt_tokens += len(tokenizer(chat, add_special_tokens=False)["input_ids"])
            estimate += min(source, MAX_NEW)
    assert (plan["documents"], plan["pairs"], plan["requests"]) == (5, 15, 15)
    assert plan["handling"] == {"full": 15}
    assert plan["prompt_tokens"] == prompt_tokens
    assert plan["output_tokens"] == {"estimate": estimate, "upper_bound": 15 * MAX_NEW}
    assert estimate < 15 * MAX_NEW  # the short documents are shorter than the budget
    assert plan["remaining"]["output_tokens"] == plan["output_tokens"] and plan["done"]["pairs"] == 0
    assert plan["gpu_hours"] == {"estimate": estimate / RATE / 3600, "upper_bound": 15 * MAX_NEW / RATE / 3600}
    assert not (tmp_path / "out").exists()  # a plan writes nothing


class Recorder:
    """A backend that generates nothing: it records the requests a run submits and answers each."""

    def __init__(self, tokenizer):
        self.tokenizer, self.requests = tokenizer, []

    def answer(self, request) -> Completion:
        self.requests.append(request)
        return Completion("a plain answer " * 8, "stop", len(chat_token_ids(self.tokenizer, request.messages)), 24)

    def stream(self, keyed_requests, sampling):
        for key, request in keyed_requests:
            yield key, self.answer(request)

    def generate(self, requests, sampling):
        return [self.answer(r) for r in requests]


def run_recorded(args, recorder, task=(0, 1), progress=False):
    from megadoc_megatron.synth.command import build_config, resolve_model
    from megadoc_megatron.synth.pipeline import run_synthesis

    _, name, folder = resolve_model(args)
    return run_synthesis(build_config(args, name, folder), lambda: recorder, recorder.tokenizer, args.input,
                         args.output, task_index=task[0], task_count=task[1], progress=progress)


def test_chunked_plan_is_what_a_run_submits_and_done_pairs_are_not_costed(tmp_path, hf_tokenizer, capsys):
    from megadoc_megatron.synth.backends import load_chat_tokenizer

    corpus, output = write_corpus(tmp_path), tmp_path / "out"
    args = synth_args(corpus, output, hf_tokenizer, "--long-documents", "chunk", "--dry-run", generations=2, window=400)
    plan = synth_run(args)
    submitted = Recorder(load_chat_tokenizer(hf_tokenizer))
    run_recorded(synth_args(corpus, tmp_path / "whole", hf_tokenizer, "--long-documents", "chunk", generations=2,
                            window=400), submitted)
    assert plan["handling"]["chunked"] == 2 and plan["requests"] == len(submitted.requests) > plan["pairs"] == 10
    assert plan["prompt_tokens"] == sum(len(chat_token_ids(submitted.tokenizer, r.messages))
                                        for r in submitted.requests)
    assert plan["gpu_hours"] is None and any("--tokens-per-second" in n for n in plan["notes"])

    # Task 0 of 2 finishes its shards (0 and 2: documents 1-2 and 5); task 1 was killed after writing the
    # records of its first document (those of the whole run) and half a line.
    run_recorded(args, Recorder(submitted.tokenizer), task=(0, 2))
    for name in ("shard-00001.jsonl", "shard-00001.rejected.jsonl"):  # the gates reject the recorder's answers
        records = (tmp_path / "whole" / name).read_text().splitlines(keepends=True)
        (output / f"{name}.partial").write_text("".join(r for r in records if json.loads(r)["source_id"] == "river"))
    assert sum(len((output / f"{n}.partial").read_text().splitlines()) for n in ("shard-00001.jsonl",
                                                                                 "shard-00001.rejected.jsonl")) == 2
    partial = output / "shard-00001.jsonl.partial"
    with open(partial, "a") as stream:
        stream.write('{"source_id": "press", "ind')  # a torn last line is not a done pair
    before = partial.read_bytes()
    capsys.readouterr()
    again = synth_run(synth_args(corpus, output, hf_tokenizer, "--long-documents", "chunk", "--dry-run",
                                 "--tokens-per-second", str(RATE), "--task-index", "1", "--task-count", "2",
                                 generations=2, window=400))
    assert partial.read_bytes() == before  # read, never cut or rewritten
    assert again["done"] == {"complete_shards": 2, "pairs": 6 + 2}
    assert again["remaining"]["pairs"] == 2 and again["this_task"]["pairs"] == 2  # shard 1's other document
    assert again["gpu_hours"]["upper_bound"] == again["remaining"]["output_tokens"]["upper_bound"] / RATE / 3600
    assert (again["pairs"], again["requests"], again["prompt_tokens"]) == (plan["pairs"], plan["requests"],
                                                                            plan["prompt_tokens"])
    changed = synth_args(corpus, output, hf_tokenizer, "--dry-run", generations=2, window=400)
    with pytest.raises(InputError, match="other settings"):  # as a run would refuse it
        synth_run(changed)


def test_cost_flags_need_plan_and_one_throughput(tmp_path, hf_tokenizer):
    corpus = write_corpus(tmp_path)
    with pytest.raises(InputError, match="add --dry-run"):
        synth_run(synth_args(corpus, tmp_path / "out", hf_tokenizer, "--tokens-per-second", "10"))
    with pytest.raises(InputError, match="pass one of them"):
        synth_run(synth_args(corpus, tmp_path / "out", hf_tokenizer, "--dry-run", "--tokens-per-second", "10",
                             "--calibrate", "1"))
    assert not (tmp_path / "out").exists()


def test_rationale_prompt_tokens_are_within_a_few_per_request_of_the_chat_template_count(tmp_path, hf_tokenizer,
                                                                                          capsys):
    from megadoc_megatron.synth.backends import load_chat_tokenizer
    from megadoc_megatron.synth.command import build_config, resolve_model
    from megadoc_megatron.synth.pipeline import PairMaker

    corpus = write_corpus(tmp_path)
    args = build_parser().parse_args(["synth", "rationale", "--input", str(corpus), "--output-dir",
                                      str(tmp_path / "out"), "-G", "3", "--model", str(hf_tokenizer),
                                      "--window", "2048", "--dry-run"])
    plan = synth_run(args)
    _, name, folder = resolve_model(args)
    tokenizer = load_chat_tokenizer(folder)
    pair_maker = PairMaker(build_config(args, name, folder), tokenizer)
    sent = [len(chat_token_ids(tokenizer, r.messages)) for i, t in TEXTS.items() for p in pair_maker.pairs(i, t)
            for r in p.requests]
    assert plan["prompt_tokens_counted_as"] == "sum of parts" and plan["requests"] == len(sent) > 0
    assert abs(plan["prompt_tokens"] - sum(sent)) <= 5 * len(sent)
    assert plan["output_tokens"] == {"estimate": None, "upper_bound": 512 * len(sent)}
    assert "upper bound" in capsys.readouterr().err


def test_rationale_plan_prices_the_upper_bound_and_calibration_measures_a_real_generation(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    args = build_parser().parse_args(["synth", "rationale", "--input", str(corpus), "--output-dir",
                                      str(tmp_path / "out"), "-G", "1", "--max-new-tokens", "4", "--dry-run",
                                      "--calibrate", "1"])
    plan = synth_run(args)
    calibration = plan["calibration"]
    assert plan["output_tokens"]["estimate"] is None and plan["output_tokens"]["upper_bound"] == 4 * plan["requests"]
    assert calibration["documents"] == 1 and calibration["requests"] == 1 and 0 < calibration["output_tokens"] <= 4
    rate = calibration["output_tokens_per_second_per_gpu"]
    assert plan["throughput"] == {"output_tokens_per_second_per_gpu": rate, "source": "--calibrate 1 (hf)"}
    assert plan["gpu_hours"]["upper_bound"] == plan["output_tokens"]["upper_bound"] / rate / 3600
    assert "upper bound" in capsys.readouterr().err


# --- training: N from megatron-core's model, D as the blend computes it, FLOPs = 6 N D ---

OVERRIDES = {"num_layers": 3, "ffn_hidden_size": 200, "num_query_groups": 1, "kv_channels": 8}


@pytest.fixture()
def one_process():
    from megadoc_megatron.distributed import single_process

    with single_process():
        yield


@pytest.mark.parametrize("overrides", [{}, OVERRIDES])
def test_parameter_count_is_that_of_the_megatron_core_model(one_process, overrides):
    from megadoc_megatron.experiment.cost import parameter_counts
    from megadoc_megatron.model.gpt import build_gpt, transformer_config
    from megadoc_megatron.train.config import ModelConfig

    model = build_gpt(transformer_config("tiny", **overrides), 8064, 64)  # 8000 padded to a multiple of 128
    embedding = {"embedding.word_embeddings.weight", "output_layer.weight"}
    counts = parameter_counts(ModelConfig(preset="tiny", overrides=overrides), 8000)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["non_embedding"] == sum(p.numel() for n, p in model.named_parameters() if n not in embedding)


@pytest.fixture()
def experiment_config(tmp_path, hf_tokenizer, spm_model):
    corpus = [{"id": f"doc{i}", "text": f"Document {i}. " + "Some words about topic %d. " % i * (20 + 7 * i)}
              for i in range(8)]
    for name, rows in (("train", corpus[:5]), ("heldout", corpus[5:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = yaml.safe_load((REPO / "examples/tiny_cpu/experiment.yaml").read_text())
    values.update(work_dir=str(tmp_path / "work"), corpus={"train": "train.jsonl", "heldout": "heldout.jsonl"},
                  tokenizer={"type": "SentencePieceTokenizer", "model": str(spm_model)}, seeds=1, baseline={})
    values["generator"].update(model=str(hf_tokenizer), window=2048)  # a tokenizer is all a plan needs
    values["train"]["model"]["overrides"] = OVERRIDES
    values["blend"] = {"seq_length": 32, "global_batch_size": 4}
    values["train"]["data"]["micro_batch_size"] = 4
    values["recipes"] = [{"name": "real", "kind": "real", "epochs": 3},
                         {"name": "stitch_g2", "kind": "stitch", "generations": 2, "epochs": 2,
                          "synthetic_weight": 0.6},
                         {"name": "budget", "kind": "textbook", "generations": 1, "train_tokens": 1000,
                          "synthetic_weight": 0.5}]
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_training_cost_is_6nd_with_d_as_the_blend_computes_it(experiment_config, tmp_path, capsys):
    from megadoc_megatron.blend.weights import BlendConfig, make_blend
    from megadoc_megatron.experiment.config import load_experiment
    from megadoc_megatron.experiment.cost import experiment_costs, parameter_counts
    from megadoc_megatron.experiment.plan import build_graph
    from megadoc_megatron.experiment.stages import run_stage
    from megadoc_megatron.train.config import ModelConfig

    experiment = load_experiment(experiment_config)
    plan = build_graph(experiment)
    costs = experiment_costs(experiment, plan, tokens_per_second=RATE, mfu=0.5, gpu_tflops=100.0)
    rows = {r["stage"]: r for r in costs["rows"]}
    assert set(rows) == {"synth-rephrase", "synth-textbook", "train-real", "train-stitch_g2", "train-budget"}
    assert not any("error" in r for r in rows.values())

    # D: the iterations `megadoc blend` computes once the data exists (the held-out set stands in for the synthetic one)
    stages = {s.name: s for s in plan.graph.stages}
    for name in ("preprocess-train", "preprocess-heldout"):
        run_stage(stages[name])
    real = f"{stages['preprocess-train'].folder}/real_text_document"
    held = f"{stages['preprocess-heldout'].folder}/heldout_text_document"
    n = parameter_counts(ModelConfig(preset="tiny", overrides=OVERRIDES), 8000)["total"]
    for recipe, w, length in (("real", 0.0, {"epochs": 3}), ("stitch_g2", 0.6, {"epochs": 2}),
                              ("budget", 0.5, {"train_tokens": 1000})):
        iterations = make_blend(BlendConfig([real], [held] if w else [], w, length.get("epochs"), 32, 4,
                                            tmp_path / recipe, train_tokens=length.get("train_tokens"))).train_iters
        row = rows[f"train-{recipe}"]
        assert row["tokens"] == iterations * 4 * 32
        assert row["tokens_basis"] == ("known" if recipe == "budget" else "estimate")
        assert row["flops"] == 6 * n * row["tokens"]
        assert row["gpu_hours"] == row["flops"] / (0.5 * 100.0 * 1e12) / 3600 == row["gpu_hours_left"]
    after = {r["stage"]: r for r in experiment_costs(experiment, plan)["rows"]}
    assert after["train-real"]["tokens"] == rows["train-real"]["tokens"]
    assert "preprocessed real dataset" in after["train-real"]["tokens_source"]

    synth = rows["synth-rephrase"]
    assert (synth["plan"]["documents"], synth["plan"]["pairs"]) == (5, 10)
    assert synth["output_basis"] == "estimate" and rows["synth-textbook"]["output_basis"] == "upper bound"
    assert synth["gpu_hours"] == synth["output_tokens"] / RATE / 3600
    assert costs["totals"]["all"]["gpu_hours"] == pytest.approx(sum(r["gpu_hours"] for r in rows.values()))

    capsys.readouterr()
    assert main(["run", str(experiment_config), "--dry-run", "--tokens-per-second", str(RATE)]) == 0
    printed = capsys.readouterr().out
    assert "cost before compute" in printed and "total GPU-hours: generation" in printed
    assert math.isfinite(costs["totals"]["train"]["gpu_hours"])


@pytest.mark.parametrize("key", ["dry_run", "plan"])  # plan: the flag's old spelling
def test_experiment_refuses_cost_flags_in_the_generator_section(experiment_config, key):
    from megadoc_megatron.experiment.config import load_experiment
    from megadoc_megatron.experiment.plan import build_graph

    values = yaml.safe_load(experiment_config.read_text())
    values["generator"][key] = True
    experiment_config.write_text(yaml.safe_dump(values))
    with pytest.raises(InputError, match=f"generator/rephrase.{key} is set by megadoc run"):
        build_graph(load_experiment(experiment_config))


def test_a_resumed_synthesis_refuses_an_input_changed_anywhere(tmp_path, hf_tokenizer, monkeypatch):
    """The manifest records each input's whole-content digest: an edit in the middle that keeps the size
    is refused on resume, where names and sizes alone would have let stale generations pass."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("MEGADOC_CACHE", str(tmp_path / "cache"))
    corpus, output = write_corpus(tmp_path), tmp_path / "out"
    args = synth_args(corpus, output, hf_tokenizer, generations=1)
    tokenizer = AutoTokenizer.from_pretrained(hf_tokenizer)
    run_recorded(args, Recorder(tokenizer))
    text = corpus.read_text()
    middle = next(i for i in range(len(text) // 2, len(text)) if text[i].isalpha())
    corpus.write_text(text[:middle] + ("x" if text[middle] != "x" else "y") + text[middle + 1:])
    with pytest.raises(InputError, match=r"other settings \(input_digests differ\)"):
        run_recorded(args, Recorder(tokenizer))
