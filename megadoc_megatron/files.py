"""File helpers every stage uses: atomic writes, and content digests for cache keys."""

from __future__ import annotations

import hashlib
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


def cache_root() -> Path:
    """Where megadoc keeps what it can rebuild (the default generator, file digests): MEGADOC_CACHE."""
    return Path(os.environ.get("MEGADOC_CACHE", Path.home() / ".cache" / "megadoc-megatron"))


def content_digest(path) -> str:
    """SHA-256 of a file's whole content, read once per version of the file: the digest is kept in the
    cache under the file's path, size, modification time and inode, so a large corpus is hashed again
    only after it changes."""
    path = Path(path).resolve()
    before = path.stat()
    version = f"{path}\0{before.st_size}\0{before.st_mtime_ns}\0{before.st_ino}"
    entry = cache_root() / "digests" / hashlib.sha256(version.encode()).hexdigest()
    try:
        return entry.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 24), b""):
            digest.update(block)
    after = path.stat()
    if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):  # not rewritten meanwhile
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(entry, digest.hexdigest() + "\n")
        except OSError:  # a read-only cache costs time, not correctness
            pass
    return digest.hexdigest()
