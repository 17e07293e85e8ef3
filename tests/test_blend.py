"""`megadoc blend`: exact real epochs through megatron-core's own BlendedMegatronDatasetBuilder."""

import json

import numpy as np
import pytest
from conftest import make_dataset

from megadoc_megatron.blend.datasets import run_tokenizer, verify_blend
from megadoc_megatron.blend.weights import Blend, BlendConfig, make_blend
from megadoc_megatron.cli import main
from megadoc_megatron.data.indexed import read_index
from megadoc_megatron.errors import InputError


@pytest.fixture(scope="module")
def streams(tmp_path_factory, golden_lines, spm_model):
    """Real and synthetic datasets whose documents are much longer / much shorter than a sample."""
    tmp = tmp_path_factory.mktemp("blend")
    docs = [json.loads(line)["text"] for line in golden_lines]
    long_docs = [d for d in docs if len(d) > 2000]
    sentences = [s.strip() for d in docs for s in d.split(". ") if 10 < len(s.strip()) < 80]
    spm = ("SentencePieceTokenizer", spm_model)
    return {
        "long": (make_dataset(tmp, "real_long", long_docs[:12], *spm),
                 make_dataset(tmp, "syn_long", long_docs[12:30], *spm)),
        "short": (make_dataset(tmp, "real_short", sentences[:150], *spm),
                  make_dataset(tmp, "syn_short", sentences[150:], *spm)),
        "held_out": make_dataset(tmp, "held_out", long_docs[30:36], *spm),  # in neither stream
    }


