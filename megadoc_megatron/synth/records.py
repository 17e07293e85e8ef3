"""The generation record: one line of a `megadoc synth` shard, read back by its resume and by
`megadoc megadocs`. Records made by other tools are accepted by megadocs when they hold at least
GENERATION_KEYS (with "split_char" for rationales)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

GENERATION_KEYS = {"id": str, "source_id": str, "operation": str, "index": int, "text": str}


@dataclass
class GenerationRecord:
    """One generated text and its provenance: which document, operation, prompt (style and a hash of
    its text), generator (model, backend, sampling), generation index and seed produced it, how the
    source was fitted into the generator's window (`source_input`), and how generation ended."""
    source_id: str
    operation: str
    index: int
    style: str
    prompt_version: str
    generator: dict
    seed: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    source_input: dict
    text: str
    split_char: int | None = None     # rationale only: where in the source text the thought goes
    reject_reason: str | None = None  # set in shard-K.rejected.jsonl: the quality gate it failed

    @property
    def id(self) -> str:
        return f"{self.source_id}#{self.operation}{self.index}"

    def to_json(self) -> str:
        values = {"id": self.id, **asdict(self)}
        for optional in ("split_char", "reject_reason"):
            if values[optional] is None:
                del values[optional]
        return json.dumps(values, ensure_ascii=False)

    @classmethod
    def from_json(cls, line) -> "GenerationRecord":
        values = json.loads(line)
        values.pop("id")
        return cls(**values)
