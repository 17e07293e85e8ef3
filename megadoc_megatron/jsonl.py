"""The project's one JSONL reader: input discovery, (compressed) streams, line parsing.

Lines are handled as bytes and split on b"\\n" only, so a stray carriage return is
never taken for a line break and line numbers match what `sed -n Np` shows.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from pathlib import Path
from typing import BinaryIO, Iterator

from megadoc_megatron.errors import InputError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
COMPRESSED_SUFFIXES = (".gz", ".zst")


def is_compressed(path) -> bool:
    return str(path).endswith(COMPRESSED_SUFFIXES)


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


JSON_NAMES = {str: "string", int: "integer", float: "number", list: "list", dict: "object"}


def require_fields(record: dict, fields: dict, path, line: int, what: str) -> None:
    """The project's one key/type check of a JSONL record: each field present with its type, or an
    InputError naming the file and line."""
    for key, kind in fields.items():
        if key not in record:
            raise InputError(f"{what} lacks the key {key!r}", path, line, fix=f"give every {what} a {key!r}")
        if not isinstance(record[key], kind) or isinstance(record[key], bool):
            raise InputError(f"the value of {key!r} is a JSON {type(record[key]).__name__}, not a {JSON_NAMES[kind]}",
                             path, line, fix=f"store {key!r} as a JSON {JSON_NAMES[kind]}")


class UniqueDocuments:
    """The one check of real documents: an id and a text string each, and every id once."""

    def __init__(self, id_key: str, text_key: str):
        self.id_key, self.text_key, self.seen = id_key, text_key, {}

    def check(self, record: dict, path, line: int) -> str:
        """The document's id, or an InputError naming the file and line."""
        require_fields(record, {self.id_key: str, self.text_key: str}, path, line, "document")
        document_id = record[self.id_key]
        if document_id in self.seen:
            raise InputError(f"document id {document_id!r} appears twice (first at {self.seen[document_id]})", path,
                             line, fix="give every document a unique id")
        self.seen[document_id] = f"{path}:{line}"
        return document_id


def read_documents(inputs: list[Path], id_key: str, text_key: str) -> Iterator[tuple[str, str]]:
    """(id, text) of every real document, in order."""
    documents = UniqueDocuments(id_key, text_key)
    for path in inputs:
        for number, raw in enumerate(iter_lines(path), start=1):
            if raw.strip():
                record = parse_record(raw, path, number)
                yield documents.check(record, path, number), record[text_key]


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
