"""Assemble the synthetic stream from real documents and generation records.

- simple:  every rephrase is its own document (plus the original, unless --original none),
           shuffled across the corpus with --seed.
- stitch:  per source document, its G rephrases joined by --separator, with the original at the
           back (default, best in the paper), the front, or left out.
- stretch: the source document cut at its rationales' split points, each rationale wrapped in
           --think-open/--think-close: chunk0 <think>t1</think> chunk1 ... <think>tG</think> chunkG.

Records are read by byte offset from plain JSONL (compressed inputs are first copied to a plain
temporary file), so memory holds ids and offsets, never the generated texts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megadoc_megatron.data.tokenizer import load_tokenizer
from megadoc_megatron.errors import InputError
from megadoc_megatron.files import write_text_atomic
from megadoc_megatron.jsonl import (
    UniqueDocuments,
    expand_inputs,
    is_compressed,
    iter_records_at_offsets,
    open_binary,
    read_record_at,
    require_fields,
)
from megadoc_megatron.synth.records import GENERATION_KEYS

KINDS = ("simple", "stitch", "stretch")
OPERATIONS_OF_KIND = {"simple": ("rephrase", "textbook"), "stitch": ("rephrase",), "stretch": ("rationale",)}


@dataclass
class MegadocsConfig:
    """The settings of `megadoc megadocs`."""
    kind: str                             # simple | stitch | stretch
    real: list[str]                       # real documents: JSONL files, globs or folders
    generations: list[str]                # generation records of `megadoc synth`
    output: str                           # output JSONL (its .summary.json is written beside it)
    original: str = "back"                # stitch: back | front | none; simple: none leaves it out
    separator: str = "\n\n"               # stitch: text between the parts
    order: str = "index"                  # stitch: index | shuffle
    seed: int = 0
    think_open: str = "<think>"
    think_close: str = "</think>"
    max_generations: int | None = None    # simple/stitch: only generations with index below this
    allow_uneven: bool = False            # accept documents with other numbers of generations
    id_key: str = "id"
    text_key: str = "text"
    tokenizer_type: str | None = None     # report token lengths with this tokenizer
    tokenizer_model: str | None = None


@dataclass
class Megadoc:
    """One output record (megadocs.jsonl): a megadoc, a simple rephrase, or an original."""
    id: str
    source_id: str
    kind: str  # simple | original | stitch | stretch
    generation_ids: list[str]
    original_chars: int  # characters of real text inside it
    text: str


@dataclass
class MegadocsSummary:
    """OUTPUT.summary.json: what was assembled; `megadoc blend` reads the share of real text from it."""
    documents: int
    chars: int
    original_chars: int
    chars_per_document: dict
    tokens_per_document: dict | None
    kind: str = ""
    sources: int = 0
    generations_per_document: int = 0
    generations: int = 0
    output: str = ""
    settings: dict = field(default_factory=dict)

    @staticmethod
    def path_of(output) -> Path:
        return Path(f"{output}.summary.json")

    def save(self) -> None:
        write_text_atomic(self.path_of(self.output), json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, output) -> "MegadocsSummary":
        return cls(**json.loads(cls.path_of(output).read_text()))


@dataclass(frozen=True)
class Pointer:
    file: int
    offset: int


@dataclass(frozen=True)
class Generation:
    index: int
    pointer: Pointer
    id: str
    split_char: int | None
    path: str  # where the record is, for messages
    line: int


class RecordStore:
    """JSONL files read by byte offset; compressed ones are spooled to plain copies first."""

    def __init__(self, spool_dir: Path):
        self.spool_dir, self.paths, self.names, self._streams = spool_dir, [], [], {}

    def scan(self, path: Path):
        """Register a file; yields (file index, line, offset, record) for each record."""
        readable = path
        if is_compressed(path):
            readable = self.spool_dir / f"{len(self.paths)}.jsonl"
            with open_binary(path) as source, open(readable, "wb") as copy:
                shutil.copyfileobj(source, copy, 1 << 24)
        self.paths.append(readable)
        self.names.append(str(path))
        file_index = len(self.paths) - 1
        for line, offset, record in iter_records_at_offsets(readable):
            yield file_index, line, offset, record

    def read(self, pointer: Pointer) -> dict:
        if pointer.file not in self._streams:
            self._streams[pointer.file] = open(self.paths[pointer.file], "rb")
        return read_record_at(self._streams[pointer.file], pointer.offset)

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()


def _index_real(store: RecordStore, paths, id_key: str, text_key: str) -> dict[str, Pointer]:
    documents, check = {}, UniqueDocuments(id_key, text_key)
    for path in paths:
        for file_index, line, offset, record in store.scan(path):
            documents[check.check(record, path, line)] = Pointer(file_index, offset)
    return documents


def _index_generations(store: RecordStore, paths, kind: str, real: dict,
                       max_generations: int | None = None) -> dict[str, list[Generation]]:
    """Generation records by source document; with `max_generations`, only indices below it. Records
    the quality gates rejected (`reject_reason`, in a synth folder's shard-N.rejected.jsonl) are skipped."""
    expected = OPERATIONS_OF_KIND[kind]
    by_source: dict[str, list[Generation]] = defaultdict(list)
    seen: dict[tuple[str, int], str] = {}
    for path in paths:
        for file_index, line, offset, record in store.scan(path):
            require_fields(record, GENERATION_KEYS, path, line, "generation record")
            if "reject_reason" in record:
                continue
            if record["operation"] not in expected:
                raise InputError(f"{kind} megadocs are built from {' or '.join(expected)} records, this one is a "
                                 f"{record['operation']!r}", path, line,
                                 fix=f"pass the {' or '.join(expected)} records of `megadoc synth`")
            if kind == "stretch":
                require_fields(record, {"split_char": int}, path, line, "rationale record")
            source = record["source_id"]
            if source not in real:
                raise InputError(f"generation for source document {source!r}, which is not among the real documents",
                                 path, line, fix="pass the real corpus that was given to `megadoc synth`")
            if max_generations is not None and record["index"] >= max_generations:
                continue
            key = (source, record["index"])
            if key in seen:
                raise InputError(f"a second generation with index {record['index']} for document {source!r} "
                                 f"(the first is at {seen[key]})", path, line, fix="remove the duplicate generation")
            seen[key] = f"{path}:{line}"
            by_source[source].append(Generation(record["index"], Pointer(file_index, offset), record["id"],
                                                record.get("split_char"), str(path), line))
    return by_source


def _check_uniform(real: dict, generations: dict, allow_uneven: bool) -> int:
    """The number G of generations per document; all documents must have G unless allowed."""
    counts = Counter(len(generations.get(source, ())) for source in real)
    common = counts.most_common(1)[0][0]
    if len(counts) > 1 and not allow_uneven:
        odd = next(s for s in real if len(generations.get(s, ())) != common)
        raise InputError(f"document {odd!r} has {len(generations.get(odd, ()))} generations while most have {common} "
                         f"(counts: {dict(sorted(counts.items()))})",
                         fix="complete the missing generations, or pass --allow-uneven to accept them")
    return common


def stitch(original: str, rephrases: list[str], original_position: str, separator: str) -> tuple[str, int]:
    parts = {"back": rephrases + [original], "front": [original] + rephrases, "none": rephrases}[original_position]
    return separator.join(parts), (0 if original_position == "none" else len(original))


def stretch(original: str, rationales: list[tuple[int, str]], think_open: str, think_close: str) -> str:
    pieces, start = [], 0
    for split, thought in rationales:
        pieces += [original[start:split], think_open, thought.strip(), think_close]
        start = split
    return "".join(pieces + [original[start:]])


def _ordered(generations: list[Generation], order: str, seed: int, source: str) -> list[Generation]:
    ordered = sorted(generations, key=lambda g: g.index)
    if order == "shuffle":
        random.Random(f"{seed}:{source}").shuffle(ordered)
    return ordered


def _stretch_splits(source: str, text: str, generations: list[Generation]) -> list[Generation]:
    ordered = sorted(generations, key=lambda g: g.split_char)
    for previous, current in zip([None] + ordered, ordered):
        if not 0 <= current.split_char <= len(text):
            raise InputError(f"split_char {current.split_char} lies outside document {source!r} "
                             f"({len(text)} characters)",
                             current.path, current.line,
                             fix="regenerate the rationales from this version of the document")
        if previous is not None and previous.split_char == current.split_char:
            raise InputError(f"two rationales of document {source!r} share split_char {current.split_char} "
                             f"(also at {previous.path}:{previous.line})", current.path, current.line,
                             fix="keep one rationale per split point")
    return ordered


def _megadoc_rows(store, real, generations, config: MegadocsConfig):
    """Yield the output records (before the global shuffle of `simple`)."""
    for source, pointer in real.items():
        original = store.read(pointer)[config.text_key]
        gens = generations.get(source, [])
        if config.kind == "simple":
            for g in _ordered(gens, "index", config.seed, source):
                yield Megadoc(g.id, source, "simple", [g.id], 0, store.read(g.pointer)["text"])
            if config.original != "none":
                yield Megadoc(f"{source}#original", source, "original", [], len(original), original)
        elif config.kind == "stitch":
            ordered = _ordered(gens, config.order, config.seed, source)
            text, original_chars = stitch(original, [store.read(g.pointer)["text"] for g in ordered],
                                          config.original, config.separator)
            yield Megadoc(f"{source}#stitch", source, "stitch", [g.id for g in ordered], original_chars, text)
        else:
            ordered = _stretch_splits(source, original, gens)
            text = stretch(original, [(g.split_char, store.read(g.pointer)["text"]) for g in ordered],
                           config.think_open, config.think_close)
            yield Megadoc(f"{source}#stretch", source, "stretch", [g.id for g in ordered], len(original), text)


def length_stats(lengths: list[int]) -> dict:
    values = np.asarray(lengths, dtype=np.int64)
    if len(values) == 0:
        return {}
    return {"min": int(values.min()), "mean": float(values.mean()), "median": float(np.median(values)),
            "p90": float(np.percentile(values, 90)), "max": int(values.max()), "total": int(values.sum())}


def build_megadocs(config: MegadocsConfig) -> MegadocsSummary:
    """Write the megadocs of `config.kind` to `config.output` (atomically) and its summary beside it."""
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(config.tokenizer_type, config.tokenizer_model) if config.tokenizer_type else None
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as spool:
        store = RecordStore(Path(spool))
        try:
            real = _index_real(store, expand_inputs(config.real), config.id_key, config.text_key)
            if not real:
                raise InputError("the real documents hold no documents", ", ".join(config.real),
                                 fix="check the --input paths (blank lines are not documents)")
            if config.max_generations is not None and (config.kind == "stretch" or config.max_generations < 1):
                raise InputError(f"--max-generations {config.max_generations} is not possible for "
                                 f"{config.kind} megadocs",
                                 fix="give a positive number; stretch megadocs take every rationale "
                                     "(generate with -G N)")
            generations = _index_generations(store, expand_inputs(config.generations), config.kind, real,
                                             config.max_generations)
            per_document = _check_uniform(real, generations, config.allow_uneven)
            rows = _megadoc_rows(store, real, generations, config)
            if config.kind == "simple":  # shuffle across the corpus: keep offsets, not texts
                rows = _shuffled(rows, Path(spool), config.seed)
            temporary = Path(spool) / "megadocs.jsonl"
            counts = _write(rows, temporary, tokenizer)
            os.replace(temporary, output)
        finally:
            store.close()
    summary = MegadocsSummary(
        **counts, kind=config.kind, sources=len(real), generations_per_document=per_document,
        generations=sum(len(g) for g in generations.values()), output=str(output),
        settings={k: getattr(config, k) for k in ("original", "separator", "order", "seed", "think_open",
                                                "think_close", "allow_uneven", "max_generations")})
    summary.save()
    return summary


def _shuffled(rows, spool: Path, seed: int):
    unshuffled = spool / "unshuffled.jsonl"
    offsets = []
    with open(unshuffled, "wb") as out:
        for row in rows:
            offsets.append(out.tell())
            out.write(json.dumps(asdict(row), ensure_ascii=False).encode() + b"\n")
    random.Random(seed).shuffle(offsets)
    with open(unshuffled, "rb") as stream:
        for offset in offsets:
            yield Megadoc(**read_record_at(stream, offset))


def _write(rows, path: Path, tokenizer, batch: int = 256) -> dict:
    chars, tokens, originals, pending = [], [], 0, []

    def count_tokens():
        tokens.extend(len(ids) for ids in tokenizer.encode_batch(pending))
        pending.clear()

    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
            chars.append(len(row.text))
            originals += row.original_chars
            if tokenizer is not None:
                pending.append(row.text)
                if len(pending) >= batch:
                    count_tokens()
    if tokenizer is not None and pending:
        count_tokens()
    return {"documents": len(chars), "chars": sum(chars), "original_chars": originals,
            "chars_per_document": length_stats(chars),
            "tokens_per_document": length_stats(tokens) if tokenizer is not None else None}
