"""The converter's contract: byte-identical to Megatron-LM's own converter, readable by megatron-core."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from megadoc_megatron.data.indexed import read_index
from megadoc_megatron.data.preprocess import PreprocessConfig, preprocess

CASES = {
    "hf_eod": ("HuggingFaceTokenizer", "hf_tokenizer", True, 2),
    "hf_noeod": ("HuggingFaceTokenizer", "hf_tokenizer", False, 1),
    "spm_eod": ("SentencePieceTokenizer", "spm8k.model", True, 2),
    "qwen_eod": ("HuggingFaceTokenizer", "qwen_tokenizer", True, 2),  # vocabulary 151,851: int32 tokens
}
# gigatoken loads the Qwen tokenizer and gives its ids; it refuses SmolLM2's ("no single-byte vocab
# entry for byte 0x04"), and SentencePiece stays on sentencepiece.
TOKENIZED_WITH = {"hf_eod": "reference", "hf_noeod": "reference", "spm_eod": "reference", "qwen_eod": "gigatoken"}


def convert_golden_case(golden, golden_tokenizer, tmp_path, name, **overrides):
    tokenizer_type, model, append_eod, workers = CASES[name]
    kwargs = dict(append_eod=append_eod, workers=workers, **overrides)
    summary = preprocess(PreprocessConfig([str(golden / "golden_input.jsonl")], str(tmp_path / name), tokenizer_type,
                         str(golden_tokenizer(model)), **kwargs))
    return tmp_path / f"{name}_text_document", summary


def assert_same_as_golden(golden, prefix, name):
    for suffix in (".bin", ".idx"):
        ours = prefix.with_name(prefix.name + suffix).read_bytes()
        theirs = (golden / "megatron_out" / f"{name}_text_document{suffix}").read_bytes()
        assert ours == theirs, f"{name}{suffix} differs from Megatron-LM's output"


@pytest.mark.parametrize("name", sorted(CASES))
def test_byte_identical_to_megatron_lm(golden, golden_tokenizer, tmp_path, name):
    prefix, summary = convert_golden_case(golden, golden_tokenizer, tmp_path, name)
    assert summary.tokenized_with == TOKENIZED_WITH[name]
    assert summary.parts_read_in_rust == (summary.parts if TOKENIZED_WITH[name] == "gigatoken" else 0)
    assert_same_as_golden(golden, prefix, name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_byte_identical_through_an_array_and_a_merge(golden, golden_tokenizer, tmp_path, name):
    from megadoc_megatron.data.merge import merge

    shards = 3
    for index in range(shards):  # three array tasks, each a contiguous share of ~30 byte ranges
        summary = convert_golden_case(golden, golden_tokenizer, tmp_path, name, max_part_mb=0.016,
                                      shard=(index, shards))[1]
        assert 0 < summary.documents < 66
    merged = merge([str(tmp_path / f"{name}_shard*of00003_text_document.idx")], str(tmp_path / "merged_text_document"))
    assert merged["inputs"] == shards and merged["documents"] == 66
    assert_same_as_golden(golden, tmp_path / "merged_text_document", name)


@pytest.mark.parametrize("blank,in_rust", [(b"\n", True), (b"  \n", False), (b"\r\n", False)])
def test_blank_lines_skipped_in_rust_when_empty(golden, golden_lines, qwen_tokenizer, tmp_path, blank, in_rust):
    """gigatoken skips empty lines as we do, but stops at a line of whitespace: such a part goes line by line."""
    lines = list(golden_lines)
    for at in (0, 30, 31, len(lines)):
        lines.insert(at, blank)
    path = tmp_path / "input.jsonl"
    path.write_bytes(b"".join(lines))
    summary = preprocess(PreprocessConfig([str(path)], str(tmp_path / "qwen_eod"), "HuggingFaceTokenizer",
                         str(qwen_tokenizer), append_eod=True, workers=2))
    assert summary.blank_lines == 4 and summary.documents == 66
    assert summary.parts_read_in_rust == (summary.parts if in_rust else 0)
    assert_same_as_golden(golden, tmp_path / "qwen_eod_text_document", "qwen_eod")


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_input_through_gigatoken(golden, qwen_tokenizer, tmp_path, suffix):
    import gzip

    import zstandard

    data = (golden / "golden_input.jsonl").read_bytes()
    path = tmp_path / f"input.jsonl{suffix}"
    path.write_bytes(gzip.compress(data) if suffix == ".gz" else zstandard.compress(data))
    summary = preprocess(PreprocessConfig([str(path)], str(tmp_path / "qwen_eod"), "HuggingFaceTokenizer",
                         str(qwen_tokenizer), append_eod=True, workers=2))
    assert summary.tokenized_with == "gigatoken"
    assert_same_as_golden(golden, tmp_path / "qwen_eod_text_document", "qwen_eod")


def test_gigatoken_that_parts_ways_with_tokenizers_is_caught(golden, qwen_tokenizer, tmp_path, capsys):
    """gigatoken ignores `single_word` on an added token (it splits "ab<|endoftext|>cd", tokenizers does
    not): the probe finds it, the run says so and converts with tokenizers, still byte-identical."""
    import json
    import shutil

    folder = tmp_path / "single_word_qwen"
    shutil.copytree(qwen_tokenizer, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    next(t for t in spec["added_tokens"] if t["content"] == "<|endoftext|>")["single_word"] = True
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    summary = preprocess(PreprocessConfig([str(golden / "golden_input.jsonl")], str(tmp_path / "qwen_eod"),
                         "HuggingFaceTokenizer", str(folder), append_eod=True, workers=2))
    assert summary.tokenized_with == "reference"
    assert "gigatoken cannot stand in for HuggingFaceTokenizer here: its ids differ" in capsys.readouterr().err
    assert_same_as_golden(golden, tmp_path / "qwen_eod_text_document", "qwen_eod")


def test_a_document_gigatoken_encodes_differently_is_named(qwen_tokenizer):
    """The check of each part's first documents, on a fabricated disagreement."""
    from megadoc_megatron.data.preprocess.parts import Part, PartResult
    from megadoc_megatron.data.preprocess.reference import GigatokenUnusable, check_sample
    from megadoc_megatron.data.tokenizer import load_tokenizer

    reference = load_tokenizer("HuggingFaceTokenizer", qwen_tokenizer)
    text = "Penguins swim."
    ids = reference.encode_batch([text])[0]
    part = Part(3, 0, "corpus.jsonl", 4096, None)
    check_sample(PartResult(3, "stem", sample=[("line 2", text, list(ids))]), part, reference)
    with pytest.raises(GigatokenUnusable, match=r"corpus.jsonl, line 2 of the part starting at byte 4096"):
        check_sample(PartResult(3, "stem", sample=[("line 2", text, [*ids[:-1], ids[-1] + 1])]), part, reference)


