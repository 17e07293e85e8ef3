"""A killed conversion leaves no dataset a trainer could load and resumes from its finished parts;
`megadoc inspect` reports what is in a dataset."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from megadoc_megatron.cli import main
from megadoc_megatron.data.inspect import inspect_dataset


def preprocess_command(path, prefix, model):
    return [sys.executable, "-m", "megadoc_megatron.cli", "preprocess", "--input", str(path),
            "--output-prefix", str(prefix), "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", str(model), "--append-eod", "--workers", "1", "--max-part-mb", "0.25"]


@pytest.mark.e2e
def test_killed_run_leaves_nothing_loadable_and_resumes(tmp_path, golden_lines, spm_model):
    path = tmp_path / "input.jsonl"
    path.write_bytes(b"".join(golden_lines) * 8)
    prefix = tmp_path / "out"
    run = subprocess.Popen(preprocess_command(path, prefix, spm_model), cwd=REPO, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts_dir = tmp_path / "out.parts"
    deadline = time.monotonic() + 120
    while len(list(parts_dir.glob("*.done.json"))) < 2 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    finished = len(list(parts_dir.glob("*.done.json")))
    assert finished >= 2 and run.returncode == -signal.SIGKILL, "the run ended before it was killed"
    assert not list(tmp_path.glob("out_*.idx")) and not list(tmp_path.glob("out_*.bin"))

    resumed = subprocess.run(preprocess_command(path, prefix, spm_model), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    resumed_parts = re.search(r"resuming: (\d+) of (\d+) parts", resumed.stderr)
    assert resumed_parts and int(resumed_parts[1]) == finished < int(resumed_parts[2])
    assert not parts_dir.exists()
    reference = subprocess.run(preprocess_command(path, tmp_path / "ref", spm_model), cwd=REPO, capture_output=True)
    assert reference.returncode == 0
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"out_text_document{suffix}").read_bytes() == (
            tmp_path / f"ref_text_document{suffix}").read_bytes()


def test_inspect_reports_counts_and_decodes(golden, tmp_path, hf_tokenizer, capsys):
    assert main(["preprocess", "--input", str(golden / "golden_input.jsonl"), "--output-prefix", str(tmp_path / "hf"),
                 "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(hf_tokenizer),
                 "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "hf_text_document"), "--document", "43"]) == 0
    report = capsys.readouterr().out
    assert "documents        66 (1 empty)" in report
    assert "sequences        65" in report
    assert "tokens           136,164" in report
    assert "dtype            uint16" in report
    assert "[  16,384,   32,768)" in report  # the ~200 KB document
    assert "Line one.\r\nLine two.\r\n\r\nParagraph two." in report  # byte-level BPE decodes exactly


def test_inspect_rejects_bad_prefix_and_document(golden, tmp_path):
    from megadoc_megatron.errors import InputError

    with pytest.raises(InputError, match="dataset file not found"):
        inspect_dataset(tmp_path / "missing_text_document")
    prefix = golden / "megatron_out" / "spm_eod_text_document"
    with pytest.raises(InputError, match="out of range"):
        inspect_dataset(prefix, document=66)
    report = inspect_dataset(prefix, document=0)  # Megatron-LM's own output: no tokenizer recorded
    assert "pass --tokenizer-type/--tokenizer-model to decode" in report


@pytest.mark.e2e
def test_killed_worker_fails_the_run_instead_of_hanging(tmp_path, golden_lines, spm_model):
    psutil = pytest.importorskip("psutil")
    path = tmp_path / "input.jsonl"
    path.write_bytes(b"".join(golden_lines) * 8)
    run = subprocess.Popen(preprocess_command(path, tmp_path / "out", spm_model), cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    workers = []
    while not workers and time.monotonic() < deadline:
        workers = psutil.Process(run.pid).children()  # forked from the main process
        time.sleep(0.05)
    assert workers, "no worker process appeared"
    workers[0].kill()  # as the OOM killer would
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 2 and "a worker process died" in stderr.splitlines()[-1]
    assert not list(tmp_path.glob("out_*.idx"))
