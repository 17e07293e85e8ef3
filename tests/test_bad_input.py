"""Bad input: one clear error naming file and line, or (--skip-bad-lines) a side file with every reject."""

import json
import shutil

import pytest

from megadoc_megatron.cli import main
from megadoc_megatron.data.preprocess import PreprocessConfig, preprocess
from megadoc_megatron.errors import InputError

# (name, the bad line, the reason that must be reported)
BAD_LINES = [
    ("malformed_json", b'{"text": "unterminated\n', "malformed JSON"),
    ("missing_key", b'{"body": "no text key here"}\n', "record lacks the key 'text'"),
    ("not_a_string", b'{"text": ["a", "list"]}\n', "is a JSON list, not a string"),
    ("not_an_object", b'["text"]\n', "expected a JSON object"),
    ("invalid_utf8", b'{"text": "caf\xe9 latin-1"}\n', "invalid UTF-8"),
    ("lone_surrogate", b'{"text": "half an emoji \\ud83d here"}\n', "lone surrogate"),
]
BAD_LINE_NUMBER = 50  # deep enough to fall in a later part when the input is cut small


def with_bad_line(golden_lines, tmp_path, bad: bytes):
    lines = list(golden_lines)
    lines.insert(BAD_LINE_NUMBER - 1, bad)
    path = tmp_path / "input.jsonl"
    path.write_bytes(b"".join(lines))
    return path


def convert(path, prefix, tokenizer_type, model, **kwargs):
    return preprocess(PreprocessConfig([str(path)], str(prefix), tokenizer_type, str(model), append_eod=True, workers=2,
                      max_part_mb=0.05, **kwargs))


# SmolLM2 goes through `tokenizers` (gigatoken refuses it), Qwen through gigatoken's path
@pytest.mark.parametrize("tokenizer", ["hf_tokenizer", "qwen_tokenizer"])
@pytest.mark.parametrize("name,bad,reason", BAD_LINES, ids=[case[0] for case in BAD_LINES])
def test_bad_line_is_named_and_nothing_is_written(golden_tokenizer, golden_lines, tmp_path, tokenizer, name, bad,
                                                  reason):
    path = with_bad_line(golden_lines, tmp_path, bad)
    with pytest.raises(InputError) as caught:
        convert(path, tmp_path / "out", "HuggingFaceTokenizer", golden_tokenizer(tokenizer))
    error = caught.value
    assert (error.path, error.line) == (str(path), BAD_LINE_NUMBER)
    assert reason in error.message and error.fix
    assert f"{path}:{BAD_LINE_NUMBER}: " in str(error)
    assert not list(tmp_path.glob("out*.bin")) and not list(tmp_path.glob("out*.idx"))


