"""The converter's contract: byte-identical to Megatron-LM's own converter, readable by megatron-core."""

import subprocess
import sys

import numpy as np
import pytest

from megadoc_megatron.data.indexed import read_index
from megadoc_megatron.data.preprocess import preprocess

from conftest import REPO

CASES = {
    "hf_eod": ("HuggingFaceTokenizer", "hf_tokenizer", True, 2),
    "hf_noeod": ("HuggingFaceTokenizer", "hf_tokenizer", False, 1),
    "spm_eod": ("SentencePieceTokenizer", "spm8k.model", True, 2),
}


def convert_golden_case(golden, tmp_path, name, **overrides):
    tokenizer_type, model, append_eod, workers = CASES[name]
    kwargs = dict(append_eod=append_eod, workers=workers, **overrides)
    summary = preprocess([str(golden / "golden_input.jsonl")], str(tmp_path / name), tokenizer_type,
                         str(golden / model), **kwargs)
    return tmp_path / f"{name}_text_document", summary


def assert_same_as_golden(golden, prefix, name):
    for suffix in (".bin", ".idx"):
        ours = prefix.with_name(prefix.name + suffix).read_bytes()
        theirs = (golden / "megatron_out" / f"{name}_text_document{suffix}").read_bytes()
        assert ours == theirs, f"{name}{suffix} differs from Megatron-LM's output"


@pytest.mark.parametrize("name", sorted(CASES))
def test_byte_identical_to_megatron_lm(golden, tmp_path, name):
    assert_same_as_golden(golden, convert_golden_case(golden, tmp_path, name)[0], name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_byte_identical_when_cut_into_many_parts(golden, tmp_path, name):
    # ~30 byte ranges of the 0.5 MB input, assembled in order.
    prefix, summary = convert_golden_case(golden, tmp_path, name, max_part_mb=0.016)
    assert summary["parts"] >= 15
    assert_same_as_golden(golden, prefix, name)


def test_standalone_tool_matches_golden(golden, tmp_path):
    subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_megadocs.py"),
                    "--input", str(golden / "golden_input.jsonl"), "--output-prefix", str(tmp_path / "hf_eod"),
                    "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(golden / "hf_tokenizer"),
                    "--append-eod", "--workers", "2"], check=True, capture_output=True)
    assert_same_as_golden(golden, tmp_path / "hf_eod_text_document", "hf_eod")


def test_megatron_core_reads_what_we_write(golden, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = convert_golden_case(golden, tmp_path, "spm_eod")[0]
    theirs = IndexedDataset(str(prefix))
    ours = read_index(prefix)
    assert len(theirs) == len(ours.sequence_lengths) == 64
    np.testing.assert_array_equal(theirs.document_indices, ours.document_indices)
    np.testing.assert_array_equal(theirs.sequence_lengths, ours.sequence_lengths)
    tokens = np.fromfile(prefix.with_suffix(".bin"), dtype=np.uint16)
    starts = np.concatenate([[0], np.cumsum(ours.sequence_lengths)])
    for i in (0, 2, 40, 63):
        np.testing.assert_array_equal(theirs[i], tokens[starts[i]:starts[i + 1]])
        np.testing.assert_array_equal(theirs[i], ours.document_tokens(int(np.searchsorted(ours.document_indices, i, "right") - 1)))
