"""Faults around the converter: an interrupted assembly resumes, cut or mismatched dataset files are
refused by every reader before any training, files are synced before they are trusted, an empty
corpus is an error, a file named twice is read once."""

import os
import shutil

import numpy as np
import pytest

from megadoc_megatron.cli import main
from megadoc_megatron.data import indexed
from megadoc_megatron.data.dataset_info import DatasetInfo
from megadoc_megatron.data.indexed import read_index
from megadoc_megatron.data.preprocess import PreprocessConfig, preprocess
from megadoc_megatron.errors import InputError


def convert_golden(golden, prefix, spm_model, inputs=None, **kwargs):
    inputs = inputs or [str(golden / "golden_input.jsonl")]
    return preprocess(PreprocessConfig(inputs, str(prefix), "SentencePieceTokenizer", str(spm_model), append_eod=True,
                      **{"workers": 2, **kwargs}))


def same_as_golden(golden, prefix) -> bool:
    return all((prefix.parent / f"{prefix.name}_text_document{suffix}").read_bytes()
               == (golden / f"megatron_out/spm_eod_text_document{suffix}").read_bytes() for suffix in (".bin", ".idx"))


def test_interrupted_assembly_of_a_single_part_resumes(golden, tmp_path, spm_model, monkeypatch):
    """The only part's token file is moved into the output; an interruption before the index is
    written used to leave its marker trusted and every rerun failing on the missing file."""
    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(indexed, "write_index", interrupted)
        with pytest.raises(KeyboardInterrupt):
            convert_golden(golden, tmp_path / "out", spm_model)
    assert list((tmp_path / "out.parts").glob("*.done.json")) and not list(tmp_path.glob("out_*.bin"))
    summary = convert_golden(golden, tmp_path / "out", spm_model)
    assert summary.parts == 1 and same_as_golden(golden, tmp_path / "out")


@pytest.fixture()
def dataset(golden, tmp_path, spm_model):
    convert_golden(golden, tmp_path / "out", spm_model)
    return tmp_path / "out_text_document"


CUTS = {
    "bin_cut": (".bin", lambda data: data[:-2], "the token file is"),
    "bin_longer": (".bin", lambda data: data + b"\0\0", "the token file is"),
    "idx_cut": (".idx", lambda data: data[:-8], "the index is"),
    "idx_header_cut": (".idx", lambda data: data[:20], "the index is cut short"),
}