@pytest.mark.parametrize("case", ["spm_eod", "qwen_eod"])
@pytest.mark.parametrize("name,bad,reason", BAD_LINES, ids=[case[0] for case in BAD_LINES])
def test_skip_bad_lines_records_every_reject(golden, golden_tokenizer, golden_lines, tmp_path, case, name, bad, reason):
    tokenizer_type, model = {"spm_eod": ("SentencePieceTokenizer", "spm8k.model"),
                             "qwen_eod": ("HuggingFaceTokenizer", "qwen_tokenizer")}[case]
    path = with_bad_line(golden_lines, tmp_path, bad)
    summary = convert(path, tmp_path / "out", tokenizer_type, golden_tokenizer(model), skip_bad_lines=True)
    assert summary.rejected == 1 and summary.documents == 66
    if case == "qwen_eod":  # the part holding the bad line goes line by line, the others through Rust
        assert 0 < summary.parts_read_in_rust < summary.parts
    rejects = [json.loads(row) for row in (tmp_path / "out_rejected.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in rejects] == [(str(path), BAD_LINE_NUMBER)]
    assert reason in rejects[0]["reason"]
    assert rejects[0]["text"] == bad.rstrip(b"\n").decode("utf-8", "backslashreplace")
    # Everything else is exactly what Megatron-LM makes of the clean input.
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"out_text_document{suffix}").read_bytes() == (
            golden / f"megatron_out/{case}_text_document{suffix}").read_bytes()


@pytest.fixture()
def gapped_tokenizer(tmp_path, hf_tokenizer):
    """A real tokenizer whose vocabulary has a gap: 'enguin' maps to 70000 in a vocabulary of 49152.

    ('enguin' occurs nowhere in the golden input.)"""
    folder = tmp_path / "gapped"
    shutil.copytree(hf_tokenizer, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["vocab"]["enguin"] = 70000
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder


def test_token_id_beyond_vocabulary(golden_lines, tmp_path, gapped_tokenizer):
    path = with_bad_line(golden_lines, tmp_path, b'{"text": "penguin"}\n')
    with pytest.raises(InputError, match="outside the vocabulary") as caught:
        convert(path, tmp_path / "out", "HuggingFaceTokenizer", gapped_tokenizer)
    assert caught.value.line == BAD_LINE_NUMBER
    summary = convert(path, tmp_path / "out", "HuggingFaceTokenizer", gapped_tokenizer, skip_bad_lines=True)
    assert summary.rejected == 1


def test_failed_run_keeps_previous_outputs(golden_lines, tmp_path, spm_model):
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"".join(golden_lines))
    convert(good, tmp_path / "out", "SentencePieceTokenizer", spm_model)
    before = [(tmp_path / f"out_text_document{s}").read_bytes() for s in (".bin", ".idx")]
    with pytest.raises(InputError):
        convert(with_bad_line(golden_lines, tmp_path, b"{oops\n"), tmp_path / "out", "SentencePieceTokenizer",
                spm_model)
    assert [(tmp_path / f"out_text_document{s}").read_bytes() for s in (".bin", ".idx")] == before


def test_cli_prints_one_error_line(golden_lines, tmp_path, spm_model, capsys):
    path = with_bad_line(golden_lines, tmp_path, b'{"text": 3}\n')
    code = main(["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "out"),
                 "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(spm_model), "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (f"megadoc preprocess: error: {path}:{BAD_LINE_NUMBER}: the value of 'text' is a JSON int, "
                       "not a string. Fix: store 'text' as a JSON string")


@pytest.mark.parametrize("tokenizer_type,model,message", [
    ("HuggingFaceTokenizer", "does/not/exist", "tokenizer not found"),
    ("SentencePieceTokenizer", None, "--tokenizer-model is required"),
    ("GPT2BPETokenizer", "x", "unsupported --tokenizer-type"),
])
def test_bad_tokenizer_flags(golden, tmp_path, tokenizer_type, model, message):
    with pytest.raises(InputError, match=message):
        preprocess(PreprocessConfig([str(golden / "golden_input.jsonl")], str(tmp_path / "out"), tokenizer_type, model))


def test_hf_folder_without_tokenizer_json(golden, tmp_path):
    with pytest.raises(InputError, match="no tokenizer.json"):
        preprocess(PreprocessConfig([str(golden / "golden_input.jsonl")], str(tmp_path / "out"), "HuggingFaceTokenizer",
                                    str(tmp_path)))


def test_a_line_only_gigatoken_accepts_among_the_checked_ones_goes_line_by_line(golden, golden_lines, qwen_tokenizer,
                                                                                 tmp_path):
    """gigatoken reads `{"text": "x",}`; Python's json does not. Among the first documents, which are
    read by both for the check, such a line sends its part line by line, where it is rejected."""
    path = tmp_path / "input.jsonl"
    path.write_bytes(b'{"text": "a trailing comma",}\n' + b"".join(golden_lines))
    summary = preprocess(PreprocessConfig([str(path)], str(tmp_path / "out"), "HuggingFaceTokenizer",
                         str(qwen_tokenizer), append_eod=True, workers=2, skip_bad_lines=True))
    assert summary.tokenized_with == "gigatoken" and summary.parts_read_in_rust == 0
    assert summary.rejected == 1 and summary.documents == 66
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"out_text_document{suffix}").read_bytes() == (
            golden / f"megatron_out/qwen_eod_text_document{suffix}").read_bytes()
