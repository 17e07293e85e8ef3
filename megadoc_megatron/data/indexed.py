"""Megatron indexed datasets (`.bin` tokens + `.idx` index), written in streaming fashion.

megatron-core's `IndexedDatasetBuilder` keeps per-sequence Python lists until
`finalize` and its merge reads every index into such lists, so memory grows with
the corpus. Here each converter part stores one int32 length per document in a
side file; the `.idx` is produced from those files part by part, and `.bin` files
are concatenated by the kernel (`copy_file_range`), never read through Python.
The file layout is the one of `megatron/core/datasets/indexed_dataset.py`.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megadoc_megatron.errors import InputError
from megadoc_megatron.progress import Progress

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
               np.float64: 6, np.float32: 7, np.uint16: 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
HEADER_BYTES = len(INDEX_MAGIC) + 8 + 1 + 8 + 8


def dataset_paths(prefix) -> tuple[Path, Path]:
    return Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


def _temporary(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def concatenate_files(sources: list[Path], destination: Path, append: bool = False) -> None:
    """destination = (its content, if `append`, then) the sources, one after another, copied in the
    kernel where possible."""
    with open(destination, "ab" if append else "wb", buffering=0) as out:
        for source in sources:
            with open(source, "rb", buffering=0) as src:
                size, copied = os.fstat(src.fileno()).st_size, 0
                try:
                    while copied < size:
                        sent = os.copy_file_range(src.fileno(), out.fileno(), size - copied)
                        if sent == 0:
                            break
                        copied += sent
                except OSError:  # e.g. a file system that refuses it: finish in user space
                    pass
                src.seek(copied)
                shutil.copyfileobj(src, out, 1 << 24)


def _header(dtype, sequences: int, document_boundaries: int) -> bytes:
    return INDEX_MAGIC + struct.pack("<QBQQ", INDEX_VERSION, DTYPE_CODES[np.dtype(dtype).type], sequences,
                                     document_boundaries)


def _nonempty_lengths(length_file: Path) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromfile(length_file, dtype=np.int32)
    return lengths, lengths[lengths > 0]


def write_index(idx_path: Path, dtype, length_files: list[Path]) -> None:
    """Write the `.idx` for documents whose token counts (0 = empty) lie in `length_files`.

    An empty document adds no sequence: its document boundary repeats the previous
    one, as Megatron-LM's converter does.
    """
    itemsize = np.dtype(dtype).itemsize
    documents = sequences = 0
    for length_file in length_files:
        lengths, nonempty = _nonempty_lengths(length_file)
        documents += len(lengths)
        sequences += len(nonempty)
    with open(idx_path, "wb") as out:
        out.write(_header(dtype, sequences, documents + 1))
        for length_file in length_files:
            _nonempty_lengths(length_file)[1].tofile(out)
        byte_offset = 0
        for length_file in length_files:
            sizes = _nonempty_lengths(length_file)[1].astype(np.int64) * itemsize
            (np.cumsum(sizes) - sizes + byte_offset).tofile(out)
            byte_offset += int(sizes.sum())
        np.zeros(1, dtype=np.int64).tofile(out)
        boundary = 0
        for length_file in length_files:
            lengths = np.fromfile(length_file, dtype=np.int32)
            (np.cumsum(lengths > 0, dtype=np.int64) + boundary).tofile(out)
            boundary += int(np.count_nonzero(lengths))


def _sync(path: Path) -> None:
    with open(path, "rb+") as stream:
        os.fsync(stream.fileno())


def _commit(prefix, write_bin, write_idx) -> None:
    """Write `{prefix}.bin/.idx` so that no reader ever sees a mismatched or short pair.

    Both are written under temporary names and synced; the old `.idx` is removed before
    the new `.bin` takes its name, and the new `.idx` appears last.
    """
    bin_path, idx_path = dataset_paths(prefix)
    bin_tmp, idx_tmp = _temporary(bin_path), _temporary(idx_path)
    try:
        write_bin(bin_tmp)
        write_idx(idx_tmp)
        _sync(bin_tmp)
        _sync(idx_tmp)
    except BaseException:
        bin_tmp.unlink(missing_ok=True)
        idx_tmp.unlink(missing_ok=True)
        raise
    idx_path.unlink(missing_ok=True)
    os.replace(bin_tmp, bin_path)
    os.replace(idx_tmp, idx_path)
    directory = os.open(bin_path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the renames themselves survive a crash
    finally:
        os.close(directory)


class DatasetAssembler:
    """`{prefix}.bin/.idx` from converter parts (token files, int32 document lengths), in order.

    Each part's tokens are appended to the growing `.bin.tmp` (by the kernel, then synced) as soon
    as it and every part before it are done (`append`), so that joining overlaps converting; `commit`
    appends the rest, writes the `.idx` and renames. A lone part is moved into place, not copied."""

    def __init__(self, prefix, dtype, token_files: list[Path], length_files: list[Path]):
        self.prefix, self.dtype = prefix, dtype
        self.token_files, self.length_files = token_files, length_files
        self.appended = 0
        self._bin_tmp = _temporary(dataset_paths(prefix)[0])

    def append(self, ready: int) -> None:
        """Append the token files of parts [appended, ready): the first `ready` parts are done."""
        if len(self.token_files) > 1 and ready > self.appended:
            concatenate_files(self.token_files[self.appended:ready], self._bin_tmp, append=self.appended > 0)
            _sync(self._bin_tmp)
            self.appended = ready

    def commit(self) -> None:
        def write_bin(bin_tmp: Path) -> None:
            if len(self.token_files) == 1:
                os.replace(self.token_files[0], bin_tmp)
            else:
                concatenate_files(self.token_files[self.appended:], bin_tmp, append=self.appended > 0)

        _commit(self.prefix, write_bin, lambda idx_tmp: write_index(idx_tmp, self.dtype, self.length_files))

    def abort(self) -> None:
        self._bin_tmp.unlink(missing_ok=True)


def merge_datasets(prefixes: list, output_prefix, progress: Progress | None = None) -> IndexedDatasetView:
    """One dataset holding the documents of `prefixes` in order, as Megatron-LM's
    `tools/merge_datasets.py` makes it; the index is copied in slices, so memory stays flat.
    `progress` counts the tokens copied."""
    views = [read_index(prefix) for prefix in prefixes]
    dtypes = {np.dtype(view.dtype).name for view in views}
    if len(dtypes) > 1:
        raise InputError(f"the datasets hold different token types ({', '.join(sorted(dtypes))})",
                         fix="merge datasets made with one tokenizer")

    def write_idx(idx_tmp: Path) -> None:
        sequences = sum(len(view.sequence_lengths) for view in views)
        documents = sum(view.num_documents for view in views)
        with open(idx_tmp, "wb") as out:
            out.write(_header(views[0].dtype if views else np.uint16, sequences, documents + 1))
            for view in views:
                _copy_shifted(view.sequence_lengths, 0, out)
            byte_offset = 0
            for view in views:
                _copy_shifted(view.sequence_pointers, byte_offset, out)
                byte_offset += view.num_tokens * np.dtype(view.dtype).itemsize
            np.zeros(1, dtype=np.int64).tofile(out)
            sequence_offset = 0
            for view in views:
                _copy_shifted(view.document_indices[1:], sequence_offset, out)
                sequence_offset += len(view.sequence_lengths)

    def write_bin(bin_tmp: Path) -> None:
        concatenate_files([], bin_tmp)  # the file, also when there is nothing to join
        for view in views:
            concatenate_files([dataset_paths(view.prefix)[0]], bin_tmp, append=True)
            if progress:
                progress.update(view.num_tokens)

    _commit(output_prefix, write_bin, write_idx)
    return read_index(output_prefix)


def sampled_documents(document_count: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted indices of round(fraction x count) documents (at least one), drawn by `seed`: the first
    ones of one seeded permutation, so that at one seed a smaller fraction is a subset of a larger one."""
    count = min(document_count, max(1, round(fraction * document_count)))
    return np.sort(np.random.default_rng(seed).permutation(document_count)[:count])


