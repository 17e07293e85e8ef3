"""The progress reporter: in a log (stderr not a terminal) a plain line every MEGADOC_PROGRESS_SECONDS with
what is done, the rate and the ETA, and a last line; on a terminal a tqdm bar. Timing is a fake clock."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_training, write_config

from megadoc_megatron.cli import main
from megadoc_megatron.errors import InputError
from megadoc_megatron.progress import Progress


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_line_every_interval_with_rate_and_eta_and_a_last_line(monkeypatch):
    monkeypatch.setenv("MEGADOC_PROGRESS_SECONDS", "10")
    clock, log = FakeClock(), io.StringIO()
    progress = Progress("convert", 100, "documents", stream=log, clock=clock)
    for now, count in ((5, 10), (10, 10), (15, 30), (40, 20)):
        clock.now = now
        progress.update(count, note="3 rejected" if now == 40 else None)
    progress.close()
    progress.close()
    assert log.getvalue().splitlines() == [
        "convert: 20 of 100 documents (20%), 2.00 documents/s, elapsed 00:10, ETA 00:40",
        "convert: 70 of 100 documents (70%), 1.75 documents/s, elapsed 00:40, ETA 00:17 (3 rejected)",
        "convert: done, 70 documents in 00:40, 1.75 documents/s (3 rejected)"]


def test_scaled_counts_and_every_update_at_zero_seconds(monkeypatch):
    monkeypatch.setenv("MEGADOC_PROGRESS_SECONDS", "0")
    clock, log = FakeClock(), io.StringIO()
    with Progress("preprocess", 10_500_000, "bytes", scale=True, stream=log, clock=clock) as progress:
        progress.update(0)
        clock.now = 4
        progress.update(4_190_000)
    assert log.getvalue().splitlines() == [
        "preprocess: 0 of 10.5M bytes (0%), 0.00 bytes/s, elapsed 00:00, ETA ?",
        "preprocess: 4.19M of 10.5M bytes (40%), 1.05M bytes/s, elapsed 00:04, ETA 00:06",
        "preprocess: done, 4.19M bytes in 00:04, 1.05M bytes/s"]


def test_a_failed_block_prints_no_last_line_and_disabled_prints_nothing(monkeypatch):
    monkeypatch.setenv("MEGADOC_PROGRESS_SECONDS", "60")
    log = io.StringIO()
    with pytest.raises(KeyError):
        with Progress("merge", 3, "tokens", stream=log, clock=FakeClock()) as progress:
            progress.update(1)
            raise KeyError("boom")
    with Progress("synth", 3, "generations", enabled=False, stream=log) as progress:
        progress.update(3)
    assert log.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar():
    terminal = Terminal()
    with Progress("synth rephrase", 4, "generations", stream=terminal) as progress:
        progress.update(2, note="1 rejected")
    assert progress.bar is None and "synth rephrase" in terminal.getvalue() and "\r" in terminal.getvalue()
    assert "2/4" in terminal.getvalue() and "done," not in terminal.getvalue()


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_interval_is_named(monkeypatch, value):
    monkeypatch.setenv("MEGADOC_PROGRESS_SECONDS", value)
    with pytest.raises(InputError, match="MEGADOC_PROGRESS_SECONDS"):
        Progress("eval", 1, "tokens", stream=io.StringIO())


# --- each stage, its stderr a log (not a terminal), a line at every update

NUMBER = r"[\d.,]+[kMGT]?"


def assert_progress_lines(text: str, description: str, unit: str) -> None:
    """At least one line with done/total, rate and ETA, and the last line."""
    name = re.escape(description)
    line = re.compile(rf"{name}: {NUMBER} of {NUMBER} {unit} \(\d+%\), {NUMBER} {unit}/s, elapsed [\d:]+, ETA [\d:]+")
    done = re.compile(rf"{name}: done, {NUMBER} {unit} in [\d:]+, {NUMBER} {unit}/s")
    lines = text.splitlines()
    assert any(line.match(row) for row in lines) and any(done.match(row) for row in lines), text


@pytest.fixture()
def every_update(monkeypatch):
    monkeypatch.setenv("MEGADOC_PROGRESS_SECONDS", "0")


def test_preprocess_progress(every_update, golden, tmp_path, spm_model, capsys):
    from megadoc_megatron.data.preprocess import PreprocessConfig, preprocess

    preprocess(PreprocessConfig([str(golden / "golden_input.jsonl")], str(tmp_path / "out"), "SentencePieceTokenizer",
                                str(spm_model), workers=1, max_part_mb=0.1))
    err = capsys.readouterr().err
    assert_progress_lines(err, "preprocess", "bytes")
    assert re.search(r"ETA [\d:]+ \([\d,]+ documents\)", err)


def test_merge_progress(every_update, golden, tmp_path, capsys):
    dataset = str(golden / "megatron_out/hf_eod_text_document")
    for suffix in (".bin", ".idx"):
        shutil.copy(dataset + suffix, tmp_path / f"copy{suffix}")
    inputs = ["--input", dataset, str(tmp_path / "copy")]
    assert main(["merge", *inputs, "--output-prefix", str(tmp_path / "joined")]) == 0
    assert_progress_lines(capsys.readouterr().err, "merge", "tokens")
    assert main(["merge", *inputs, "--output-prefix", str(tmp_path / "half"), "--sample-fraction", "0.5"]) == 0
    assert_progress_lines(capsys.readouterr().err, "merge (sample)", "tokens")


def test_decontaminate_progress(every_update, tmp_path, capsys):
    held_out, records = tmp_path / "held.jsonl", tmp_path / "records.jsonl"
    held_out.write_text(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 3}) + "\n")
    records.write_text("".join(json.dumps({"text": f"record {i} says something else entirely"}) + "\n"
                               for i in range(5)))
    assert main(["decontaminate", str(records), "--held-out", str(held_out), "--report",
                 str(tmp_path / "report.json")]) == 0
    err = capsys.readouterr().err
    assert_progress_lines(err, "decontaminate (scan)", "records")
    assert_progress_lines(err, "decontaminate (report)", "records")


def test_synth_progress(every_update, tmp_path, hf_tokenizer, capsys):
    from test_cost import Recorder, run_recorded, synth_args, write_corpus

    from megadoc_megatron.synth.backends import load_chat_tokenizer

    args = synth_args(write_corpus(tmp_path), tmp_path / "out", hf_tokenizer, generations=1)
    run_recorded(args, Recorder(load_chat_tokenizer(hf_tokenizer)), progress=True)
    err = capsys.readouterr().err
    assert_progress_lines(err, "synth rephrase", "generations")
    assert re.search(r"ETA [\d:]+ \([\d.]+ documents/s, \d+ tokens/s, \d+ rejected\)", err)


def test_train_line_has_rate_elapsed_and_eta():
    from megadoc_megatron.train.metrics import StepLogger

    logger = StepLogger(SimpleNamespace(tensorboard_dir=None, wandb_project=None), None, 100, 10, {},
                        clock=FakeClock())
    logger.clock.now = 30
    row = {"iteration": 20, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1234.0,
           "tflops_per_device": 0.01}
    assert logger.line(row).endswith("1,234 tok/s | 0.01 TFLOP/s/device | elapsed 00:30, ETA 04:00")


def test_train_and_eval_progress(every_update, blend_json, tmp_path, capsys):
    config = Path(write_config(tmp_path, blend_json, tmp_path / "ckpt", logging={"eval_interval": 0},
                               checkpoint={"save_interval": 3}))
    config.write_text(json.dumps({**json.loads(config.read_text()), "train_iters": 3}))
    run_training(config)
    assert re.search(r"iteration +2/3 \| .* [\d,]+ tok/s \| .* elapsed [\d:]+, ETA [\d:]+$", capsys.readouterr().out,
                     re.MULTILINE)
    held_out = str(Path(blend_json).parent.parent / "held_text_document")
    assert main(["eval", "loss", str(tmp_path / "ckpt"), "--data", held_out]) == 0
    assert_progress_lines(capsys.readouterr().err, "eval", "tokens")
    assert main(["eval", "long-context", str(tmp_path / "ckpt"), "--data", held_out, "--threshold", "16"]) == 0
    assert_progress_lines(capsys.readouterr().err, "eval", "documents")
