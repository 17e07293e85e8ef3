"""The main process's side of converting: a pool of workers forked after the tokenizer loads, the
parts not finished by an earlier run sent to it, each result checked (gigatoken's against the
reference) and its part joined into its dataset as soon as every part before it is in."""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path

from megadoc_megatron.data.preprocess.commit import dataset_assemblers
from megadoc_megatron.data.preprocess.parts import (
    GIGATOKEN,
    REFERENCE,
    Encoding,
    Options,
    PartResult,
    finished_part,
    input_bytes,
    part_stems,
)
from megadoc_megatron.data.preprocess.reference import GigatokenUnusable, ReferenceProcess, check_sample
from megadoc_megatron.data.preprocess.worker import START_METHOD, convert_part, init_worker, state
from megadoc_megatron.data.tokenizer import probe_texts
from megadoc_megatron.errors import InputError
from megadoc_megatron.jsonl import count_lines_before
from megadoc_megatron.progress import Progress


def convert_parts(parts, groups, options: Options, workers: int):
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
    checker = (ReferenceProcess(options.tokenizer_type, options.tokenizer_model)
               if options.backend == GIGATOKEN else None)
    assemblers = {}
    try:
        with _worker_pool(options, max(1, min(workers, len(parts)))) as pool:
            encoder = state["encoder"]
            encoding = Encoding.of(encoder, probe_texts(encoder.json_path) if checker else ())
            reference = checker or encoder
            stems = part_stems(parts, options)
            assemblers = dataset_assemblers(groups, stems, options, encoding.dtype)

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


@contextlib.contextmanager
def _worker_pool(options: Options, workers: int):
    """Worker processes holding the tokenizer this process loads (`state`): forked where fork is
    safe to use (Linux), so that the tokenizer loads once; spawned elsewhere, loading it again."""
    init_worker(options)
    if state["encoder"] is None:
        raise GigatokenUnusable(f"it cannot load this tokenizer ({state['refused']})")
    fork = START_METHOD == "fork"
    # An executor, not multiprocessing.Pool: a worker killed (say by the OOM killer) raises
    # BrokenProcessPool instead of hanging the run forever.
    executor = ProcessPoolExecutor(workers, multiprocessing.get_context(START_METHOD),
                                   initializer=None if fork else init_worker, initargs=() if fork else (options,))
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
               if (result := finished_part(parts_dir, stems[part.index])) is not None}
    todo = [part for part in parts if part.index not in results]
    if results:
        print(f"resuming: {len(results)} of {len(parts)} parts were converted by an earlier run", file=sys.stderr)
    futures = [pool.submit(convert_part, (part, stems[part.index], encoding)) for part in todo]
    if options.backend == GIGATOKEN:  # waits for the reference to load, while the workers convert
        if replace(Encoding.of(reference), probe=encoding.probe) != encoding:
            raise GigatokenUnusable(f"its vocabulary size or EOD id ({encoding.vocab_size}, {encoding.eod}) "
                                    f"differ from {reference.type_name}'s ({reference.vocab_size}, {reference.eod})")
    by_index = {part.index: part for part in parts}
    assemble(results, list(results))
    documents = 0
    with Progress("preprocess", sum(map(input_bytes, todo)), "bytes", scale=True) as progress:
        for future in as_completed(futures):
            result = future.result()
            part = by_index[result.index]
            if options.backend == GIGATOKEN:
                check_sample(result, part, reference)
            if result.error is not None:
                error = result.error
                line = count_lines_before(part.path, part.start) + error.line  # the worker counted from its part
                raise InputError(error.message, error.path, line, error.fix)
            results[result.index] = result
            assemble(results, [result.index])
            documents += result.documents
            progress.update(input_bytes(part), note=f"{documents:,} documents")
    return results