def write_documents(view: "IndexedDatasetView", documents: np.ndarray, output_prefix,
                    slice_size: int = 1 << 22, progress: Progress | None = None) -> "IndexedDatasetView":
    """A dataset holding the given documents of `view` (sorted indices), in their order. The token file is
    read in slices of sequences and filtered with numpy: no Python loop over documents, memory flat.
    `progress` counts the tokens read."""
    per_document = np.diff(view.document_indices)
    chosen = np.zeros(view.num_documents, dtype=bool)
    chosen[documents] = True
    keep = np.repeat(chosen, per_document)  # per sequence
    lengths = np.asarray(view.sequence_lengths[keep], dtype=np.int32)
    itemsize = np.dtype(view.dtype).itemsize

    def write_bin(bin_tmp: Path) -> None:
        tokens = np.memmap(dataset_paths(view.prefix)[0], dtype=view.dtype, mode="r") if len(keep) else None
        with open(bin_tmp, "wb") as out:
            for first in range(0, len(keep), slice_size):
                last = min(first + slice_size, len(keep))
                start = int(view.sequence_pointers[first]) // itemsize
                end = int(view.sequence_pointers[last - 1]) // itemsize + int(view.sequence_lengths[last - 1])
                tokens[start:end][np.repeat(keep[first:last], view.sequence_lengths[first:last])].tofile(out)
                if progress:
                    progress.update(end - start)

    def write_idx(idx_tmp: Path) -> None:
        with open(idx_tmp, "wb") as out:
            out.write(_header(view.dtype, len(lengths), len(documents) + 1))
            lengths.tofile(out)
            sizes = lengths.astype(np.int64) * itemsize
            (np.cumsum(sizes) - sizes).tofile(out)
            np.concatenate([[0], np.cumsum(per_document[documents])]).astype(np.int64).tofile(out)

    _commit(output_prefix, write_bin, write_idx)
    return read_index(output_prefix)