@pytest.mark.parametrize("name", sorted(CASES))
def test_byte_identical_when_cut_into_many_parts(golden, golden_tokenizer, tmp_path, name):
    # ~30 byte ranges of the 0.5 MB input, assembled in order.
    prefix, summary = convert_golden_case(golden, golden_tokenizer, tmp_path, name, max_part_mb=0.016)
    assert summary.parts >= 15
    assert summary.parts_read_in_rust == (summary.parts if TOKENIZED_WITH[name] == "gigatoken" else 0)
    assert_same_as_golden(golden, prefix, name)


def test_standalone_tool_matches_golden(golden, hf_tokenizer, tmp_path):
    subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_megadocs.py"),
                    "--input", str(golden / "golden_input.jsonl"), "--output-prefix", str(tmp_path / "hf_eod"),
                    "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(hf_tokenizer),
                    "--append-eod", "--workers", "2"], check=True, capture_output=True)
    assert_same_as_golden(golden, tmp_path / "hf_eod_text_document", "hf_eod")


def test_megatron_core_reads_what_we_write(golden, golden_tokenizer, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = convert_golden_case(golden, golden_tokenizer, tmp_path, "spm_eod")[0]
    theirs = IndexedDataset(str(prefix))
    ours = read_index(prefix)
    assert len(theirs) == len(ours.sequence_lengths) == 64
    np.testing.assert_array_equal(theirs.document_indices, ours.document_indices)
    np.testing.assert_array_equal(theirs.sequence_lengths, ours.sequence_lengths)
    tokens = np.fromfile(prefix.with_suffix(".bin"), dtype=np.uint16)
    starts = np.concatenate([[0], np.cumsum(ours.sequence_lengths)])
    for i in (0, 2, 40, 63):
        np.testing.assert_array_equal(theirs[i], tokens[starts[i]:starts[i + 1]])
        np.testing.assert_array_equal(theirs[i],
                                      ours.document_tokens(int(np.searchsorted(ours.document_indices, i, "right") - 1)))
