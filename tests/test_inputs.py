"""Input forms (compressed, folders, globs, several files, several keys) and output layouts."""

import gzip
import json
import math

import numpy as np
import pytest
import zstandard

from megadoc_megatron.data.indexed import read_index
from megadoc_megatron.data.preprocess import PreprocessConfig, preprocess
from megadoc_megatron.errors import InputError


def spm(inputs, prefix, model, **kwargs):
    kwargs.setdefault("workers", 2)
    return preprocess(PreprocessConfig([str(i) for i in inputs], str(prefix), "SentencePieceTokenizer", str(model),
                                       **kwargs))


def read_bytes(prefix):
    return tuple((prefix.parent / f"{prefix.name}{s}").read_bytes() for s in (".bin", ".idx"))


@pytest.fixture()
def three_files(tmp_path, golden_lines):
    """The golden input cut into three files: plain, gzip and zstd."""
    folder = tmp_path / "in"
    folder.mkdir()
    chunks = [b"".join(golden_lines[:20]), b"".join(golden_lines[20:45]), b"".join(golden_lines[45:])]
    (folder / "a.jsonl").write_bytes(chunks[0])
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(chunks[1]))
    (folder / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(chunks[2]))
    return folder


def test_folder_of_mixed_compression_equals_golden(golden, three_files, spm_model, tmp_path):
    summary = spm([three_files], tmp_path / "merged", spm_model, append_eod=True, max_part_mb=0.01)
    assert summary.parts > 3  # the plain file is cut, the compressed ones are not
    assert read_bytes(tmp_path / "merged_text_document") == (
        (golden / "megatron_out/spm_eod_text_document.bin").read_bytes(),
        (golden / "megatron_out/spm_eod_text_document.idx").read_bytes())


def test_no_merge_gives_one_dataset_per_file(three_files, spm_model, tmp_path):
    files = sorted(three_files.iterdir())
    summary = spm([three_files / "*.jsonl*"], tmp_path / "shard", spm_model, merge=False)
    assert [d.prefix.rsplit("/", 1)[1] for d in summary.datasets] == [
        f"shard_{i}_text_document" for i in range(3)]
    for i, path in enumerate(files):
        spm([path], tmp_path / f"alone{i}", spm_model, workers=1)
        assert read_bytes(tmp_path / f"shard_{i}_text_document") == read_bytes(tmp_path / f"alone{i}_text_document")


def test_several_json_keys_give_aligned_datasets(tmp_path, spm_model):
    rows = [{"text": f"document number {i}", "summary": "" if i == 2 else f"short {i}"} for i in range(5)]
    path = tmp_path / "keys.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spm([path], tmp_path / "out", spm_model, json_keys=("text", "summary"), append_eod=True)
    text, summary = read_index(tmp_path / "out_text_document"), read_index(tmp_path / "out_summary_document")
    assert text.num_documents == summary.num_documents == 5
    assert summary.document_lengths()[2] == 0 and (text.document_lengths() > 0).all()
    meta = json.loads((tmp_path / "out_summary_document.json").read_text())
    assert meta["documents"] == 5 and meta["tokenizer"]["type"] == "SentencePieceTokenizer"


def test_blank_lines_are_skipped_and_counted(tmp_path, spm_model):
    path = tmp_path / "blank.jsonl"
    path.write_text('{"text": "one"}\n\n   \n{"text": "two"}\n')
    summary = spm([path], tmp_path / "out", spm_model)
    assert (summary.documents, summary.blank_lines, summary.lines) == (2, 2, 4)


def test_missing_input_is_a_clear_error(tmp_path, spm_model):
    with pytest.raises(InputError, match="no input files found"):
        spm([tmp_path / "nothing*.jsonl"], tmp_path / "out", spm_model)


def test_large_file_is_cut_into_parts_kept_in_order(tmp_path, spm_model, golden_lines):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"".join(golden_lines) * 8)
    summary = spm([path], tmp_path / "out", spm_model, max_part_mb=1)
    view = read_index(tmp_path / "out_text_document")
    assert summary.parts == math.ceil(path.stat().st_size / (1 << 20)) and view.num_documents == 66 * 8
    lengths = view.document_lengths()
    np.testing.assert_array_equal(lengths[:66], lengths[66 * 7:])
