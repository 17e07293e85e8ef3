"""Shared fixtures: the golden Megatron-LM outputs and real tokenizers from ../shared/golden."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def golden_dir() -> Path:
    return Path(os.environ.get("MEGADOC_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden() -> Path:
    path = golden_dir()
    if not (path / "golden_input.jsonl").is_file():
        pytest.skip(f"golden reference files not found at {path} (set MEGADOC_GOLDEN_DIR)")
    return path


@pytest.fixture(scope="session")
def hf_tokenizer(golden) -> Path:
    return golden / "hf_tokenizer"


@pytest.fixture(scope="session")
def spm_model(golden) -> Path:
    return golden / "spm8k.model"


@pytest.fixture(scope="session")
def golden_lines(golden) -> list[bytes]:
    return (golden / "golden_input.jsonl").read_bytes().splitlines(keepends=True)


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
