"""File helpers every stage uses: atomic writes, and content digests for cache keys."""

from __future__ import annotations

import math
import os
from pathlib import Path

from megadoc_megatron.errors import InputError


def write_text_atomic(path, text: str) -> None:
    """Write under a temporary name, sync, then rename: readers see the old file or the new one."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent writers never share it
    with open(temporary, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())  # a crash never leaves the new name on a short file
    os.replace(temporary, path)


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


def read_utf8(path) -> str:
    """A text file's content, or an InputError naming the line of its first byte that is not UTF-8."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"not UTF-8 text (byte {raw[error.start]:#04x} at offset {error.start})", path,
                         raw[:error.start].count(b"\n") + 1, fix="save the file as UTF-8") from None
