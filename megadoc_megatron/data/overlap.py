"""Near-duplicates by n-gram overlap, the contamination test of the GPT-3 and Llama 2 reports (13-grams).

Documents are sequences of units: token ids (converted datasets) or words (text, lowercased, `\\w+`).
A reference set (the held-out data, small) is indexed by the hashes of its n-grams; a stream of query
documents (training data or synthetic records, large) is scanned in chunks, all at once with numpy.
The overlap of a query document q and a reference document r is

    shared distinct n-grams / min(distinct n-grams of q, distinct n-grams of r)

so that 1.0 means one contains the other (an exact copy, a held-out document quoted whole inside a
megadoc, a training document cut from a held-out one). A document shorter than n units is one n-gram:
itself. Hashes are 64-bit (a collision is negligible at these sizes) and only compared within one process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from megadoc_megatron.errors import InputError

NGRAM = 13             # the GPT-3 / Llama 2 contamination n-gram
THRESHOLD = 0.5        # overlap at which a pair counts as a near-duplicate
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial hash's base
_CHUNK_UNITS = 1 << 23  # units hashed at once (memory: a few 8-byte arrays of this length)
_WORD = re.compile(r"\w+")


def check_settings(ngram: int, threshold: float, where=None) -> None:
    if ngram < 1 or not 0 < threshold <= 1:
        raise InputError(f"overlap settings out of range (n-gram {ngram}, threshold {threshold})", where,
                         fix="give an n-gram length of at least 1 and a threshold in (0, 1], e.g. 13 and 0.5")


def text_units(text: str) -> np.ndarray:
    """A text's words, lowercased, as 64-bit ids (formatting and punctuation do not matter)."""
    return np.array([hash(word) for word in _WORD.findall(text.lower())], dtype=np.int64).view(np.uint64)


@dataclass
class Overlap:
    query: int        # document number in the query stream
    reference: int    # document number in the reference set
    fraction: float   # shared distinct n-grams / the smaller document's distinct n-grams
    shared: int       # shared distinct n-grams


def _hashes(units: np.ndarray, starts: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash, document) of every n-gram inside a document (none across two), and one whole-document hash
    of each document shorter than n. `starts` and `lengths` place the documents in `units`."""
    units = units.astype(np.uint64, copy=False)
    documents = np.arange(len(starts))
    hashes, owners = [], []
    count = len(units) - n + 1
    if count > 0:
        rolling = np.zeros(count, dtype=np.uint64)
        for offset in range(n):
            rolling *= _MULTIPLIER
            rolling += units[offset:offset + count]
        owner = np.repeat(documents, lengths)[:count]
        inside = np.arange(count) + n <= (starts + lengths)[owner]
        hashes.append(rolling[inside])
        owners.append(owner[inside])
    short = documents[(lengths > 0) & (lengths < n)]
    if len(short):
        whole = np.zeros(len(short), dtype=np.uint64)
        for offset in range(n - 1):
            more = offset < lengths[short]
            whole[more] = whole[more] * _MULTIPLIER + units[starts[short][more] + offset]
        hashes.append(whole + np.uint64(n))  # apart from the n-grams of longer documents
        owners.append(short)
    if not hashes:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    return np.concatenate(hashes), np.concatenate(owners)


def _chunks(documents: Iterable[np.ndarray]) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(number of the first document, units, starts, lengths) of consecutive documents, about
    _CHUNK_UNITS units at a time."""
    first, pending, size = 0, [], 0
    for document in documents:
        pending.append(np.asarray(document))
        size += len(document)
        if size >= _CHUNK_UNITS:
            yield first, *_joined(pending)
            first, pending, size = first + len(pending), [], 0
    if pending:
        yield first, *_joined(pending)


def _joined(documents: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    units = np.concatenate([d.astype(np.uint64, copy=False) for d in documents]) if documents else \
        np.zeros(0, dtype=np.uint64)
    return units, starts, lengths


class NgramIndex:
    """The distinct n-grams of a reference set, each with the documents that hold it."""

    def __init__(self, documents: Iterable[np.ndarray], n: int = NGRAM):
        self.n = n
        pairs, sizes = [], []
        for first, units, starts, lengths in _chunks(documents):
            hashes, owners = _hashes(units, starts, lengths, n)
            pairs.append(np.unique(np.stack([hashes, (owners + first).astype(np.uint64)], axis=1), axis=0))
            sizes.append(np.bincount(pairs[-1][:, 1].astype(np.int64) - first, minlength=len(lengths)))
        pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.uint64)
        order = np.argsort(pairs[:, 0], kind="stable")
        self.hashes, self.owners = pairs[order, 0], pairs[order, 1].astype(np.int64)
        self.sizes = np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)  # distinct n-grams per document
        bits = int(np.clip(np.ceil(np.log2(8 * len(self.hashes) + 1)), 20, 28))
        self._mask = np.uint64((1 << bits) - 1)
        self._filter = np.zeros(1 << bits, dtype=bool)
        self._filter[self.hashes & self._mask] = True

    def __len__(self) -> int:
        return len(self.sizes)

    def overlaps(self, documents: Iterable[np.ndarray]) -> Iterator[Overlap]:
        """For each query document that shares an n-gram with the reference set: its most overlapping
        reference document (see the module docstring), in query order."""
        for first, units, starts, lengths in _chunks(documents):
            hashes, owners = _hashes(units, starts, lengths, self.n)
            hit = self._known(hashes)
            if not hit.any():
                continue
            pairs = np.unique(np.stack([owners[hit].astype(np.uint64), hashes[hit]], axis=1), axis=0)
            left = np.searchsorted(self.hashes, pairs[:, 1], side="left")
            right = np.searchsorted(self.hashes, pairs[:, 1], side="right")
            repeat = right - left
            query = np.repeat(pairs[:, 0].astype(np.int64), repeat)
            positions = np.repeat(left - np.cumsum(repeat) + repeat, repeat) + np.arange(repeat.sum())
            found, shared = np.unique(np.stack([query, self.owners[positions]], axis=1), axis=0, return_counts=True)
            yield from self._best(first, found, shared, hashes, owners)

    def _known(self, hashes: np.ndarray) -> np.ndarray:
        """Which hashes the reference set holds (a binary search: the reference set is the small side)."""
        known = self._filter[hashes & self._mask]  # a first cut: a table lookup is ten times a search
        candidates = hashes[known]
        places = np.minimum(np.searchsorted(self.hashes, candidates), max(len(self.hashes) - 1, 0))
        known[known] = self.hashes[places] == candidates if len(self.hashes) else False
        return known

    def _best(self, first: int, found: np.ndarray, shared: np.ndarray, hashes: np.ndarray, owners: np.ndarray):
        """The most overlapping reference of each query in `found` ((query, reference) rows, `shared`
        n-grams each); the queries' distinct n-gram counts come from this chunk's hashes."""
        queries = np.unique(found[:, 0])
        mine = np.isin(owners, queries)
        distinct = np.unique(np.stack([owners[mine].astype(np.uint64), hashes[mine]], axis=1), axis=0)
        query_sizes = np.bincount(distinct[:, 0].astype(np.int64), minlength=int(queries[-1]) + 1)
        fractions = shared / np.minimum(query_sizes[found[:, 0]], self.sizes[found[:, 1]])
        order = np.lexsort((-fractions, found[:, 0]))  # by query, the largest overlap first
        firsts = order[np.r_[True, found[order[1:], 0] != found[order[:-1], 0]]]
        for row in firsts:
            yield Overlap(int(found[row, 0]) + first, int(found[row, 1]), float(fractions[row]), int(shared[row]))
