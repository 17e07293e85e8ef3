"""Cost before compute: what `megadoc synth OPERATION ... --dry-run` would submit, and its GPU-hours.

The plan walks the corpus with the pipeline's own `PairMaker`, so documents, pairs and requests
(several per pair where a long document is chunked) are exactly those a run submits, and prompt
tokens are the chat-template counts the backends send (`chat_token_ids`; for rationales, whose
every prompt holds most of its document, the prompt's own tokens plus the pair maker's prefix and
suffix token counts, within a few tokens per request, rather than G passes over the corpus).
Output tokens cannot be known before generating, so the plan gives
- an upper bound for every operation: --max-new-tokens per request;
- an estimate for rephrases: min(source tokens, --max-new-tokens) per request (a rephrase about
  as long as its source), the source tokens being those the request holds (the document, or its
  head or chunk);
- with --calibrate, output tokens per request measured on the first documents, times the requests.
GPU-hours = output tokens / output tokens per second per GPU / 3600, at --tokens-per-second or at
the throughput --calibrate N measures (the backend built as a run builds it, then a real
generation of the first N documents' requests, timed apart from start-up).

The plan covers the whole corpus whatever --task-index/--task-count (it says what this task owns);
pairs already in --output (complete shards, and the pairs of partial ones) are done and not costed.
Nothing is written, and no model is loaded unless --calibrate asks for it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megadoc_megatron.errors import InputError
from megadoc_megatron.jsonl import expand_inputs, read_documents
from megadoc_megatron.synth.backends import chat_token_ids, generate
from megadoc_megatron.synth.pipeline import PairMaker, Shard, SynthConfig, check_manifest

PROMPT_COUNTS = {
    "chat template": "the chat-template token count of every request, as the backends send it",
    "sum of parts": "the prompt's own tokens (instructions, chat template) plus the prefix and suffix tokens "
                    "the pair maker put in: within a few tokens per request of the chat-template count, without "
                    "tokenizing every prompt (each holds most of its document: G passes over the corpus)"}
PUBLIC_FIGURES = ("public figures, not measured here: an 8B model decodes about 6,000-8,000 output tokens/s per H100 "
                  "with vLLM at large batch")
SCOPE = "the whole corpus: every shard of every task (--task-index/--task-count do not narrow the plan)"


@dataclass
class Tally:
    """Work of a set of pairs: requests, prompt tokens, output tokens (estimate and upper bound)."""
    pairs: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    output_estimate: int = 0
    output_upper_bound: int = 0

    def add(self, other: Tally) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self, estimated: bool) -> dict:
        return {"pairs": self.pairs, "requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "output_tokens": {"estimate": self.output_estimate if estimated else None,
                                  "upper_bound": self.output_upper_bound}}


@dataclass
class PairCounter:
    """Counts the requests of pairs; prompt tokens are tokenized once per distinct prompt of a document."""
    config: SynthConfig
    tokenizer: object
    overhead: dict = field(default_factory=dict)
    prompts: dict = field(default_factory=dict)

    def prompt_tokens(self, messages) -> int:
        key = json.dumps(messages)
        if key not in self.prompts:
            self.prompts[key] = len(chat_token_ids(self.tokenizer, messages))
        return self.prompts[key]

    def prompt_overhead(self, prompt) -> int:
        """Tokens of the prompt around the source text (instructions and chat template)."""
        if prompt.style not in self.overhead:
            self.overhead[prompt.style] = len(chat_token_ids(self.tokenizer, prompt.render(document="", prefix="",
                                                                                           suffix="")))
        return self.overhead[prompt.style]

    def tally(self, pair) -> Tally:
        limit = self.config.sampling.max_new_tokens
        if self.config.operation == "rationale":  # the prompt's own tokens and the pair maker's prefix/suffix counts
            counts = [self.prompt_overhead(pair.prompt) + pair.source_input["prefix_tokens"]
                      + pair.source_input["suffix_tokens"]] if pair.requests else []
            return Tally(1, len(counts), sum(counts), 0, limit * len(counts))
        counts = [self.prompt_tokens(r.messages) for r in pair.requests]
        if len(counts) == 1 and pair.source_input.get("used_tokens") is not None:
            sources = [pair.source_input["used_tokens"]]  # the document, or its head: the pair maker's own count
        else:  # chunks: the request's tokens less the prompt's own
            sources = [max(count - self.prompt_overhead(pair.prompt), 0) for count in counts]
        return Tally(1, len(counts), sum(counts), sum(min(s, limit) for s in sources), limit * len(counts))


def done_pairs(output: Path, config: SynthConfig, inputs: list[Path]) -> tuple[set[int], set[tuple[str, int]]]:
    """(complete shard numbers, pairs in partial shards) already in `output`, read without changing
    anything; an output made with other settings is refused, as a run would refuse it."""
    check_manifest(output, config.manifest(inputs))
    numbers = {int(path.name[len("shard-"):].split(".")[0]) for path in output.glob("shard-*.jsonl*")}
    complete = {n for n in numbers if Shard(output, n).complete()}
    partial = set().union(*(Shard(output, n).done_pairs(repair=False) for n in numbers - complete))
    return complete, partial


def plan_synthesis(config: SynthConfig, tokenizer, inputs: list[str], output, task: tuple[int, int] = (0, 1)) -> dict:
    """Counts of the whole corpus, of what is already done in `output`, and of what is left (for
    the whole corpus and, in an array, for this task's shards)."""
    files = expand_inputs(inputs)
    task_index, task_count = task
    if not 0 <= task_index < task_count:
        raise InputError(f"task index {task_index} is not in [0, {task_count})", fix="pass --task-index < --task-count")
    complete, partial = done_pairs(Path(output), config, files)
    pair_maker, counter = PairMaker(config, tokenizer), PairCounter(config, tokenizer)
    whole, left, mine, handling = Tally(), Tally(), Tally(), Counter()
    documents = 0
    for number, (document_id, text) in enumerate(read_documents(files, config.id_key, config.text_key)):
        documents += 1
        shard = number // config.docs_per_shard
        counter.prompts.clear()  # the same prompt recurs only within a document (its G generations)
        for pair in pair_maker.pairs(document_id, text):
            tally = counter.tally(pair)
            handling[pair.source_input["handling"]] += 1
            whole.add(tally)
            if shard not in complete and (pair.source_id, pair.index) not in partial:
                left.add(tally)
                if shard % task_count == task_index:
                    mine.add(tally)
    if documents == 0:
        raise InputError("the input holds no documents", inputs[0], fix="give JSONL files with id and text")
    estimated = config.operation == "rephrase"
    plan = {"plan": f"synth {config.operation}", "scope": SCOPE, "documents": documents,
            "generations": config.generations, **whole.as_dict(estimated),
            "prompt_tokens_counted_as": "sum of parts" if config.operation == "rationale" else "chat template",
            "handling": dict(sorted(handling.items())), "max_new_tokens": config.sampling.max_new_tokens,
            "shards": math.ceil(documents / config.docs_per_shard),
            "done": {"complete_shards": len(complete), "pairs": whole.pairs - left.pairs},
            "remaining": left.as_dict(estimated)}
    if task_count > 1:
        plan["this_task"] = {"task": [task_index, task_count], **mine.as_dict(estimated)}
    return plan


def calibrate(config: SynthConfig, tokenizer, inputs: list[str], make_backend, documents: int, gpus: int) -> dict:
    """Build the backend (timed as start-up), then generate every request of the first `documents`
    documents in one call (timed as generation): output tokens per second, per GPU, per request."""
    if documents < 1:
        raise InputError("--calibrate needs at least 1 document", fix="e.g. --calibrate 64")
    pair_maker, requests, used = PairMaker(config, tokenizer), [], 0
    for document_id, text in read_documents(expand_inputs(inputs), config.id_key, config.text_key):
        if used == documents:
            break
        requests += [r for pair in pair_maker.pairs(document_id, text) for r in pair.requests]
        used += 1
    if not requests:
        raise InputError(f"the first {used} documents make no requests (too short to split?)",
                         fix="calibrate on more documents")
    start = time.perf_counter()
    backend = make_backend()
    ready = time.perf_counter()
    completions = generate(backend, requests, config.sampling)
    seconds = time.perf_counter() - ready
    tokens = sum(c.completion_tokens for c in completions)
    return {"documents": used, "requests": len(requests), "startup_seconds": round(ready - start, 3),
            "generation_seconds": round(seconds, 3), "output_tokens": tokens, "gpus": gpus,
            "output_tokens_per_second": tokens / seconds, "output_tokens_per_second_per_gpu": tokens / seconds / gpus,
            "output_tokens_per_request": tokens / len(requests)}


def gpu_hours(output_tokens: int | float | None, tokens_per_second: float) -> float | None:
    """GPU-hours to generate `output_tokens` at `tokens_per_second` output tokens per second per GPU."""
    return None if output_tokens is None else output_tokens / tokens_per_second / 3600


def add_costs(plan: dict, tokens_per_second: float | None, source: str, calibration: dict | None = None) -> dict:
    """GPU-hours of what is left, from each output-token figure, at the given throughput."""
    plan["throughput"] = None if tokens_per_second is None else {
        "output_tokens_per_second_per_gpu": tokens_per_second, "source": source}
    if calibration is not None:
        plan["calibration"] = calibration
        plan["remaining"]["output_tokens"]["calibrated"] = round(
            calibration["output_tokens_per_request"] * plan["remaining"]["requests"])
    if tokens_per_second is None:
        plan["gpu_hours"] = None
    else:
        if tokens_per_second <= 0:
            raise InputError(f"--tokens-per-second must be positive, not {tokens_per_second}", fix="e.g. 7000")
        plan["gpu_hours"] = {name: gpu_hours(value, tokens_per_second)
                             for name, value in plan["remaining"]["output_tokens"].items()}
    plan["notes"] = notes(plan)
    return plan


def notes(plan: dict) -> list[str]:
    estimated = plan["output_tokens"]["estimate"] is not None
    lines = ["output_tokens.upper_bound: --max-new-tokens for every request (a bound, not a forecast)",
             "output_tokens.estimate: min(source tokens, --max-new-tokens) per request" if estimated else
             f"no estimate for {plan['plan']}: its length does not follow the source's; the upper bound is used",
             f"prompt_tokens: {PROMPT_COUNTS[plan['prompt_tokens_counted_as']]}",
             "prompt tokens (prefill) are not in GPU-hours: the throughput is output tokens/s"]
    if "calibrated" in plan["remaining"]["output_tokens"]:
        lines.append("output_tokens.calibrated: output tokens per request measured by --calibrate, times the requests")
    if plan["throughput"] is None:
        lines += ["GPU-hours: pass --tokens-per-second X (output tokens/s per GPU) or --calibrate N", PUBLIC_FIGURES]
    return lines


def plan_command(args, config: SynthConfig, tokenizer, make_backend, task: tuple[int, int]) -> dict:
    """`megadoc synth OPERATION ... --dry-run`: print the plan (readable on stderr, JSON on stdout)."""
    if args.tokens_per_second is not None and args.calibrate is not None:
        raise InputError("--tokens-per-second and --calibrate both give the throughput", fix="pass one of them")
    plan = plan_synthesis(config, tokenizer, args.input, args.output, task)
    calibration, rate, source = None, args.tokens_per_second, "--tokens-per-second"
    if args.calibrate is not None:
        gpus = args.tensor_parallel_size if args.backend == "vllm" else 1
        calibration = calibrate(config, tokenizer, args.input, make_backend, args.calibrate, gpus)
        rate, source = calibration["output_tokens_per_second_per_gpu"], f"--calibrate {args.calibrate} ({args.backend})"
    add_costs(plan, rate, source, calibration)
    print(format_plan(plan), file=sys.stderr)
    print(json.dumps(plan, indent=2))
    return plan


def _hours(value: float | None) -> str:
    return "—" if value is None else f"{value:,.2f}" if value >= 0.1 else f"{value:.2g}"


def format_plan(plan: dict) -> str:
    left, limit = plan["remaining"], plan["max_new_tokens"]
    counted = "chat template" if plan["prompt_tokens_counted_as"] == "chat template" else \
        "prompt + prefix + suffix tokens, within a few per request"
    lines = [f"{plan['plan']} --dry-run: {plan['scope']}",
             f"  documents          {plan['documents']:>14,}   in {plan['shards']:,} shards",
             f"  generations (G)    {plan['generations']:>14,}",
             f"  pairs              {plan['pairs']:>14,}   {plan['done']['pairs']:,} done, "
             f"{left['pairs']:,} to generate",
             f"  requests           {plan['requests']:>14,}   {left['requests']:,} to send "
             f"(source handling per pair: {', '.join(f'{k} {v:,}' for k, v in plan['handling'].items())})",
             f"  prompt tokens      {plan['prompt_tokens']:>14,}   {left['prompt_tokens']:,} to send ({counted})"]
    labels = {"estimate": f"estimate: min(source tokens, {limit}) per request",
              "upper_bound": f"upper bound: --max-new-tokens {limit} per request",
              "calibrated": "measured per request by --calibrate, times the requests"}
    for name, value in left["output_tokens"].items():
        if value is not None:
            lines.append(f"  output tokens      {value:>14,}   {labels[name]} (to generate)")
    if plan.get("calibration"):
        c = plan["calibration"]
        lines.append(f"  calibration        {c['output_tokens_per_second_per_gpu']:>14,.1f}   output tokens/s per GPU: "
                     f"{c['output_tokens']:,} tokens of {c['requests']} requests ({c['documents']} documents) in "
                     f"{c['generation_seconds']:.1f} s after {c['startup_seconds']:.1f} s of start-up; few requests "
                     "underfill a batching engine, so this errs low")
    if plan["gpu_hours"] is None:
        lines += ["  GPU-hours          pass --tokens-per-second X (output tokens/s per GPU) or --calibrate N "
                  "(time N documents on this backend)", f"                     {PUBLIC_FIGURES}"]
    else:
        rate = plan["throughput"]["output_tokens_per_second_per_gpu"]
        figures = ", ".join(f"{_hours(v)} ({k.replace('_', ' ')})" for k, v in plan["gpu_hours"].items()
                            if v is not None)
        lines.append(f"  GPU-hours          {figures} at {rate:,.1f} output tokens/s per GPU "
                     f"({plan['throughput']['source']})")
    if "this_task" in plan:
        mine = plan["this_task"]
        lines.append(f"  this task          {mine['task'][0]} of {mine['task'][1]}: {mine['pairs']:,} pairs, "
                     f"{mine['requests']:,} requests to generate")
    return "\n".join(lines)