def _copy_shifted(array: np.ndarray, shift: int, out, slice_size: int = 1 << 24) -> None:
    for start in range(0, len(array), slice_size):
        (np.asarray(array[start:start + slice_size]) + np.array(shift, dtype=array.dtype)).tofile(out)


@dataclass
class IndexedDatasetView:
    """The arrays of an indexed dataset, memory-mapped (a light reader for inspection).

    Training reads datasets with megatron-core's `IndexedDataset`; this view avoids its
    import cost (~10 s on CPU) for quick tools. Tests check that both agree.
    """

    prefix: str
    dtype: type[np.number]
    sequence_lengths: np.ndarray
    sequence_pointers: np.ndarray
    document_indices: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def document_lengths(self) -> np.ndarray:
        """Tokens per document, empty documents included (as 0)."""
        sequence_ends = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return np.diff(sequence_ends[self.document_indices])

    def documents(self):
        """Each document's tokens in order (views into one memory map of the .bin)."""
        tokens = np.memmap(dataset_paths(self.prefix)[0], dtype=self.dtype, mode="r")
        ends = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])[self.document_indices]
        for start, end in zip(ends[:-1], ends[1:]):
            yield tokens[start:end]

    def largest_token(self) -> int:
        """The largest token id in the dataset (-1 when it holds none)."""
        tokens = np.memmap(dataset_paths(self.prefix)[0], dtype=self.dtype, mode="r")
        return int(tokens.max()) if len(tokens) else -1

    def document_tokens(self, document: int) -> np.ndarray:
        first, last = self.document_indices[document], self.document_indices[document + 1]
        if first == last:
            return np.zeros(0, dtype=self.dtype)
        start = int(self.sequence_pointers[first])
        count = int(self.sequence_lengths[first:last].sum())
        return _memmap(dataset_paths(self.prefix)[0], self.dtype, start, count)


def _memmap(path, dtype, offset: int, count: int) -> np.ndarray:
    if count == 0:  # numpy cannot map zero bytes
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def read_index(prefix) -> IndexedDatasetView:
    bin_path, idx_path = dataset_paths(prefix)
    for path in (bin_path, idx_path):
        if not path.is_file():
            raise InputError("dataset file not found", path,
                             fix="pass the prefix without .bin/.idx, e.g. out/corpus_text_document")
    with open(idx_path, "rb") as stream:
        header = stream.read(HEADER_BYTES)
    if header[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise InputError("not a Megatron indexed dataset (bad magic)", idx_path,
                         fix="rebuild it with `megadoc preprocess`")
    if len(header) < HEADER_BYTES:
        raise InputError(f"the index is cut short ({len(header)} bytes)", idx_path, fix=_REBUILD)
    version, code, sequences, documents = struct.unpack("<QBQQ", header[len(INDEX_MAGIC):])
    if version != INDEX_VERSION or code not in CODE_DTYPES:
        raise InputError(f"unsupported index version {version} or dtype code {code}", idx_path)
    expected = HEADER_BYTES + sequences * 12 + documents * 8
    if idx_path.stat().st_size != expected:
        raise InputError(f"the index is {idx_path.stat().st_size:,} bytes but its header describes {expected:,} "
                         "(cut short or corrupt)", idx_path, fix=_REBUILD)
    offset = HEADER_BYTES
    arrays = []
    for dtype, count in ((np.int32, sequences), (np.int64, sequences), (np.int64, documents)):
        arrays.append(_memmap(idx_path, dtype, offset, count))
        offset += count * np.dtype(dtype).itemsize
    view = IndexedDatasetView(str(prefix), CODE_DTYPES[code], *arrays)
    _check_token_file(view, bin_path)
    return view


_REBUILD = "convert the data again (megadoc preprocess) or copy the dataset again; .bin and .idx must come from one run"


def _check_token_file(view: IndexedDatasetView, bin_path: Path) -> None:
    """The `.bin` holds exactly the tokens the index points at (checked at its end, in O(1))."""
    if len(view.document_indices) and view.document_indices[-1] != len(view.sequence_lengths):
        raise InputError("the index's document boundaries do not end at its last sequence", view.prefix + ".idx",
                         fix=_REBUILD)
    itemsize = np.dtype(view.dtype).itemsize
    expected = int(view.sequence_pointers[-1]) + int(view.sequence_lengths[-1]) * itemsize if len(
        view.sequence_lengths) else 0
    actual = bin_path.stat().st_size
    if actual != expected:
        raise InputError(f"the token file is {actual:,} bytes but its index describes {expected:,}", bin_path,
                         fix=_REBUILD)
