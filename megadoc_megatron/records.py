"""The project's one JSONL reader: input discovery, (compressed) streams, line parsing.

Lines are handled as bytes and split on b"\\n" only, so a stray carriage return is
never taken for a line break and line numbers match what `sed -n Np` shows.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import math
import os
from pathlib import Path
from typing import BinaryIO, Iterator

from megadoc_megatron.errors import InputError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
COMPRESSED_SUFFIXES = (".gz", ".zst")


def write_text_atomic(path, text: str) -> None:
    """Write under a temporary name, sync, then rename: readers see the old file or the new one."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent writers never share it
    with open(temporary, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())  # a crash never leaves the new name on a short file
    os.replace(temporary, path)


def is_compressed(path) -> bool:
    return str(path).endswith(COMPRESSED_SUFFIXES)


def update_digest(digest, path, whole_up_to: float = math.inf) -> None:
    """Feed a file to a hash: its size, then its whole content if it holds at most `whole_up_to`
    bytes, else its first and last MiB (cheap for the large files a content key can skip)."""
    size = Path(path).stat().st_size
    digest.update(f"{size}\0".encode())
    with open(path, "rb") as stream:
        if size <= whole_up_to:
            for block in iter(lambda: stream.read(1 << 24), b""):
                digest.update(block)
        else:
            digest.update(stream.read(1 << 20))
            stream.seek(max(0, size - (1 << 20)))
            digest.update(stream.read(1 << 20))


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named by paths, globs or folders (searched recursively for JSONL), in sorted order; a
    file named twice (say by a relative and an absolute path, or by a glob and a folder) is read once."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(JSONL_SUFFIXES))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise InputError("no input files found", item,
                             fix=f"pass a file, a glob or a folder holding {', '.join(JSONL_SUFFIXES)} files")
        files.extend(path.resolve() for path in found)
    return list(dict.fromkeys(files))


def open_binary(path) -> BinaryIO:
    """A buffered binary stream of the (decompressed) file."""
    path = str(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.open(path, "rb"))
    return open(path, "rb")


def iter_lines(path, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Raw lines (with their b"\\n") of bytes [start, end) of a file; start must begin a line."""
    with open_binary(path) as stream:
        if start:
            stream.seek(start)
        remaining = None if end is None else end - start
        for line in stream:
            if remaining is not None:
                if remaining <= 0:
                    return
                remaining -= len(line)
            yield line


def line_starts(path, approximate_offsets: list[int]) -> list[int]:
    """For each offset, the start of the first line at or after it (uncompressed files only)."""
    starts = []
    with open(path, "rb") as stream:
        for offset in approximate_offsets:
            if offset == 0:
                starts.append(0)
                continue
            stream.seek(offset - 1)
            stream.readline()  # finish the line that holds offset - 1
            starts.append(stream.tell())
    return starts


def count_lines_before(path, offset: int) -> int:
    """Number of newline characters in the first `offset` bytes of the (decompressed) file."""
    count = 0
    with open_binary(path) as stream:
        while offset > 0:
            block = stream.read(min(offset, 1 << 24))
            if not block:
                break
            count += block.count(b"\n")
            offset -= len(block)
    return count


def parse_record(raw: bytes, path, line: int) -> dict:
    """One JSONL line as a dict, or an InputError naming the file, line and fix."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"invalid UTF-8 at byte {error.start} of the line", path, line,
                         fix="re-encode the file as UTF-8 or drop the line") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"malformed JSON: {error.msg} at column {error.colno}", path, line,
                         fix="write one complete JSON object per line") from None
    if not isinstance(record, dict):
        raise InputError(f"expected a JSON object, found {type(record).__name__}", path, line,
                         fix="write one JSON object per line")
    return record


# The record schema that travels from synthesis to megadoc assembly.
#   real document:  {"id": str, "text": str, ...}
#   generation:     see generation_record below; "split_char" (rationale only) is where in the
#                   source text the thought goes
#   megadoc:        {"id": str, "source_id": str, "kind": str, "generation_ids": [str],
#                    "original_chars": int, "text": str}
GENERATION_KEYS = {"id": str, "source_id": str, "operation": str, "index": int, "text": str}


def generation_record(*, source_id: str, operation: str, index: int, style: str, prompt_version: str,
                      generator: dict, seed: int, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                      text: str, source_input: dict, split_char: int | None = None) -> dict:
    """One generated text and its provenance: which document, operation, prompt (style and a hash of
    its text), generator (model, backend, sampling), generation index and seed produced it, how the
    source was fitted into the generator's window (`source_input`), and how generation ended."""
    record = {"id": f"{source_id}#{operation}{index}", "source_id": source_id, "operation": operation,
              "index": index, "style": style, "prompt_version": prompt_version, "generator": generator,
              "seed": seed, "finish_reason": finish_reason, "prompt_tokens": prompt_tokens,
              "completion_tokens": completion_tokens, "source_input": source_input, "text": text}
    if split_char is not None:
        record["split_char"] = split_char
    return record


def require_fields(record: dict, fields: dict, path, line: int, what: str) -> None:
    """Each field present with its type, or an InputError naming the file and line."""
    for key, kind in fields.items():
        if key not in record:
            raise InputError(f"{what} lacks the key {key!r}", path, line, fix=f"give every {what} a {key!r}")
        if not isinstance(record[key], kind) or isinstance(record[key], bool):
            raise InputError(f"{what} key {key!r} is a JSON {type(record[key]).__name__}, not {kind.__name__}",
                             path, line, fix=f"store {key!r} as a {kind.__name__}")


def iter_records_at_offsets(path) -> Iterator[tuple[int, int, dict]]:
    """(line number, byte offset, record) for every non-blank line of a plain JSONL file."""
    offset = 0
    for number, raw in enumerate(iter_lines(path), start=1):
        if raw.strip():
            yield number, offset, parse_record(raw, path, number)
        offset += len(raw)


def read_record_at(stream: BinaryIO, offset: int) -> dict:
    stream.seek(offset)
    return json.loads(stream.readline())
