"""Planning a run: the parts the inputs are cut into (whole compressed files; byte ranges of plain
files, cut at line starts), what a worker is told about them, what it reports back, and which
parts an earlier run already finished."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from megadoc_megatron import __version__
from megadoc_megatron.data.tokenizer import GigatokenEncoder, optimal_dtype, tokenizer_fingerprint
from megadoc_megatron.errors import InputError
from megadoc_megatron.jsonl import is_compressed, line_starts

MIN_PART_BYTES = 1 << 20
REFERENCE, GIGATOKEN = "reference", "gigatoken"


@dataclass(frozen=True)
class Options:
    """What a worker needs to convert any part (sent once to each worker)."""

    tokenizer_type: str
    tokenizer_model: str
    json_keys: tuple[str, ...]
    append_eod: bool
    skip_bad_lines: bool
    parts_dir: str
    backend: str  # REFERENCE or GIGATOKEN


@dataclass(frozen=True)
class Encoding:
    """What the loaded tokenizer says (gigatoken's is checked against the reference's), sent with each part."""

    eod: int
    vocab_size: int
    dtype: str
    probe: tuple[str, ...] = ()  # texts for the reference to check gigatoken on

    @classmethod
    def of(cls, tokenizer, probe=()) -> "Encoding":
        """For the reference tokenizer, or gigatoken's (checked against the reference's once it loads)."""
        return cls(tokenizer.eod, tokenizer.vocab_size, np.dtype(optimal_dtype(tokenizer.vocab_size)).name,
                   tuple(probe))


@dataclass(frozen=True)
class Part:
    """Bytes [start, end) of one input file (end None: to its end)."""

    index: int
    file_index: int
    path: str
    start: int
    end: int | None

    def stem(self, options: Options, tokenizer_fingerprint: str) -> str:
        """Part file name: changes whenever the input file or a setting that shapes tokens changes."""
        stat = os.stat(self.path)
        key = [self.path, stat.st_size, stat.st_mtime_ns, self.start, self.end, options.json_keys,
               options.append_eod, options.skip_bad_lines, tokenizer_fingerprint, options.backend, __version__]
        return f"part{self.index:06d}-" + hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]


@dataclass
class PartResult:
    index: int
    stem: str
    lines: int = 0
    blank_lines: int = 0
    documents: int = 0
    rejected: int = 0
    bytes: int = 0
    tokens: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # part file name -> size, checked before a marker is trusted
    read_in_rust: bool = False  # clean JSONL, read and tokenized by gigatoken; else line by line
    error: InputError | None = None
    sample: list | None = None  # [(label, text, ids)] for the reference to check; never in the marker

    def marker(self) -> str:
        return json.dumps(asdict(replace(self, sample=None, error=None)))


def cut_into_parts(files: list[Path], workers: int, max_part_bytes: int) -> list[Part]:
    """Cut plain files into byte ranges so that every worker has several parts to do."""
    plain_bytes = sum(f.stat().st_size for f in files if not is_compressed(f))
    # ~8 parts per worker: the last parts to finish leave little of the run to a single worker.
    part_bytes = min(max_part_bytes, max(MIN_PART_BYTES, math.ceil(plain_bytes / (8 * workers))))
    parts = []
    for file_index, path in enumerate(files):
        size = path.stat().st_size
        if is_compressed(path) or size <= part_bytes:
            ranges = [(0, None)]
        else:
            count = math.ceil(size / part_bytes)
            starts = sorted(set(line_starts(path, [size * i // count for i in range(count)])))
            starts = [s for s in starts if s < size]
            ranges = list(zip(starts, starts[1:] + [None]))
        for start, end in ranges:
            parts.append(Part(len(parts), file_index, str(path), start, end))
    return parts


def input_bytes(part: Part) -> int:
    """Bytes of the input file (compressed, if it is) that the part covers."""
    return (part.end or os.path.getsize(part.path)) - part.start


def shard_parts(parts: list[Part], shard: tuple[int, int] | None) -> list[Part]:
    """Array task `index` of `count` takes a contiguous run of the parts, so its dataset is the
    corpus's documents from one point to another, and the shards merge in task order."""
    if shard is None:
        return parts
    index, count = shard
    return parts[len(parts) * index // count:len(parts) * (index + 1) // count]


def finished_part(parts_dir: Path, stem: str) -> PartResult | None:
    """The result an earlier run recorded for a part, if its files are all there, whole."""
    marker = parts_dir / f"{stem}.done.json"
    if not marker.is_file():
        return None
    result = PartResult(**json.loads(marker.read_text()))
    if all(os.path.isfile(parts_dir / name) and os.path.getsize(parts_dir / name) == size
           for name, size in result.files.items()):
        return result
    marker.unlink()  # e.g. its token file was moved into an output that was never completed
    return None


def part_stems(parts, options: Options) -> dict[int, str]:
    fingerprint = tokenizer_fingerprint(options.tokenizer_type, Path(options.tokenizer_model))
    fingerprint += GigatokenEncoder.version() if options.backend == GIGATOKEN else ""
    return {part.index: part.stem(options, fingerprint) for part in parts}
