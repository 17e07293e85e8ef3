"""The worker side: one part converted, in a worker process, into its token and length files, by
gigatoken in one call (`_convert_whole`) or line by line (`_convert_batch`); with gigatoken, a
sample of the part's documents and their ids comes back for the main process to check."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from megadoc_megatron.data.preprocess.parts import (
    GIGATOKEN,
    REFERENCE,
    Encoding,
    Options,
    Part,
    PartResult,
    input_bytes,
)
from megadoc_megatron.data.tokenizer import GigatokenEncoder, load_tokenizer
from megadoc_megatron.errors import InputError
from megadoc_megatron.files import write_text_atomic
from megadoc_megatron.jsonl import is_compressed, iter_lines, open_binary, parse_record, require_fields

BATCH_LINES = 512
BATCH_BYTES = 4 << 20
SAMPLE_CHARS = 1 << 13  # of each part's first documents, re-encoded by the reference to check gigatoken
SAMPLE_LINES = 256  # the documents to check are picked among a part's first lines
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Child processes are forked where that is safe (Linux): they start at once, inherit what this
# process loaded, and a caller's script needs no `if __name__ == "__main__"` guard.
START_METHOD = "fork" if sys.platform == "linux" else "spawn"

state: dict = {}  # what this worker process holds: its options, its encoder, the part's encoding


def init_worker(options: Options) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    state["options"] = options
    if options.backend == REFERENCE:
        state["encoder"] = load_tokenizer(options.tokenizer_type, options.tokenizer_model)
        return
    try:
        state["encoder"] = GigatokenEncoder(Path(options.tokenizer_model))
    except InputError:
        raise
    except Exception as error:  # it refuses some tokenizers: then the reference does the work
        state["encoder"], state["refused"] = None, str(error).strip().splitlines()[0]


def _texts_of(record: dict, keys, path, line) -> list[str]:
    require_fields(record, dict.fromkeys(keys, str), path, line, "record")
    texts = []
    for key in keys:
        value = record[key]
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:
                raise InputError(f"the value of {key!r} holds a lone surrogate escape at character {error.start}",
                                 path, line, fix="remove or pair the \\uD800-\\uDFFF escape") from None
        texts.append(value)
    return texts


def _append_eod(tokens: np.ndarray, lengths: np.ndarray, eod: int) -> tuple[np.ndarray, np.ndarray]:
    nonempty = lengths > 0
    return np.insert(tokens, np.cumsum(lengths)[nonempty], eod), lengths + nonempty


def _out_of_vocab_documents(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int) -> np.ndarray:
    bad = (tokens < 0) | (tokens >= vocab_size)
    if not bad.any():
        return np.zeros(0, dtype=np.int64)
    document_of_token = np.repeat(np.arange(len(lengths)), lengths)
    return np.unique(document_of_token[bad])


class _PartWriter:
    """Token and length files of one part, one pair per JSON key, plus rejected lines."""

    def __init__(self, parts_dir: Path, stem: str, keys, dtype):
        self.dtype = dtype
        self.tokens = {key: open(parts_dir / f"{stem}.{key}.tokens", "wb") for key in keys}
        self.lengths = {key: open(parts_dir / f"{stem}.{key}.lengths", "wb") for key in keys}
        self.rejects = open(parts_dir / f"{stem}.rejects.jsonl", "w", encoding="utf-8")

    def reject(self, line: int, raw: bytes, error: InputError) -> None:
        record = {"line": line, "reason": error.message,
                  "text": raw.rstrip(b"\r\n").decode("utf-8", "backslashreplace")}
        self.rejects.write(json.dumps(record, ensure_ascii=False) + "\n")

    def write(self, key: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        # gigatoken's uint32 ids, all checked below the vocabulary size, are the same bits as int32
        same_width = tokens.dtype.kind in "iu" and tokens.dtype.itemsize == np.dtype(self.dtype).itemsize
        (tokens.view(self.dtype) if same_width else tokens.astype(self.dtype)).tofile(self.tokens[key])
        lengths.astype(np.int32).tofile(self.lengths[key])

    def close(self, durable: bool = False) -> dict:
        """Close every file (on disk for good if `durable`); returns their names and sizes."""
        streams = [*self.tokens.values(), *self.lengths.values(), self.rejects]
        for stream in streams:
            stream.flush()
            if durable and stream.tell():  # an empty file has nothing to lose (its marker says 0 bytes)
                os.fsync(stream.fileno())
            stream.close()
        return {Path(stream.name).name: os.path.getsize(stream.name) for stream in streams}


def _records_fast(batch: list[tuple[int, bytes]], keys) -> tuple[list, list, list] | None:
    """The batch's lines, raw lines and texts when every non-blank line is a good record, else
    None (then `_records_checked` finds which lines are bad, and why)."""
    kept = [(line, raw) for line, raw in batch if not raw.isspace()]
    if any(SURROGATE_ESCAPE.search(raw) for _, raw in kept):
        return None
    try:
        records = [json.loads(raw.decode("utf-8")) for _, raw in kept]
        texts = [[record[key] for key in keys] for record in records]
    except (ValueError, KeyError, TypeError, IndexError):  # bad UTF-8 or JSON, missing key, not an object
        return None
    if not all(type(text) is str for row in texts for text in row):
        return None
    return [line for line, _ in kept], [raw for _, raw in kept], texts


def _records_checked(batch, part: Part, writer: _PartWriter, result: PartResult) -> tuple[list, list, list]:
    """Line by line, naming what is wrong with each bad line (rejected, or raised)."""
    options = state["options"]
    lines, raws, texts = [], [], []
    for line, raw in batch:
        if raw.isspace():
            continue
        try:
            texts.append(_texts_of(parse_record(raw, part.path, line), options.json_keys, part.path, line))
        except InputError as error:
            if not options.skip_bad_lines:
                raise
            writer.reject(line, raw, error)
            result.rejected += 1
            continue
        lines.append(line)
        raws.append(raw)
    return lines, raws, texts


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tokens, lengths = state["encoder"].encode_flat(texts)
    return _with_eod(tokens, lengths)


def _with_eod(tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not state["options"].append_eod:
        return tokens, lengths
    return _append_eod(tokens, lengths, state["encoding"].eod)


def _convert_batch(batch: list[tuple[int, bytes]], part: Part, writer: _PartWriter, result: PartResult) -> None:
    options = state["options"]
    result.blank_lines += sum(1 for _, raw in batch if raw.isspace())
    lines, raws, texts = _records_fast(batch, options.json_keys) or _records_checked(batch, part, writer, result)
    arrays = {key: _encode([row[column] for row in texts]) for column, key in enumerate(options.json_keys)}
    if result.sample is None and options.backend == GIGATOKEN:
        result.sample = _sample(texts, lines)
    keep = np.ones(len(lines), dtype=bool)
    vocab_size = state["encoding"].vocab_size
    for key, (tokens, lengths) in arrays.items():
        for document in _out_of_vocab_documents(tokens, lengths, vocab_size):
            error = InputError(f"a token id of {key!r} is outside the vocabulary (size {vocab_size})",
                               part.path, lines[document],
                               fix="use the tokenizer whose vocabulary covers its own ids (check added tokens)")
            if not options.skip_bad_lines:
                raise error
            if keep[document]:
                writer.reject(lines[document], raws[document], error)
                result.rejected += 1
                keep[document] = False
    for key, (tokens, lengths) in arrays.items():
        if not keep.all():
            tokens, lengths = tokens[np.repeat(keep, lengths)], lengths[keep]
        writer.write(key, tokens, lengths)
        result.tokens[key] = result.tokens.get(key, 0) + int(lengths.sum())
    result.documents += int(keep.sum())


def _sample(texts, lines) -> list:
    """The probe and the part's first documents, with gigatoken's ids, for the main process to check
    against the reference tokenizer (the line-by-line path)."""
    chosen = _fitting((f"line {line}", text) for row, line in zip(texts, lines) for text in row)
    ids = state["encoder"].encode_batch([text for _, text in chosen])
    return _probe_sample() + [(label, text, list(i)) for (label, text), i in zip(chosen, ids)]


def _fitting(candidates) -> list:
    """The first (label, text, ...) whose texts fit together in SAMPLE_CHARS (longer ones are
    skipped), among the first SAMPLE_LINES."""
    chosen, chars = [], 0
    for candidate in itertools.islice(candidates, SAMPLE_LINES):
        if chars + len(candidate[1]) <= SAMPLE_CHARS:
            chosen.append(candidate)
            chars += len(candidate[1])
    return chosen


def _batches(part: Part):
    batch, size = [], 0
    for line, raw in enumerate(iter_lines(part.path, part.start, part.end), start=1):
        batch.append((line, raw))
        size += len(raw)
        if len(batch) >= BATCH_LINES or size >= BATCH_BYTES:
            yield batch, size
            batch, size = [], 0
    yield batch, size


def convert_part(job: tuple[Part, str, Encoding]) -> PartResult:
    """Convert one part, in a worker. Bad input comes back in `error` (line numbers within the part)."""
    part, stem, state["encoding"] = job
    options = state["options"]
    result = PartResult(part.index, stem)
    parts_dir = Path(options.parts_dir)
    writer = _PartWriter(parts_dir, stem, options.json_keys, state["encoding"].dtype)
    try:
        if not (options.backend == GIGATOKEN and _convert_whole(part, writer, result)):
            for batch, size in _batches(part):
                _convert_batch(batch, part, writer, result)
                result.lines += len(batch)
                result.bytes += size
    except InputError as error:
        result.error = error
        writer.close()
        return result
    except BaseException:
        writer.close()
        raise
    result.files = writer.close(durable=True)
    write_text_atomic(parts_dir / f"{stem}.done.json", result.marker())  # after its files are on disk
    return result


def _convert_whole(part: Part, writer: _PartWriter, result: PartResult) -> bool:
    """The part read and tokenized by gigatoken in Rust, when it is clean JSONL: every line one
    `{...}` naming each key once (or empty), every such line read as a document, every id in the
    vocabulary. Otherwise nothing is written and False comes back (the line-by-line path then names
    any bad line)."""
    options = state["options"]
    with _readable_copy(part) as path:
        counts = _clean_line_counts(path, options.json_keys) if path else None
        if not counts or not counts[0]:
            return False
        arrays = {key: state["encoder"].encode_jsonl(path, key) for key in options.json_keys}
    documents, blank_lines = counts
    if any(len(lengths) != documents or (len(tokens) and tokens.max() >= state["encoding"].vocab_size)
           for tokens, lengths in arrays.values()):
        return False
    try:
        result.sample = _sample_of_part(part, arrays[options.json_keys[0]], options.json_keys[0])
    except InputError:  # a line gigatoken read but Python's json refuses: line by line, it is named
        return False
    for key, (tokens, lengths) in arrays.items():
        writer.write(key, *_with_eod(tokens, lengths))
        result.tokens[key] = int(lengths.sum()) + (int(np.count_nonzero(lengths)) if options.append_eod else 0)
    result.documents, result.blank_lines, result.lines = documents, blank_lines, documents + blank_lines
    result.read_in_rust = True
    result.bytes = input_bytes(part)
    return True


@contextlib.contextmanager
def _readable_copy(part: Part):
    """A path holding exactly the part's bytes: the file itself, or for a byte range an in-memory
    copy made by the kernel (Linux memfd; None elsewhere)."""
    if part.start == 0 and part.end is None:
        yield part.path
        return
    if not hasattr(os, "memfd_create") or is_compressed(part.path):
        yield None
        return
    copy = os.memfd_create("megadoc-part")
    try:
        with open(part.path, "rb") as source:
            offset, end = part.start, part.start + input_bytes(part)
            while offset < end:
                sent = os.sendfile(copy, source.fileno(), offset, end - offset)
                if not sent:
                    break
                offset += sent
        yield f"/proc/self/fd/{copy}"
    finally:
        os.close(copy)


def _clean_line_counts(path: str, keys) -> tuple[int, int] | None:
    """(documents, empty lines) of the JSONL file if each line is `{...}` holding every key exactly
    once as a quoted string, or empty (gigatoken skips those, as we do), else None. Blocks end at
    line ends, so memory stays flat."""
    patterns = [json.dumps(key).encode() for key in keys]
    documents = empty = 0
    carry = b""
    with open_binary(path) as stream:
        while True:
            block = stream.read(1 << 24)
            data = carry + block
            cut = len(data) if not block else data.rfind(b"\n") + 1
            if cut:
                counts = _clean_lines(data[:cut], patterns)
                if counts is None:
                    return None
                documents, empty = documents + counts[0], empty + counts[1]
            carry = data[cut:]
            if not block:
                return documents, empty


def _clean_lines(chunk: bytes, patterns) -> tuple[int, int] | None:
    array = np.frombuffer(chunk, dtype=np.uint8)
    ends = np.flatnonzero(array == ord("\n"))
    if not chunk.endswith(b"\n"):
        ends = np.append(ends, len(chunk))
    starts = np.concatenate([[0], ends[:-1] + 1])
    filled = ends > starts
    starts, ends = starts[filled], ends[filled]
    if np.any(ends - starts < 2):  # a lone character, "\r" among them: whitespace gigatoken stops at
        return None
    last = ends - 1
    last = last - (array[last] == ord("\r"))
    if not ((array[starts] == ord("{")).all() and (array[last] == ord("}")).all()):
        return None
    if not all(chunk.count(pattern) == len(starts) for pattern in patterns):
        return None
    return len(starts), int(np.count_nonzero(~filled))


def _sample_of_part(part: Part, arrays, key: str) -> list:
    """The probe and the part's first documents as Python's json reads them, with the ids gigatoken
    gave: the main process checks both the reading and the tokenizing against the reference."""
    tokens, lengths = arrays
    ends = np.cumsum(lengths)
    filled = ((line, raw) for line, raw in enumerate(iter_lines(part.path, part.start, part.end), start=1)
              if raw.strip())
    chosen = _fitting((f"line {line}", parse_record(raw, part.path, line)[key], document)
                      for document, (line, raw) in enumerate(filled))
    return _probe_sample() + [(label, text, tokens[ends[document] - lengths[document]:ends[document]].tolist())
                              for label, text, document in chosen]


def _probe_sample() -> list:
    if state.get("probe_sent"):  # once per worker: it never changes
        return []
    state["probe_sent"] = True
    probe = state["encoding"].probe
    return list(zip(["a probe text"] * len(probe), probe, state["encoder"].encode_batch(list(probe))))
