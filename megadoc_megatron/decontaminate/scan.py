"""Synthetic records that quote held-out text: the generator may reproduce held-out documents it
memorized, and a rephrase can quote text that the held-out set (or a benchmark) also holds.

Each record's text is compared with every held-out document (and every lm-eval task document
named) by word n-gram overlap (data/overlap.py): a record is contaminated when it and some reference
document share `overlap_threshold` of the smaller one's n-grams. The report names how many records,
which reference documents, and examples with a quoted n-gram; with `output`, the records that are
not contaminated are copied there unchanged (the file the next stage converts)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

from megadoc_megatron.data.overlap import NGRAM, THRESHOLD, NgramIndex, check_settings, text_units
from megadoc_megatron.errors import InputError
from megadoc_megatron.files import write_text_atomic
from megadoc_megatron.jsonl import expand_inputs, iter_lines, parse_record, require_fields
from megadoc_megatron.megadocs.assemble import MegadocsSummary, length_stats
from megadoc_megatron.progress import Progress

EXAMPLES = 10


@dataclass
class DecontaminateConfig:
    """The settings of `megadoc decontaminate`."""
    inputs: list[str]                    # synthetic JSONL: megadocs or generation records
    held_out: list[str]                  # held-out JSONL
    report: str                          # the report (JSON)
    output: str | None = None            # write the records that are not contaminated here
    tasks: list[str] | None = None       # lm-eval tasks whose documents count as held out too
    include_path: str | None = None      # lm-eval task YAMLs
    text_key: str = "text"               # of the inputs
    held_out_text_key: str = "text"
    id_key: str = "id"                   # names documents in the report (file:line where absent)
    overlap_ngram: int = NGRAM           # n-gram length, in words
    overlap_threshold: float = THRESHOLD


@dataclass
class DecontaminationSummary:
    records: int
    contaminated: int
    references: int                      # held-out (and task) documents compared against
    overlap_ngram: int
    overlap_threshold: float
    inputs: list[str]
    output: str | None
    by_reference: dict[str, int] = field(default_factory=dict)  # reference document -> contaminated records
    examples: list[dict] = field(default_factory=list)


def _records(files: list[Path], text_key: str) -> Iterator[tuple[Path, int, bytes, dict]]:
    """(file, line, raw line, record) of every non-blank line, each with a text string."""
    for path in files:
        for number, raw in enumerate(iter_lines(path), start=1):
            if raw.strip():
                record = parse_record(raw, path, number)
                require_fields(record, {text_key: str}, path, number, "record")
                yield path, number, raw, record


def _record_count(files: list[Path]) -> int:
    """Non-blank lines, counted before the scan so that its progress has a total."""
    return sum(1 for path in files for raw in iter_lines(path) if raw.strip())


def _name(record: dict, id_key: str, path: Path, line: int) -> str:
    value = record.get(id_key)
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else f"{path.name}:{line}"


def _references(config: DecontaminateConfig) -> tuple[list[str], list[str]]:
    """(names, texts) of the held-out documents and the tasks' documents."""
    names, texts = [], []
    for path, line, _, record in _records(expand_inputs(config.held_out), config.held_out_text_key):
        names.append(_name(record, config.id_key, path, line))
        texts.append(record[config.held_out_text_key])
    if config.tasks:
        from megadoc_megatron.data.tasks import task_texts

        for name, text in task_texts(config.tasks, config.include_path):
            names.append(name)
            texts.append(text)
    if not texts:
        raise InputError("the held-out set holds no documents", config.held_out[0],
                         fix="pass the held-out JSONL the experiment evaluates on")
    return names, texts


def _quote(record_text: str, reference_text: str, n: int) -> str:
    """The first n words of the record that the reference holds too (as the report's evidence)."""
    words, reference = record_text.split(), reference_text.lower().split()
    held = {tuple(reference[i:i + n]) for i in range(len(reference))}
    for start in range(max(len(words) - n + 1, 1)):
        if tuple(w.lower() for w in words[start:start + n]) in held:
            return " ".join(words[start:start + n])
    return " ".join(words[:n])  # matched after lowercasing and dropping punctuation


def _keep_megadocs_summary(files: list[Path], output: Path, chars: list[int], originals: int, dropped: int,
                           report: str) -> None:
    """Megadocs come with a summary that `megadoc blend` reads (the share of real text in them): the
    output of one megadocs file gets one too, of the records kept."""
    if len(files) != 1 or not MegadocsSummary.path_of(files[0]).is_file():
        return
    source = MegadocsSummary.load(files[0])
    replace(source, documents=len(chars), chars=sum(chars), original_chars=originals,
            chars_per_document=length_stats(chars), tokens_per_document=None, output=str(output),
            settings={**source.settings, "decontaminated": {"dropped": dropped, "report": str(report)}}).save()


def decontaminate(config: DecontaminateConfig) -> DecontaminationSummary:
    check_settings(config.overlap_ngram, config.overlap_threshold)
    files = expand_inputs(config.inputs)
    names, texts = _references(config)
    index = NgramIndex((text_units(t) for t in texts), config.overlap_ngram)
    records = _record_count(files)

    def units(progress: Progress):
        for _, _, _, record in _records(files, config.text_key):
            progress.update()
            yield text_units(record[config.text_key])

    with Progress("decontaminate (scan)", records, "records") as progress:
        found = {o.query: o for o in index.overlaps(units(progress)) if o.fraction >= config.overlap_threshold}
    summary = DecontaminationSummary(records, len(found), len(names), config.overlap_ngram, config.overlap_threshold,
                                     [str(f) for f in files], config.output)
    output = Path(config.output) if config.output else None
    temporary = output.with_name(f"{output.name}.{os.getpid()}.tmp") if output else None
    kept_chars, kept_originals = [], 0
    try:
        with (open(temporary, "wb") if temporary else open(os.devnull, "wb") as kept,
              Progress("decontaminate (report)", records, "records") as progress):
            for number, (path, line, raw, record) in enumerate(_records(files, config.text_key)):
                progress.update()
                overlap = found.get(number)
                if overlap is None:
                    kept.write(raw if raw.endswith(b"\n") else raw + b"\n")
                    kept_chars.append(len(record[config.text_key]))
                    kept_originals += record.get("original_chars") or 0  # megadocs records say how much is real
                    continue
                reference = names[overlap.reference]
                summary.by_reference[reference] = summary.by_reference.get(reference, 0) + 1
                if len(summary.examples) < EXAMPLES:
                    summary.examples.append({
                        "record": _name(record, config.id_key, path, line), "file": str(path), "line": line,
                        "reference": reference, "overlap": round(overlap.fraction, 4), "shared_ngrams": overlap.shared,
                        "quote": _quote(record[config.text_key], texts[overlap.reference], config.overlap_ngram)})
    except BaseException:  # nothing half-written is left beside the output
        if temporary:
            temporary.unlink(missing_ok=True)
        raise
    if temporary:
        _keep_megadocs_summary(files, output, kept_chars, kept_originals, summary.contaminated, config.report)
        os.replace(temporary, output)
    write_text_atomic(Path(config.report), json.dumps(asdict(summary), indent=2) + "\n")
    return summary
