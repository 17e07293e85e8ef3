"""JSONL (plain, .gz, .zst) -> Megatron indexed datasets, byte-identical to Megatron-LM's
`tools/preprocess_data.py` (default tokenizer system, no sentence splitting).

How it scales: the inputs are cut into parts (whole compressed files; byte ranges of
plain files, cut at line starts). Worker processes, forked from the process that loaded
the tokenizer, each read a part themselves and write its tokens plus one int32 length per
document to a part folder, so no token crosses a process boundary. The parts are then
assembled in input order into one dataset (or one per input file with `--no-merge`). A
part that finished survives an interrupted run and is reused when the same command runs
again; the part folder is removed once the outputs are complete.

How it is fast: a HuggingFace tokenizer is run by gigatoken (Rust), which reads a clean
JSONL part and tokenizes it in one call (`_convert_whole`); other parts go line by line
with Python's json (`_convert_batch`). gigatoken's ids are checked against the reference
tokenizer (`tokenizers`), which loads and answers in a process of its own: a probe of texts
and each part's first documents. Any difference makes the run say so and use the reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from megadoc_megatron import __version__
from megadoc_megatron.data.dataset_info import DatasetInfo, dataset_prefix
from megadoc_megatron.data.indexed import DatasetAssembler
from megadoc_megatron.data.tokenizer import (
    GigatokenEncoder,
    load_tokenizer,
    optimal_dtype,
    probe_texts,
    tokenizer_fingerprint,
    tokenizer_path,
)
from megadoc_megatron.errors import InputError
from megadoc_megatron.files import write_text_atomic
from megadoc_megatron.jsonl import (
    count_lines_before,
    expand_inputs,
    is_compressed,
    iter_lines,
    line_starts,
    open_binary,
    parse_record,
    require_fields,
)

BATCH_LINES = 512
BATCH_BYTES = 4 << 20
MIN_PART_BYTES = 1 << 20
REFERENCE, GIGATOKEN = "reference", "gigatoken"
SAMPLE_CHARS = 1 << 13  # of each part's first documents, re-encoded by the reference to check gigatoken
SAMPLE_LINES = 256  # the documents to check are picked among a part's first lines
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Child processes are forked where that is safe (Linux): they start at once, inherit what this
# process loaded, and a caller's script needs no `if __name__ == "__main__"` guard.
START_METHOD = "fork" if sys.platform == "linux" else "spawn"


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


# ---------------------------------------------------------------- worker side

_worker: dict = {}


def _init_worker(options: Options) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _worker["options"] = options
    if options.backend == REFERENCE:
        _worker["encoder"] = load_tokenizer(options.tokenizer_type, options.tokenizer_model)
        return
    try:
        _worker["encoder"] = GigatokenEncoder(Path(options.tokenizer_model))
    except InputError:
        raise
    except Exception as error:  # it refuses some tokenizers: then the reference does the work
        _worker["encoder"], _worker["refused"] = None, str(error).strip().splitlines()[0]


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
    options = _worker["options"]
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
    tokens, lengths = _worker["encoder"].encode_flat(texts)
    return _with_eod(tokens, lengths)


def _with_eod(tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not _worker["options"].append_eod:
        return tokens, lengths
    return _append_eod(tokens, lengths, _worker["encoding"].eod)


def _convert_batch(batch: list[tuple[int, bytes]], part: Part, writer: _PartWriter, result: PartResult) -> None:
    options = _worker["options"]
    result.blank_lines += sum(1 for _, raw in batch if raw.isspace())
    lines, raws, texts = _records_fast(batch, options.json_keys) or _records_checked(batch, part, writer, result)
    arrays = {key: _encode([row[column] for row in texts]) for column, key in enumerate(options.json_keys)}
    if result.sample is None and options.backend == GIGATOKEN:
        result.sample = _sample(texts, lines)
    keep = np.ones(len(lines), dtype=bool)
    vocab_size = _worker["encoding"].vocab_size
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
    ids = _worker["encoder"].encode_batch([text for _, text in chosen])
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


def _convert_part(job: tuple[Part, str, Encoding]) -> PartResult:
    """Convert one part, in a worker. Bad input comes back in `error` (line numbers within the part)."""
    part, stem, _worker["encoding"] = job
    options = _worker["options"]
    result = PartResult(part.index, stem)
    parts_dir = Path(options.parts_dir)
    writer = _PartWriter(parts_dir, stem, options.json_keys, _worker["encoding"].dtype)
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
    options = _worker["options"]
    with _readable_copy(part) as path:
        counts = _clean_line_counts(path, options.json_keys) if path else None
        if not counts or not counts[0]:
            return False
        arrays = {key: _worker["encoder"].encode_jsonl(path, key) for key in options.json_keys}
    documents, blank_lines = counts
    if any(len(lengths) != documents or (len(tokens) and tokens.max() >= _worker["encoding"].vocab_size)
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
    result.bytes = _input_bytes(part)
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
            offset, end = part.start, part.start + _input_bytes(part)
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
    if _worker.get("probe_sent"):  # once per worker: it never changes
        return []
    _worker["probe_sent"] = True
    probe = _worker["encoding"].probe
    return list(zip(["a probe text"] * len(probe), probe, _worker["encoder"].encode_batch(list(probe))))


# ---------------------------------------------------------------- main process


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


def _input_bytes(part: Part) -> int:
    """Bytes of the input file (compressed, if it is) that the part covers."""
    return (part.end or os.path.getsize(part.path)) - part.start


class GigatokenUnusable(Exception):
    """gigatoken cannot load the tokenizer, or gives other ids than the reference tokenizer."""


def _finished_part(parts_dir: Path, stem: str) -> PartResult | None:
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


def _check_sample(result: PartResult, part: Part, reference) -> None:
    """Raise GigatokenUnusable unless the reference tokenizer gives gigatoken's ids for the sample."""
    expected = reference.encode_batch([text for _, text, _ in result.sample or []])
    for (label, text, ids), reference_ids in zip(result.sample or [], expected):
        if list(reference_ids) != ids:
            where = (label if label.startswith("a probe")
                     else f"{part.path}, {label} of the part starting at byte {part.start}")
            raise GigatokenUnusable(f"its ids differ from {reference.type_name}'s for {where}: {text[:60]!r}")