@pytest.mark.parametrize("documents,seq_length", [("long", 64), ("short", 128)])
@pytest.mark.parametrize("weight", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("epochs", [1, 2, 4, 16])
def test_realized_real_epochs_are_exact(streams, tmp_path, documents, seq_length, weight, epochs):
    real, synthetic = streams[documents]
    blend = make_blend(BlendConfig([real], [synthetic], weight, epochs, seq_length, 16, tmp_path))
    assert blend.train_samples % 16 == 0
    assert blend.synthetic_weight_realized >= weight
    real_row, synthetic_row = verify_blend(blend)
    assert abs(real_row["drawn"] - real_row["samples_in_full_passes"]) <= 1
    assert real_row["all_from_full_passes"]
    assert abs(real_row["epochs"] - epochs) <= seq_length / blend.datasets[0].train_tokens
    assert abs(synthetic_row["drawn"] - synthetic_row["planned"]) <= 1


@pytest.mark.parametrize("epochs", [1, 3])
def test_real_only_blend_fills_the_last_batch_from_the_next_pass(streams, tmp_path, capsys, epochs):
    real, _ = streams["short"]
    assert main(["blend", "--real-data-path", real, "-w", "0", "-E", str(epochs), "--seq-length", "128",
                 "--global-batch-size", "16", "--output-dir", str(tmp_path)]) == 0
    blend = Blend.load(tmp_path / "blend.json")
    [row] = verify_blend(blend)
    assert row["drawn"] == row["planned"] == blend.train_samples
    assert 0 <= row["drawn"] - row["samples_in_full_passes"] < 16
    assert blend.train_iters == -(-row["samples_in_full_passes"] // 16)
    if row["drawn"] > row["samples_in_full_passes"]:
        assert f"samples of pass {epochs + 1}" in capsys.readouterr().out


@pytest.mark.parametrize("weight", [0.0, 1 / 3, 1.0])
def test_a_token_budget_is_split_w_to_synthetic_as_megatron_core_draws_it(streams, tmp_path, capsys, weight):
    real, synthetic = streams["long"]
    mix = ["--synthetic-data-path", synthetic] if weight else []
    assert main(["blend", "--real-data-path", real, *mix, "-w", str(weight), "--train-tokens", "20000",
                 "--seq-length", "64", "--global-batch-size", "8", "--output-dir", str(tmp_path)]) == 0
    blend = Blend.load(tmp_path / "blend.json")
    assert blend.train_iters == 40 and blend.epochs is None  # ceil(20000 / (64 * 8))
    rows = verify_blend(blend)
    assert [r["stream"] for r in rows] == (["synthetic"] if weight == 1 else ["real", "synthetic"][:1 + bool(weight)])
    drawn = {r["stream"]: r["drawn"] for r in rows}
    assert sum(drawn.values()) == blend.train_samples
    assert drawn.get("synthetic", 0) / blend.train_samples == pytest.approx(weight, abs=1 / blend.train_samples)
    assert "token budget 20,000" in capsys.readouterr().out


def test_several_real_datasets_each_get_exact_epochs(streams, tmp_path):
    (real_long, syn_long), (real_short, _) = streams["long"], streams["short"]
    blend = make_blend(BlendConfig([real_long, real_short], [syn_long], 0.75, 3, 64, 8, tmp_path))
    for row in verify_blend(blend)[:2]:
        assert abs(row["drawn"] - row["samples_in_full_passes"]) <= 1 and row["all_from_full_passes"]


def test_output_files_are_what_megatron_reads(streams, tmp_path, capsys):
    from megatron.core.datasets.utils import get_blend_from_list

    (real, synthetic), held_out = streams["long"], streams["held_out"]
    assert main(["blend", "--real-data-path", real, "--synthetic-data-path", synthetic, "-w", "0.75", "-E", "2",
                 "--seq-length", "64", "--global-batch-size", "8", "--valid-data-path", held_out,
                 "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "--data-args-path" in printed and "exactly 2 passes" in printed
    prefixes, weights = get_blend_from_list((tmp_path / "data_args.txt").read_text().split())
    blend = Blend.load(tmp_path / "blend.json")
    assert prefixes == [d.prefix for d in blend.datasets] and weights == [d.weight for d in blend.datasets]
    per_split = json.loads((tmp_path / "per_split_data_args.json").read_text())
    assert (sorted(per_split) == ["test", "train", "valid"]
            and per_split["train"] == (tmp_path / "data_args.txt").read_text().split())


def test_rewritten_dataset_gets_a_new_index_cache(tmp_path, spm_model, golden_lines):
    docs = [json.loads(line)["text"] for line in golden_lines][:30]
    spm = ("SentencePieceTokenizer", spm_model)
    real, synthetic = make_dataset(tmp_path, "real", docs[:15], *spm), make_dataset(tmp_path, "syn", docs[15:], *spm)
    first = make_blend(BlendConfig([real], [synthetic], 0.5, 2, 64, 8, tmp_path / "a")).data_cache_path
    assert make_blend(BlendConfig([real], [synthetic], 0.5, 2, 64, 8, tmp_path / "a")).data_cache_path == first
    make_dataset(tmp_path, "real", docs[:14], *spm)  # same prefix, new content
    assert make_blend(BlendConfig([real], [synthetic], 0.5, 2, 64, 8, tmp_path / "a")).data_cache_path != first


@pytest.mark.parametrize("weight,epochs,seq_length,message", [
    (1.0, 2, 64, "must lie in \\[0, 1\\)"),
    (0.0, 2, 64, "synthetic datasets need a weight above 0"),
    (0.5, 0, 64, "at least 1"),
    (0.5, 2, 10**7, "fewer than one sample"),
])
def test_impossible_requests(streams, tmp_path, weight, epochs, seq_length, message):
    real, synthetic = streams["long"]
    with pytest.raises(InputError, match=message):
        make_blend(BlendConfig([real], [synthetic], weight, epochs, seq_length, 8, tmp_path))


def test_too_few_samples_per_epoch_for_exact_passes(tmp_path, spm_model, golden_lines):
    # About two samples per pass: megatron-core would shuffle the spill-over epoch together with
    # the others, so the passes could not be exact.
    text = json.loads(golden_lines[0])["text"]
    spm = ("SentencePieceTokenizer", spm_model)
    real, synthetic = make_dataset(tmp_path, "real", [text], *spm), make_dataset(tmp_path, "syn", [text] * 4, *spm)
    tokens = len(np.fromfile(f"{real}.bin", dtype=np.uint16))
    with pytest.raises(InputError, match="samples per epoch: too few"):
        make_blend(BlendConfig([real], [synthetic], 0.5, 4, tokens // 2, 8, tmp_path))


def test_tokenizer_mismatch(streams, tmp_path, hf_tokenizer, golden_lines):
    real, _ = streams["long"]
    docs = [json.loads(line)["text"] for line in golden_lines][:10]
    other = make_dataset(tmp_path, "hf", docs, "HuggingFaceTokenizer", hf_tokenizer)
    with pytest.raises(InputError, match="different tokenizers"):
        make_blend(BlendConfig([real], [other], 0.5, 2, 64, 8, tmp_path))


def test_valid_data_needs_the_whole_train_split(streams, tmp_path):
    real, synthetic = streams["long"]
    with pytest.raises(InputError, match="--valid-data-path needs --split 100,0,0"):
        make_blend(BlendConfig([real], [synthetic], 0.5, 2, 64, 8, tmp_path, split="98,2,0", valid_data=[real]))


def _near_copy(text: str) -> str:
    """The text with every 40th word replaced: a near-duplicate (most 13-grams survive)."""
    words = text.split()
    return " ".join("changed" if i % 40 == 20 else w for i, w in enumerate(words))


def test_held_out_data_that_repeats_training_documents_is_refused(streams, tmp_path, golden_lines, spm_model):
    real, synthetic = streams["long"]
    docs = [json.loads(line)["text"] for line in golden_lines if len(json.loads(line)["text"]) > 2000]
    leaky = make_dataset(tmp_path, "leaky", ["A held-out document of its own."] + [docs[3], _near_copy(docs[4])],
                         "SentencePieceTokenizer", spm_model)  # an exact and a near copy of real_long's documents
    with pytest.raises(InputError, match=r"2 training document\(s\) of .*real_long_text_document overlap held-out "
                                         r"documents \(training document 3 and held-out document 1: 100% of "
                                         r"13-grams shared, limit 50%\)") as error:
        make_blend(BlendConfig([real], [synthetic], 0.5, 2, 64, 8, tmp_path / "out", valid_data=[leaky]))
    assert error.value.path == leaky and not (tmp_path / "out").exists()  # nothing written


def test_the_overlap_threshold_and_n_gram_length_decide_what_is_a_near_duplicate(streams, tmp_path, golden_lines,
                                                                                  spm_model):
    real, synthetic = streams["long"]
    docs = [json.loads(line)["text"] for line in golden_lines if len(json.loads(line)["text"]) > 2000]
    near = make_dataset(tmp_path, "near", [_near_copy(docs[4])], "SentencePieceTokenizer", spm_model)
    with pytest.raises(InputError, match=r"training document 4 and held-out document 0: [5-9]\d% of 13-grams"):
        make_blend(BlendConfig([real], [synthetic], 0.5, 2, 64, 8, tmp_path / "a", valid_data=[near]))
    make_blend(BlendConfig([real], [synthetic], 0.5, 2, 64, 8, tmp_path / "b", valid_data=[near],
                           overlap_threshold=0.99))
    with pytest.raises(InputError, match=r"[1-4]\d% of 50-grams shared"):  # longer n-grams: fewer survive the edits
        make_blend(BlendConfig([real], [synthetic], 0.5, 2, 64, 8, tmp_path / "c", valid_data=[near],
                               overlap_ngram=50, overlap_threshold=0.1))


def test_a_dataset_without_a_sidecar_is_checked_against_the_tokenizer_the_user_names(golden, tmp_path, hf_tokenizer,
                                                                                   qwen_tokenizer, spm_model):
    """Datasets made by Megatron-LM itself carry no record of their tokenizer: the run names it, and what the
    tokens can show (their dtype, their largest id, the end-of-document token) is checked."""
    made = {name: str(golden / f"megatron_out/{name}_text_document") for name in ("hf_eod", "hf_noeod")}
    with_eod = make_blend(BlendConfig([made["hf_eod"]], [], 0.0, 1, 64, 8, tmp_path / "a"))
    with pytest.raises(InputError, match="no sidecar naming its tokenizer") as error:
        run_tokenizer(with_eod)
    assert "data.tokenizer_type and data.tokenizer_model" in error.value.fix
    tokenizer = run_tokenizer(with_eod, "HuggingFaceTokenizer", str(hf_tokenizer), eod_expected=True)
    assert tokenizer.vocab_size > read_index(made["hf_eod"]).largest_token()
    with pytest.raises(InputError, match=r"stores tokens as uint16, too small for the vocabulary of 15\d{4}"):
        run_tokenizer(with_eod, "HuggingFaceTokenizer", str(qwen_tokenizer))
    with pytest.raises(InputError, match="holds token id .*, beyond the vocabulary of 8000"):
        run_tokenizer(with_eod, "SentencePieceTokenizer", str(spm_model))
    without_eod = make_blend(BlendConfig([made["hf_noeod"]], [], 0.0, 1, 64, 8, tmp_path / "b"))
    run_tokenizer(without_eod, "HuggingFaceTokenizer", str(hf_tokenizer))
    with pytest.raises(InputError, match="no document ends with the end-of-document token") as error:
        run_tokenizer(without_eod, "HuggingFaceTokenizer", str(hf_tokenizer), eod_expected=True)
    assert error.value.path == made["hf_noeod"]