@pytest.mark.parametrize("name", sorted(CUTS))
def test_cut_or_mismatched_files_are_refused_by_every_reader(dataset, name, capsys):
    from megadoc_megatron.blend.datasets import load_checked
    from megadoc_megatron.blend.weights import Blend, BlendDataset, describe_dataset

    suffix, cut, message = CUTS[name]
    path = dataset.with_name(dataset.name + suffix)
    path.write_bytes(cut(path.read_bytes()))
    with pytest.raises(InputError, match=message) as caught:
        read_index(dataset)
    assert str(caught.value.path) == str(path) and "convert the data again" in caught.value.fix
    assert main(["inspect", str(dataset)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"megadoc inspect: error: {path}: {message}")
    with pytest.raises(InputError, match=message):
        describe_dataset(str(dataset), "real", "100,0,0")  # megadoc blend
    blend = dataset.parent / "blend.json"
    Blend(1, 1, 1, 8, 1, None, 0.0, 0.0, 9, 0.0,
          [BlendDataset(str(dataset), "real", 9, 1, None, "uint16", "")]).save(blend)
    with pytest.raises(InputError, match=message):
        load_checked(blend)  # megadoc train, before any process group starts


def test_part_files_and_outputs_are_synced_before_they_are_trusted(golden, tmp_path, spm_model, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    convert_golden(golden, tmp_path / "one", spm_model, workers=1)  # synced in the worker: not seen here
    names = [os.path.basename(path) for path in synced]
    assert names[:2] == ["one_text_document.bin.tmp", "one_text_document.idx.tmp"]
    assert str(tmp_path) in synced  # the folder, after the renames

    from megadoc_megatron.data.preprocess.parts import REFERENCE, Encoding, Options, Part
    from megadoc_megatron.data.preprocess.worker import convert_part, init_worker

    synced.clear()
    parts = tmp_path / "parts"
    parts.mkdir()
    init_worker(Options("SentencePieceTokenizer", str(spm_model), ("text",), True, False, str(parts), REFERENCE))
    part = Part(0, 0, str(golden / "golden_input.jsonl"), 0, None)
    convert_part((part, "stem", Encoding(2, 8000, "uint16")))
    marker = next(i for i, path in enumerate(synced) if ".done.json" in path)
    assert {os.path.basename(p) for p in synced[:marker]} >= {"stem.text.tokens", "stem.text.lengths"}


def test_an_input_without_documents_is_an_error(tmp_path, spm_model):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n\n")
    with pytest.raises(InputError, match="holds no documents"):
        preprocess(PreprocessConfig([str(empty)], str(tmp_path / "out"), "SentencePieceTokenizer", str(spm_model)))
    assert not list(tmp_path.glob("out*"))


def test_a_file_named_twice_is_read_once(golden, tmp_path, spm_model, monkeypatch):
    inputs = tmp_path / "inputs"  # a folder whose only .jsonl is the golden input, so the glob names it alone
    inputs.mkdir()
    shutil.copy(golden / "golden_input.jsonl", inputs)
    monkeypatch.chdir(inputs)
    summary = convert_golden(golden, tmp_path / "out", spm_model,
                             inputs=["golden_input.jsonl", str(inputs / "golden_input.jsonl"), str(inputs / "*.jsonl")])
    assert summary.files == 1 and same_as_golden(golden, tmp_path / "out")


def test_merge_joins_datasets_in_order_and_refuses_mixed_token_types(golden, tmp_path, capsys):
    made_by_megatron = str(golden / "megatron_out/hf_eod_text_document")  # no sidecar: none is written
    for suffix in (".bin", ".idx"):
        shutil.copy(made_by_megatron + suffix, tmp_path / f"copy{suffix}")
    assert main(["merge", "--data-path", made_by_megatron, made_by_megatron,
                 "--output-prefix", str(tmp_path / "x")]) == 2
    assert "a dataset is named more than once" in capsys.readouterr().err
    assert main(["merge", "--data-path", made_by_megatron, str(tmp_path / "copy"), "--output-prefix",
                 str(tmp_path / "twice")]) == 0
    once, twice = read_index(made_by_megatron), read_index(tmp_path / "twice")
    assert twice.num_documents == 2 * once.num_documents and twice.num_tokens == 2 * once.num_tokens
    assert list(twice.document_tokens(once.num_documents + 5)) == list(once.document_tokens(5))
    assert not (tmp_path / "twice.json").exists()
    code = main(["merge", "--data-path", made_by_megatron, str(golden / "megatron_out/qwen_eod_text_document"),
                 "--output-prefix", str(tmp_path / "mixed")])
    assert code == 2 and "different token types (int32, uint16)" in capsys.readouterr().err
    assert not list(tmp_path.glob("mixed*"))


def test_merge_samples_nested_shares_of_the_documents_that_megatron_core_reads(golden, tmp_path, spm_model, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megadoc_megatron.data.indexed import sampled_documents

    convert_golden(golden, tmp_path / "all", spm_model)  # with a sidecar, and an empty document among its 66
    source = read_index(tmp_path / "all_text_document")
    kept = {}
    for share in (0.25, 0.5, 1.0):
        prefix = tmp_path / f"share{share}"
        assert main(["merge", "--data-path", str(tmp_path / "all_text_document"), "--output-prefix", str(prefix),
                     "--sample-fraction", str(share), "--seed", "7"]) == 0
        view, chosen = read_index(prefix), sampled_documents(source.num_documents, share, 7)
        kept[share] = set(chosen.tolist())
        assert view.num_documents == len(chosen) == round(share * 66)
        assert all(list(view.document_tokens(i)) == list(source.document_tokens(int(d))) for i, d in enumerate(chosen))
        reader = IndexedDataset(str(prefix))
        assert len(reader) == int(np.count_nonzero(view.document_lengths()))
        assert np.array_equal(reader[len(reader) - 1], view.document_tokens(int(np.flatnonzero(
            view.document_lengths())[-1])))
        assert DatasetInfo.load(prefix).sampled == {"fraction": share, "seed": 7}
    assert kept[0.25] < kept[0.5] < kept[1.0]  # nested at one seed
    indexed.write_documents(source, sampled_documents(66, 0.5, 7), tmp_path / "sliced", slice_size=3)
    for suffix in (".bin", ".idx"):  # read in slices of 3 sequences: the same bytes
        assert (tmp_path / f"sliced{suffix}").read_bytes() == (tmp_path / f"share0.5{suffix}").read_bytes()
    for suffix in (".bin", ".idx"):  # all of it: the same bytes
        assert (tmp_path / f"share1.0{suffix}").read_bytes() == (tmp_path / f"all_text_document{suffix}").read_bytes()
    assert set(sampled_documents(66, 0.25, 8).tolist()) != kept[0.25]
    assert main(["merge", "--data-path", str(tmp_path / "all_text_document"), "--output-prefix", str(tmp_path / "none"),
                 "--sample-fraction", "0"]) == 2
    assert "--sample-fraction must lie in (0, 1]" in capsys.readouterr().err and not list(tmp_path.glob("none*"))


def test_array_tasks_beyond_the_parts_write_empty_shards_that_merge(golden, tmp_path, spm_model):
    from megadoc_megatron.data.merge import merge

    for index in range(3):  # the golden input is one part: two of the three tasks have nothing to do
        summary = convert_golden(golden, tmp_path / "out", spm_model, shard=(index, 3))
        assert summary.documents in (0, 66)
    merge([str(tmp_path / "out_shard*of00003_text_document.idx")], str(tmp_path / "out_text_document"))
    assert same_as_golden(golden, tmp_path / "out")


def test_merge_checks_before_it_writes(golden, tmp_path, spm_model):
    from megadoc_megatron.data.merge import merge

    empty = tmp_path / "empty_shard00001of00003_text_document"
    convert_golden(golden, tmp_path / "empty", spm_model, shard=(1, 3))  # a task with no part: an empty shard
    with pytest.raises(InputError, match="hold no documents"):
        merge([str(empty)], str(tmp_path / "none_text_document"))
    sides = []
    for name, fingerprint in (("a", "0" * 16), ("b", "1" * 16)):  # the same tokens, sidecars naming two tokenizers
        for suffix in (".bin", ".idx"):
            shutil.copy(golden / f"megatron_out/spm_eod_text_document{suffix}", tmp_path / f"{name}{suffix}")
        DatasetInfo(str(tmp_path / name), 66, 1, [], "text", True, "uint16", {"fingerprint": fingerprint},
                    "test").save()
        sides.append(str(tmp_path / name))
    with pytest.raises(InputError, match="different tokenizers"):
        merge(sides, str(tmp_path / "mixed_text_document"))
    assert not list(tmp_path.glob("none_*")) and not list(tmp_path.glob("mixed_*"))
