"""The outputs: one assembler per dataset (joining part files as they come), the datasets and their
sidecars committed, and one rejects file for the run."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np

from megadoc_megatron import __version__
from megadoc_megatron.data.dataset_info import DatasetInfo, dataset_prefix
from megadoc_megatron.data.indexed import DatasetAssembler
from megadoc_megatron.data.preprocess.parts import Options
from megadoc_megatron.data.tokenizer import optimal_dtype
from megadoc_megatron.jsonl import count_lines_before


def dataset_assemblers(groups, stems, options: Options, dtype: str) -> dict:
    """One per output dataset: (output prefix, key) -> its DatasetAssembler over the group's parts."""
    parts_dir = Path(options.parts_dir)
    assemblers = {}
    for (output_prefix, group), key in itertools.product(groups, options.json_keys):
        files = [parts_dir / f"{stems[part.index]}.{key}" for part in group]
        assemblers[output_prefix, key] = DatasetAssembler(
            dataset_prefix(output_prefix, key), np.dtype(dtype).type,
            [Path(f"{f}.tokens") for f in files], [Path(f"{f}.lengths") for f in files])
    return assemblers


def merge_rejects(parts, results, parts_dir: Path, destination: Path) -> None:
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


def commit_outputs(groups, assemblers, results, options: Options, tokenizer: dict) -> list[DatasetInfo]:
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