@contextlib.contextmanager
def _worker_pool(options: Options, workers: int):
    """Worker processes holding the tokenizer this process loads (`_worker`): forked where fork is
    safe to use (Linux), so that the tokenizer loads once; spawned elsewhere, loading it again."""
    _init_worker(options)
    if _worker["encoder"] is None:
        raise GigatokenUnusable(f"it cannot load this tokenizer ({_worker['refused']})")
    fork = START_METHOD == "fork"
    # An executor, not multiprocessing.Pool: a worker killed (say by the OOM killer) raises
    # BrokenProcessPool instead of hanging the run forever.
    executor = ProcessPoolExecutor(workers, multiprocessing.get_context(START_METHOD),
                                   initializer=None if fork else _init_worker, initargs=() if fork else (options,))
    try:
        yield executor
    except BrokenProcessPool:
        raise InputError("a worker process died (out of memory?)", options.parts_dir,
                         fix="lower --workers or --max-part-mb and run the same command again: "
                             "finished parts are reused"
                         ) from None
    except BaseException:
        for process in list(executor._processes.values()):  # stop now; unfinished parts are redone on resume
            process.terminate()
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _run_parts(parts, stems, encoding: Encoding, options: Options, pool, reference, assemble) -> dict[int, PartResult]:
    """Convert the parts not already done by an earlier run (gigatoken's checked against the
    reference as they come; `assemble(results, indices)` once they are in); results keyed by part index."""
    parts_dir = Path(options.parts_dir)
    results = {part.index: result for part in parts
               if (result := _finished_part(parts_dir, stems[part.index])) is not None}
    todo = [part for part in parts if part.index not in results]
    if results:
        print(f"resuming: {len(results)} of {len(parts)} parts were converted by an earlier run", file=sys.stderr)
    futures = [pool.submit(_convert_part, (part, stems[part.index], encoding)) for part in todo]
    if options.backend == GIGATOKEN:  # waits for the reference to load, while the workers convert
        if replace(Encoding.of(reference), probe=encoding.probe) != encoding:
            raise GigatokenUnusable(f"its vocabulary size or EOD id ({encoding.vocab_size}, {encoding.eod}) "
                                    f"differ from {reference.type_name}'s ({reference.vocab_size}, {reference.eod})")
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread: a later worker pool forks a single-threaded process
    by_index = {part.index: part for part in parts}
    assemble(results, list(results))
    with tqdm(total=sum(map(_input_bytes, todo)), unit="B", unit_scale=True, desc="preprocess", disable=None,
              file=sys.stderr) as bar:
        for future in as_completed(futures):
            result = future.result()
            part = by_index[result.index]
            if options.backend == GIGATOKEN:
                _check_sample(result, part, reference)
            if result.error is not None:
                error = result.error
                line = count_lines_before(part.path, part.start) + error.line  # the worker counted from its part
                raise InputError(error.message, error.path, line, error.fix)
            results[result.index] = result
            assemble(results, [result.index])
            bar.update(_input_bytes(part))
    return results


