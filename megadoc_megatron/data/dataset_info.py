"""The `.json` sidecar `megadoc preprocess` (and `megadoc merge`) writes beside every dataset, and the
naming of its files: what it was made from and with which tokenizer. Datasets made by Megatron-LM
itself have none."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megadoc_megatron.errors import InputError
from megadoc_megatron.files import write_text_atomic


def dataset_prefix(output_prefix, json_key: str) -> str:
    """Megatron-LM's name for the dataset of one JSON key: PREFIX_{key}_document(.bin/.idx)."""
    return f"{output_prefix}_{json_key}_document"


@dataclass
class DatasetInfo:
    prefix: str
    documents: int
    tokens: int
    inputs: list[str]          # the JSONL files it was converted from
    json_key: str
    append_eod: bool
    dtype: str
    tokenizer: dict            # type, model, fingerprint, vocab_size, eod (data/tokenizer.py's describe())
    created_by: str
    merged_from: list[str] = field(default_factory=list)  # `megadoc merge`: the datasets joined, in order
    sampled: dict | None = None  # `megadoc merge --sample-fraction`: {"fraction", "seed"} of the documents kept

    @staticmethod
    def path_of(prefix) -> Path:
        return Path(f"{prefix}.json")

    @classmethod
    def load(cls, prefix) -> "DatasetInfo | None":
        """The sidecar of a dataset, or None when it has none."""
        path = cls.path_of(prefix)
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            raise InputError(f"not a dataset sidecar of `megadoc preprocess` ({error})", path,
                             fix="convert the dataset again, or delete the .json to use it without one") from None

    def save(self) -> None:
        values = asdict(self)
        for name in ("merged_from", "sampled"):
            if not values[name]:
                del values[name]
        write_text_atomic(self.path_of(self.prefix), json.dumps(values, indent=2) + "\n")

    def load_tokenizer(self):
        from megadoc_megatron.data.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer["type"], self.tokenizer["model"])


def recorded_tokenizer(prefix):
    """The tokenizer `megadoc preprocess` recorded beside a dataset, or None (e.g. made by Megatron-LM)."""
    info = DatasetInfo.load(prefix)
    return info.load_tokenizer() if info else None
