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
    from megadoc_megatron.data.preprocess import preprocess

    path = tmp / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess([str(path)], str(tmp / name), tokenizer_type, str(model), append_eod=True, workers=1)
    return str(tmp / f"{name}_text_document")