class _ReferenceProcess:
    """The reference tokenizer in a process of its own, for gigatoken's checks: it loads on another
    core while this process loads gigatoken (each takes about a second for a 150k vocabulary)."""

    def __init__(self, tokenizer_type: str, tokenizer_model: str):
        context = multiprocessing.get_context(START_METHOD)
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve_reference,
                                        args=(child, self._connection, tokenizer_type, tokenizer_model), daemon=True)
        self._process.start()
        child.close()
        self._described = None

    def _ask(self, *request):
        try:
            self._connection.send(request)
            reply = self._connection.recv()
        except (EOFError, OSError):
            raise InputError("the process of the reference tokenizer died (out of memory?)",
                             fix="run the same command again: finished parts are reused") from None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._ask("encode", texts)

    def describe(self) -> dict:
        if self._described is None:
            self._described = self._ask("describe")
        return self._described

    type_name = property(lambda self: self.describe()["type"])
    vocab_size = property(lambda self: self.describe()["vocab_size"])
    eod = property(lambda self: self.describe()["eod"])

    def close(self) -> None:
        self._connection.close()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()


def _serve_reference(connection, asking_end, tokenizer_type: str, tokenizer_model: str) -> None:
    asking_end.close()  # a forked child holds it too: closed here, the asker's exit ends the loop below
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tokenizer = load_tokenizer(tokenizer_type, tokenizer_model)
    except Exception as error:  # sent back to the asking process, which raises it
        tokenizer = error
    while True:
        try:
            kind, *args = connection.recv()
        except EOFError:
            return
        if isinstance(tokenizer, Exception):
            connection.send(tokenizer)
        else:
            connection.send(tokenizer.describe() if kind == "describe" else tokenizer.encode_batch(*args))


def _merge_rejects(parts, results, parts_dir: Path, destination: Path) -> None:
    """One rejects file for the whole run, with line numbers counted from the start of each input file."""
    temporary = destination.with_name(destination.name + ".tmp")
    lines_before, previous_path = 0, None
    with open(temporary, "w", encoding="utf-8") as out:
        for part in parts:  # in input order, so the lines of earlier parts of a file are known
            if part.path != previous_path:  # an array task may start inside a file
                lines_before, previous_path = count_lines_before(part.path, part.start), part.path
            with open(parts_dir / f"{results[part.index].stem}.rejects.jsonl", encoding="utf-8") as rejects:
                for row in rejects:
                    record = json.loads(row)
                    out.write(json.dumps({"file": part.path, "line": record["line"] + lines_before,
                                          "reason": record["reason"], "text": record["text"]},
                                         ensure_ascii=False) + "\n")
            lines_before += results[part.index].lines
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, destination)


def _commit_outputs(groups, assemblers, results, options: Options, tokenizer: dict) -> list[DatasetInfo]:
    written = []
    for output_prefix, group in groups:
        for key in options.json_keys:
            assemblers[output_prefix, key].commit()
            info = DatasetInfo(
                prefix=dataset_prefix(output_prefix, key),
                documents=sum(results[p.index].documents for p in group),
                tokens=sum(results[p.index].tokens.get(key, 0) for p in group),
                inputs=sorted({p.path for p in group}), json_key=key, append_eod=options.append_eod,
                dtype=np.dtype(optimal_dtype(tokenizer["vocab_size"])).name, tokenizer=tokenizer,
                created_by=f"megadoc-megatron {__version__}")
            info.save()
            written.append(info)
    return written


def _backend_for(tokenizer_type: str, fast: bool) -> str:
    """gigatoken for HuggingFace tokenizers (checked against `tokenizers` as it runs), else the reference.
    SentencePiece stays on `sentencepiece`: gigatoken reads "<s>" in a text as the control token."""
    if not fast or tokenizer_type != "HuggingFaceTokenizer":
        return REFERENCE
    try:
        GigatokenEncoder.version()
    except ImportError:
        print("gigatoken is not installed: converting with tokenizers (slower); pip install gigatoken", file=sys.stderr)
        return REFERENCE
    return GIGATOKEN


