"""Generation at corpus scale: G generations per document, sharded, resumable, quality-gated.

Documents are numbered in input order and grouped into shards of `docs_per_shard`; shard k belongs
to task k % task_count, so a SLURM array of any size covers the corpus and the output does not
depend on the number of tasks. The requests of all of a task's shards stream through the backend,
which keeps its engine full. A pair's record is appended to `shard-K.jsonl.partial` (its rejects to
`shard-K.rejected.jsonl.partial`) once all its requests are done, synced every `sync_seconds`
(a kill loses at most that much generation); when a shard's last pair is done, its files are
sorted into input order and renamed. A rerun skips complete shards and continues a partial one
after the (document, generation) pairs it holds; what was written is never generated again.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

from megadoc_megatron.errors import InputError
from megadoc_megatron.files import content_digest, write_text_atomic
from megadoc_megatron.jsonl import expand_inputs, read_documents
from megadoc_megatron.progress import Progress
from megadoc_megatron.synth.backends import Completion, Request, Sampling, chat_token_ids
from megadoc_megatron.synth.chunks import head, split_points, tail, token_starts
from megadoc_megatron.synth.gates import Gates
from megadoc_megatron.synth.prompts import Prompt
from megadoc_megatron.synth.records import GenerationRecord

MANIFEST = "synth.json"


@dataclass(frozen=True)
class SynthConfig:
    operation: str
    prompts: tuple[Prompt, ...]
    generations: int
    generator: dict                      # {"model", "backend"}: recorded in every record
    sampling: Sampling = Sampling()
    gates: Gates = Gates()
    window: int = 8192                   # the generator's context, prompt + completion, in tokens
    long_documents: str = "truncate"     # rephrase: "truncate" or "chunk" what does not fit
    seed: int = 0
    docs_per_shard: int = 1000
    id_key: str = "id"
    text_key: str = "text"

    def manifest(self, inputs: list[Path]) -> dict:
        """Everything that decides what a shard holds; a rerun must match it."""
        return {"operation": self.operation, "styles": {p.style: p.version for p in self.prompts},
                "generations": self.generations, "generator": self.generator, "sampling": asdict(self.sampling),
                "gates": asdict(self.gates), "window": self.window, "long_documents": self.long_documents,
                "seed": self.seed, "docs_per_shard": self.docs_per_shard, "id_key": self.id_key,
                "text_key": self.text_key, "inputs": [[p.name, p.stat().st_size] for p in inputs],
                "input_digests": [content_digest(p) for p in inputs]}  # whole content, read once per version


@dataclass
class Pair:
    """One (document, generation index): its requests (several when a long document is chunked)."""
    source_id: str
    index: int
    prompt: Prompt
    seed: int
    requests: list[Request]
    source_input: dict
    input_tokens: int | None = None      # for the length-ratio gate (rephrase)
    split_char: int | None = None        # rationale


def derive_seed(seed: int, source_id: str, index: int, part: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}\0{source_id}\0{index}\0{part}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class PairMaker:
    """Turns a document into its G pairs, fitting the source into the generator's window."""

    def __init__(self, config: SynthConfig, tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self._overhead: dict[str, int] = {}

    def budget(self, prompt: Prompt) -> int:
        """Source tokens that fit beside the prompt's own text and the completion."""
        if prompt.style not in self._overhead:
            empty = prompt.render(document="", prefix="", suffix="")
            self._overhead[prompt.style] = len(chat_token_ids(self.tokenizer, empty))
        budget = self.config.window - self.config.sampling.max_new_tokens - self._overhead[prompt.style]
        if budget < 32:
            raise InputError(f"a window of {self.config.window} tokens leaves {budget} for the source text after the "
                             f"{prompt.style!r} prompt and {self.config.sampling.max_new_tokens} new tokens",
                             fix="raise --window (the generator's context) or lower --max-new-tokens")
        return budget

    def pairs(self, source_id: str, text: str) -> list[Pair]:
        starts = token_starts(self.tokenizer, text)
        if self.config.operation in ("rephrase", "textbook"):  # the document (or its head) in one prompt
            return [self._rephrase(source_id, text, starts, index) for index in range(self.config.generations)]
        return self._rationales(source_id, text, starts)

    def _prompt(self, index: int) -> Prompt:
        return self.config.prompts[index % len(self.config.prompts)]  # styles take turns over the G generations

    def _rephrase(self, source_id, text, starts, index) -> Pair:
        prompt, seed = self._prompt(index), derive_seed(self.config.seed, source_id, index)
        budget, tokens = self.budget(prompt), len(starts)
        if tokens <= budget:
            parts, handling = [text], "full"
        elif self.config.long_documents == "truncate":
            parts, handling = [head(text, starts, budget)], "truncated"
        else:  # chunk: pieces small enough that snapping a cut to a paragraph keeps each within budget
            cuts = split_points(text, starts, math.ceil(tokens / (0.75 * budget)))
            parts, handling = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])], "chunked"
        requests = [Request(prompt.render(document=part), derive_seed(self.config.seed, source_id, index, i))
                    for i, part in enumerate(parts)]
        used = tokens if handling != "truncated" else budget
        return Pair(source_id, index, prompt, seed, requests,
                    {"handling": handling, "document_tokens": tokens, "used_tokens": used, "parts": len(parts)},
                    input_tokens=used if self.config.operation == "rephrase" else None)  # no length gate on new text

    def _rationales(self, source_id, text, starts) -> list[Pair]:
        cuts = split_points(text, starts, self.config.generations + 1)
        pairs = []
        for index in range(self.config.generations):
            prompt, seed = self._prompt(index), derive_seed(self.config.seed, source_id, index)
            if cuts is None:
                pairs.append(Pair(source_id, index, prompt, seed, [], {"handling": "unsplittable",
                                                                       "document_tokens": len(starts)}))
                continue
            cut = cuts[index]
            before = bisect.bisect_left(starts, cut)  # tokens that start before the cut
            budget = self.budget(prompt)
            prefix_tokens = min(before, max(budget // 2, budget - (len(starts) - before)))
            suffix_tokens = min(len(starts) - before, budget - prefix_tokens)
            prefix = tail(text[:cut], starts[:before], prefix_tokens)
            suffix = head(text[cut:], [s - cut for s in starts[before:]], suffix_tokens)
            handling = "full" if (prefix_tokens, suffix_tokens) == (before, len(starts) - before) else "trimmed"
            pairs.append(Pair(source_id, index, prompt, seed,
                              [Request(prompt.render(prefix=prefix, suffix=suffix), seed)],
                              {"handling": handling, "document_tokens": len(starts), "prefix_tokens": prefix_tokens,
                               "suffix_tokens": suffix_tokens}, split_char=cut))
        return pairs


class Shard:
    """The files of one shard: complete ones, or .partial ones being appended to."""

    def __init__(self, folder: Path, number: int):
        self.accepted = folder / f"shard-{number:05d}.jsonl"
        self.rejected = folder / f"shard-{number:05d}.rejected.jsonl"

    @staticmethod
    def partial(path: Path) -> Path:
        return path.with_name(path.name + ".partial")

    def complete(self) -> bool:
        return self.accepted.exists()

    def done_pairs(self, repair: bool = True) -> set[tuple[str, int]]:
        """Pairs already in the partial files; a torn last line (killed mid-write) is not counted,
        and with `repair` cut off."""
        done = set()
        for path in (self.partial(self.accepted), self.partial(self.rejected)):
            if path.exists():
                for record in _complete_records(path, repair):
                    done.add((record.source_id, record.index))
        return done

    def append(self, accepted: list[GenerationRecord], rejected: list[GenerationRecord]) -> None:
        for path, records in ((self.accepted, accepted), (self.rejected, rejected)):
            with open(self.partial(path), "a", encoding="utf-8") as out:
                out.write("".join(r.to_json() + "\n" for r in records))
                out.flush()
                os.fsync(out.fileno())

    def finish(self, position: dict[str, int]) -> None:
        """Sort the records into input order (completions arrive in any order) and mark the shard done."""
        for path in (self.rejected, self.accepted):  # the accepted file last: its name marks the shard complete
            partial = self.partial(path)
            records = _complete_records(partial) if partial.exists() else []
            records.sort(key=lambda r: (position[r.source_id], r.index))
            write_text_atomic(path, "".join(r.to_json() + "\n" for r in records))
            partial.unlink(missing_ok=True)


def check_manifest(output: Path, manifest: dict) -> dict:
    """Refuses an output folder that holds generations made with settings other than `manifest`."""
    path = output / MANIFEST
    if path.exists():
        previous = json.loads(path.read_text())
        # settings an older version did not record (or no longer records) are not compared
        changed = sorted(k for k in manifest.keys() & previous.keys() if manifest[k] != previous[k])
        if changed:
            raise InputError(f"{output} holds generations made with other settings ({', '.join(changed)} differ)",
                             path, fix="write to a new --output, or rerun with the settings recorded in this file")
    return manifest


def _complete_records(path: Path, repair: bool = True) -> list[GenerationRecord]:
    """The whole lines of a shard file; a torn last line (killed mid-write) is cut off with `repair`."""
    records, good_bytes = [], 0
    with open(path, "rb") as stream:
        for raw in stream:
            if not raw.endswith(b"\n"):
                break
            try:
                records.append(GenerationRecord.from_json(raw))
            except json.JSONDecodeError:
                break
            good_bytes += len(raw)
    if repair and good_bytes != path.stat().st_size:
        with open(path, "r+b") as stream:
            stream.truncate(good_bytes)
    return records


@dataclass
class Throughput:
    started: float = field(default_factory=time.perf_counter)
    documents: int = 0
    pairs: int = 0
    requests: int = 0
    generated_tokens: int = 0
    rejected: int = 0

    def as_dict(self) -> dict:
        wall = time.perf_counter() - self.started
        counts = {k: v for k, v in asdict(self).items() if k != "started"}
        return {**counts, "wall_seconds": round(wall, 3),
                "documents_per_second": round(self.documents / wall, 4) if wall else 0.0,
                "generated_tokens_per_second": round(self.generated_tokens / wall, 2) if wall else 0.0}


@dataclass(eq=False)
class ShardWork:
    """A shard being generated: records waiting to be written, and pairs not yet done."""
    shard: Shard
    position: dict[str, int]             # document id -> its place in the shard, for the final order
    accepted: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    running: int = 0                     # pairs submitted and not yet done
    planned: bool = False                # every pair of the shard submitted


@dataclass(eq=False)
class PairWork:
    shard: ShardWork
    pair: Pair
    completions: list

    @property
    def done(self) -> bool:
        return all(c is not None for c in self.completions)


class Synthesizer:
    def __init__(self, config: SynthConfig, make_backend, tokenizer, output: Path, task_index: int = 0,
                 task_count: int = 1, progress: bool = True, sync_seconds: float = 2.0,
                 held_out: list[str] | None = None):
        """`make_backend()` is called once there is work to do: bad input fails before a model loads."""
        if not 0 <= task_index < task_count:
            raise InputError(f"task index {task_index} is not in [0, {task_count})",
                             fix="pass --task-index < --task-count")
        self.config, self.make_backend, self.backend, self.output = config, make_backend, None, Path(output)
        self.pair_maker = PairMaker(config, tokenizer)
        self.task_index, self.task_count, self.show_progress = task_index, task_count, progress
        self.sync_seconds, self.held_out = sync_seconds, held_out
        self.throughput = Throughput()
        self._unwritten: list[ShardWork] = []
        self._flushed = time.monotonic()

    def owns(self, shard: int) -> bool:
        return shard % self.task_count == self.task_index

    def run(self, inputs: list[Path]) -> dict:
        manifest = self._checked_manifest(inputs)
        documents = self._count_checked(inputs)
        write_text_atomic(self.output / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        per_shard = self.config.docs_per_shard
        todo = {n for n in range(math.ceil(documents / per_shard))
                if self.owns(n) and not Shard(self.output, n).complete()}
        if todo and self.backend is None:
            self.backend = self.make_backend()
        generations = sum(min(per_shard, documents - n * per_shard) for n in todo) * self.config.generations
        self.progress = Progress(f"synth {self.config.operation}", generations, "generations",
                                 enabled=self.show_progress)
        try:
            for (work, part), completion in self.backend.stream(self._requests(inputs, todo), self.config.sampling) \
                    if todo else ():
                work.completions[part] = completion
                if work.done:
                    self._pair_done(work)
        finally:
            self._flush()  # a failing backend keeps what finished before it failed
        self.progress.close()
        summary = self.summary(documents)
        name = "summary.json" if self.task_count == 1 else f"summary.task-{self.task_index:05d}.json"
        write_text_atomic(self.output / name, json.dumps(summary, indent=2) + "\n")
        return summary

    def _documents(self, inputs: list[Path]):
        return read_documents(inputs, self.config.id_key, self.config.text_key)

    def _count_checked(self, inputs: list[Path]) -> int:
        """The input documents, every record validated before anything is written, none of them held out
        (by id or text: the held-out loss would measure rephrases of its own documents)."""
        def digest(text: str) -> bytes:
            return hashlib.blake2b(text.encode(), digest_size=16).digest()

        held_out = expand_inputs(self.held_out) if self.held_out else []
        held = {key: where for document_id, text in self._documents(held_out)
                for key, where in ((document_id, "id"), (digest(text), "text"))}
        count = 0
        for document_id, text in self._documents(inputs):
            count += 1
            same = held.get(document_id) or held.get(digest(text))
            if same:
                raise InputError(f"input document {document_id!r} is a held-out document (the same {same})",
                                 held_out[0], fix="rephrase training documents only: take the held-out documents "
                                                  "out of --input")
        return count

    def _checked_manifest(self, inputs: list[Path]) -> dict:
        """This run's settings, refused if the output folder holds generations made with others."""
        manifest = check_manifest(self.output, self.config.manifest(inputs))
        self.output.mkdir(parents=True, exist_ok=True)
        return manifest

    def _requests(self, inputs: list[Path], todo: set[int]) -> Iterator[tuple[tuple[PairWork, int], Request]]:
        """The requests of every pair still to do, shard after shard (one shard's documents in memory at
        a time); the backend pulls them as it has room."""
        per_shard = self.config.docs_per_shard
        for number, group in itertools.groupby(enumerate(self._documents(inputs)), key=lambda d: d[0] // per_shard):
            if number not in todo:
                continue
            documents = [document for _, document in group]
            shard = ShardWork(Shard(self.output, number), {d: i for i, (d, _) in enumerate(documents)})
            done = shard.shard.done_pairs()
            self.progress.update(len(done))
            for document_id, text in documents:
                for pair in self.pair_maker.pairs(document_id, text):
                    if (pair.source_id, pair.index) in done:
                        continue
                    work, shard.running = PairWork(shard, pair, [None] * len(pair.requests)), shard.running + 1
                    if not pair.requests:  # nothing to generate (an unsplittable document)
                        self._pair_done(work)
                    yield from (((work, part), request) for part, request in enumerate(pair.requests))
                self.throughput.documents += 1
            shard.planned = True
            self._finish_if_done(shard)

    def _pair_done(self, work: PairWork) -> None:
        shard = work.shard
        record, reason = self._record(work.pair, work.completions)
        if reason is None:
            shard.accepted.append(record)
        else:
            shard.rejected.append(replace(record, reject_reason=reason))
            self.throughput.rejected += 1
        if shard not in self._unwritten:
            self._unwritten.append(shard)
        shard.running -= 1
        self.throughput.pairs += 1
        self.throughput.requests += len(work.pair.requests)
        self._finish_if_done(shard)
        if time.monotonic() - self._flushed >= self.sync_seconds:
            self._flush()
        rates = self.throughput.as_dict()
        self.progress.update(1, note=f"{rates['documents_per_second']:.2f} documents/s, "
                                     f"{rates['generated_tokens_per_second']:.0f} tokens/s, "
                                     f"{self.throughput.rejected} rejected")

    def _flush(self) -> None:
        """Append (and sync) the records of the pairs done since the last flush."""
        for shard in self._unwritten:
            shard.shard.append(shard.accepted, shard.rejected)
            shard.accepted, shard.rejected = [], []
        self._unwritten, self._flushed = [], time.monotonic()

    def _finish_if_done(self, shard: ShardWork) -> None:
        if shard.planned and shard.running == 0:
            self._flush()
            shard.shard.finish(shard.position)

    def _record(self, pair: Pair, completions: list[Completion]) -> tuple[GenerationRecord, str | None]:
        text = "\n\n".join(c.text for c in completions)
        finish = "unsplittable" if not completions else (
            "length" if any(c.finish_reason == "length" for c in completions) else "stop")
        completion_tokens = sum(c.completion_tokens for c in completions)
        self.throughput.generated_tokens += completion_tokens
        record = GenerationRecord(
            source_id=pair.source_id, operation=self.config.operation, index=pair.index, style=pair.prompt.style,
            prompt_version=pair.prompt.version,
            generator={**self.config.generator, "sampling": asdict(self.config.sampling)},
            seed=pair.seed, finish_reason=finish, prompt_tokens=sum(c.prompt_tokens for c in completions),
            completion_tokens=completion_tokens, text=text, source_input=pair.source_input, split_char=pair.split_char)
        reason = "unsplittable" if not completions else self.config.gates.reason(
            text, completion_tokens, finish, pair.input_tokens)
        return record, reason

    def summary(self, documents: int) -> dict:
        """Counts over every shard this task owns (so a resumed run reports the whole), and this run's speed."""
        kept, rejected, tokens = Counter(), Counter(), Counter()
        shards = sorted({n for n in range(math.ceil(documents / self.config.docs_per_shard)) if self.owns(n)})
        for number in shards:
            shard = Shard(self.output, number)
            for path, counter in ((shard.accepted, kept), (shard.rejected, rejected)):
                for record in _complete_records(path) if path.exists() else []:
                    key = record.style if counter is kept else f"{record.style}/{record.reject_reason}"
                    counter[key] += 1
                    tokens["accepted" if counter is kept else "rejected"] += record.completion_tokens
        reasons = Counter()
        for key, count in rejected.items():
            reasons[key.split("/", 1)[1]] += count
        return {"operation": self.config.operation, "output": str(self.output),
                "task": [self.task_index, self.task_count],
                "shards": len(shards), "accepted": sum(kept.values()), "rejected": sum(rejected.values()),
                "accepted_per_style": dict(sorted(kept.items())), "rejected_per_reason": dict(sorted(reasons.items())),
                "rejected_per_style_and_reason": dict(sorted(rejected.items())), "completion_tokens": dict(tokens),
                "this_run": self.throughput.as_dict()}


def run_synthesis(config: SynthConfig, make_backend, tokenizer, inputs: list[str], output, **options) -> dict:
    return Synthesizer(config, make_backend, tokenizer, Path(output), **options).run(expand_inputs(inputs))