def _shard_parts(parts: list[Part], shard: tuple[int, int] | None) -> list[Part]:
    """Array task `index` of `count` takes a contiguous run of the parts, so its dataset is the
    corpus's documents from one point to another, and the shards merge in task order."""
    if shard is None:
        return parts
    index, count = shard
    return parts[len(parts) * index // count:len(parts) * (index + 1) // count]


@dataclass
class PreprocessConfig:
    """The settings of `megadoc preprocess`."""
    inputs: list[str]                   # JSONL files (.jsonl, .jsonl.gz, .jsonl.zst), globs or folders
    output_prefix: str                  # outputs are PREFIX_{key}_document.bin/.idx
    tokenizer_type: str
    tokenizer_model: str                # local HF tokenizer folder or SentencePiece .model file
    json_keys: tuple[str, ...] = ("text",)  # keys to extract, one dataset each
    append_eod: bool = False            # the EOD token after every non-empty document
    workers: int | None = None          # worker processes (None: all cores)
    skip_bad_lines: bool = False        # write bad lines to PREFIX_rejected.jsonl and go on
    merge: bool = True                  # False: one dataset per input file, PREFIX_{i}_{key}_document
    max_part_mb: float = 64             # largest byte range of a plain input file given to one worker at a time
    fast_tokenizer: bool = True         # gigatoken where it gives the same ids
    shard: tuple[int, int] | None = None  # (i, n): array task i of n writes PREFIX_shard{i}of{n}


@dataclass
class PreprocessSummary:
    datasets: list[DatasetInfo]
    files: int
    parts: int
    tokenized_with: str                 # gigatoken | reference
    parts_read_in_rust: int
    lines: int
    blank_lines: int
    documents: int
    rejected: int
    rejects_file: str | None
    tokens: int
    bytes: int
    seconds: float


def preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Convert JSONL inputs into Megatron indexed datasets; returns counts and timings.

    With `shard=(i, n)` this is array task i of n: it converts its share of the corpus into
    `{output_prefix}_shard{i}of{n}`, and `merge_datasets` joins the n shards in order into what
    one run over the whole corpus writes."""
    started = time.perf_counter()
    inputs, output_prefix, tokenizer_type, json_keys = (config.inputs, config.output_prefix, config.tokenizer_type,
                                                        config.json_keys)
    append_eod, skip_bad_lines, merge, shard = config.append_eod, config.skip_bad_lines, config.merge, config.shard
    workers = config.workers or os.cpu_count() or 1
    _check_shard(workers, shard, merge)
    files = expand_inputs(inputs)
    model_path = tokenizer_path(tokenizer_type, config.tokenizer_model)
    output_prefix = str(Path(output_prefix).expanduser().resolve())
    if shard is not None:
        output_prefix = shard_prefix(output_prefix, *shard)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    parts_dir = Path(f"{output_prefix}.parts")
    parts_dir.mkdir(exist_ok=True)
    options = Options(tokenizer_type, str(model_path), tuple(json_keys), append_eod, skip_bad_lines, str(parts_dir),
                      _backend_for(tokenizer_type, config.fast_tokenizer))
    # The parts depend on the corpus, --workers and the shard count only: every array task computes the same.
    all_parts = cut_into_parts(files, workers * (shard[1] if shard else 1), int(config.max_part_mb * (1 << 20)))
    parts = _shard_parts(all_parts, shard)
    if merge:
        groups = [(output_prefix, parts)]
    else:
        width = len(str(len(files) - 1))
        groups = [(f"{output_prefix}_{i:0{width}d}", [p for p in parts if p.file_index == i])
                  for i in range(len(files))]
    results, options, tokenizer, assemblers = _convert(parts, groups, options, workers)  # tokenizer: its description
    if not sum(r.documents for r in results.values()) and shard is None:
        for assembler in assemblers.values():
            assembler.abort()
        shutil.rmtree(parts_dir)  # nothing in it worth resuming from
        raise InputError("the input holds no documents", ", ".join(map(str, files)),
                         fix="check the --input paths and --json-keys; blank and rejected lines are not documents")
    datasets = _commit_outputs(groups, assemblers, results, options, tokenizer)
    rejected = sum(r.rejected for r in results.values())
    rejects_path = Path(f"{output_prefix}_rejected.jsonl")
    if rejected:
        _merge_rejects(parts, results, parts_dir, rejects_path)
    else:
        rejects_path.unlink(missing_ok=True)  # from an earlier run of the same prefix
    shutil.rmtree(parts_dir)
    seconds = time.perf_counter() - started
    in_bytes = sum(r.bytes for r in results.values())
    return PreprocessSummary(
        datasets=datasets, files=len(files), parts=len(parts), tokenized_with=options.backend,
        parts_read_in_rust=sum(r.read_in_rust for r in results.values()),
        lines=sum(r.lines for r in results.values()), blank_lines=sum(r.blank_lines for r in results.values()),
        documents=sum(r.documents for r in results.values()), rejected=rejected,
        rejects_file=str(rejects_path) if rejected else None, tokens=sum(d.tokens for d in datasets),
        bytes=in_bytes, seconds=seconds)


def _check_shard(workers: int, shard, merge: bool) -> None:
    if workers < 1:
        raise InputError(f"--workers must be at least 1, not {workers}")
    if shard is None:
        return
    index, count = shard
    if not 0 <= index < count:
        raise InputError(f"--shard {index}/{count}: the task index must be in [0, {count})",
                         fix="pass --shard $SLURM_ARRAY_TASK_ID/N from a job submitted with --array=0-(N-1)")
    if not merge:
        raise InputError("--shard and --no-merge do not go together",
                         fix="--no-merge already writes one dataset per input file: give each task its own files")


def shard_prefix(output_prefix: str, index: int, count: int) -> str:
    return f"{output_prefix}_shard{index:05d}of{count:05d}"


def _stems(parts, options: Options) -> dict[int, str]:
    fingerprint = tokenizer_fingerprint(options.tokenizer_type, Path(options.tokenizer_model))
    fingerprint += GigatokenEncoder.version() if options.backend == GIGATOKEN else ""
    return {part.index: part.stem(options, fingerprint) for part in parts}


def _convert(parts, groups, options: Options, workers: int):
    """Every part converted, gigatoken first where it may serve; also the tokenizer's description and
    the datasets' assemblers (their `.bin` joined as the parts come)."""
    if options.backend == GIGATOKEN:
        try:
            return _convert_with(parts, groups, options, workers)
        except GigatokenUnusable as why:
            print(f"gigatoken cannot stand in for {options.tokenizer_type} here: {why}. "
                  "Tokenizing with the `tokenizers` package instead (slower).", file=sys.stderr)
            options = replace(options, backend=REFERENCE)
    return _convert_with(parts, groups, options, workers)


def _convert_with(parts, groups, options: Options, workers: int):
    # started first: the reference loads in its process while gigatoken loads in this one
    checker = (_ReferenceProcess(options.tokenizer_type, options.tokenizer_model)
               if options.backend == GIGATOKEN else None)
    assemblers = {}
    try:
        with _worker_pool(options, max(1, min(workers, len(parts)))) as pool:
            encoder = _worker["encoder"]
            encoding = Encoding.of(encoder, probe_texts(encoder.json_path) if checker else ())
            reference = checker or encoder
            stems = _stems(parts, options)
            assemblers = _assemblers(groups, stems, options, encoding.dtype)

            group_of = {part.index: (output_prefix, group) for output_prefix, group in groups for part in group}

            def assemble(results, indices) -> None:
                """Join, in the groups of the parts just finished, every part now ready in order."""
                for output_prefix, group in {group_of[i][0]: group_of[i] for i in indices}.values():
                    for key in options.json_keys:
                        assembler = assemblers[output_prefix, key]
                        ready = assembler.appended
                        while ready < len(group) and group[ready].index in results:
                            ready += 1
                        assembler.append(ready)

            results = _run_parts(parts, stems, encoding, options, pool, reference, assemble)
            return results, options, reference.describe(), assemblers
    except BaseException:
        for assembler in assemblers.values():
            assembler.abort()
        raise
    finally:
        if checker:
            checker.close()


def _assemblers(groups, stems, options: Options, dtype: str) -> dict:
    """One per output dataset: (output prefix, key) -> its DatasetAssembler over the group's parts."""
    parts_dir = Path(options.parts_dir)
    assemblers = {}
    for (output_prefix, group), key in itertools.product(groups, options.json_keys):
        files = [parts_dir / f"{stems[part.index]}.{key}" for part in group]
        assemblers[output_prefix, key] = DatasetAssembler(
            dataset_prefix(output_prefix, key), np.dtype(dtype).type,
            [Path(f"{f}.tokens") for f in files], [Path(f"{f}.lengths") for f in files])
    return assemblers
