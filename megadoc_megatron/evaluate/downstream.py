"""Downstream accuracy with lm-eval-harness: an `LM` adapter that answers loglikelihood requests
with a `megadoc train` checkpoint and its training tokenizer.

The papers' tasks (arc_easy, arc_challenge, hellaswag, piqa, sciq, winogrande) are
multiple-choice loglikelihood tasks. Hub access is switched off: a task runs only when its data
is in the local HF datasets cache, or the task reads local files (`--include-path` of task YAMLs).
"""

from __future__ import annotations

import torch

from megadoc_megatron.data.tasks import offline


def continuation_logprob(model, context: list[int], continuation: list[int], seq_length: int,
                         device) -> tuple[float, bool]:
    """(sum of log p(continuation | context), whether every continuation token is the argmax)."""
    tokens = (context + continuation)[-(seq_length + 1):]
    x = torch.as_tensor(tokens, device=device)[None]
    with torch.no_grad():
        logits = model(x[:, :-1], torch.arange(x.shape[1] - 1, device=device)[None], None)
    logprobs = torch.log_softmax(logits[0, -len(continuation):].float(), dim=-1)
    target = x[0, -len(continuation):]
    picked = logprobs.gather(1, target[:, None])[:, 0]
    return float(picked.sum()), bool((logprobs.argmax(-1) == target).all())


def adapter(loaded, tokenizer, device):
    """An lm-eval `LM` over a loaded checkpoint (lm_eval is imported only here)."""
    from lm_eval.api.model import LM

    class MegadocLM(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            results = []
            for request in requests:
                context, continuation = request.args
                # as lm-eval's HF model does: trailing spaces of the context belong to the continuation
                stripped = context.rstrip(" ")
                continuation = context[len(stripped):] + continuation
                context_ids = tokenizer.encode_batch([stripped])[0] if stripped else [tokenizer.eod]
                continuation_ids = tokenizer.encode_batch([continuation])[0]
                results.append(continuation_logprob(loaded.model, context_ids, continuation_ids, loaded.seq_length,
                                                    device))
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            results = []
            for request in requests:
                tokens = [tokenizer.eod] + tokenizer.encode_batch([request.args[0]])[0]
                total = 0.0
                for start in range(0, len(tokens) - 1, loaded.seq_length):
                    window = tokens[start:start + loaded.seq_length + 1]
                    total += continuation_logprob(loaded.model, window[:1], window[1:], loaded.seq_length, device)[0]
                results.append(total)
            return results

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("megadoc checkpoints answer loglikelihood tasks only (the papers' benchmarks "
                                      "are multiple choice); generation tasks are not supported")

    return MegadocLM()


def downstream_accuracy(loaded, device, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                        num_fewshot: int | None = None) -> dict:
    """{"accuracy": {task: acc}, "accuracy_norm": {...}, "stderr": {...}, "samples": {task: n}}."""
    offline()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megadoc_megatron.data.tokenizer import load_tokenizer

    spec = loaded.tokenizer
    tokenizer = load_tokenizer(spec["type"], spec["model"])
    output = lm_eval.simple_evaluate(model=adapter(loaded, tokenizer, device), tasks=tasks, limit=limit,
                                     num_fewshot=num_fewshot, task_manager=TaskManager(include_path=include_path),
                                     log_samples=False, bootstrap_iters=1000)
    results = output["results"]
    return {"accuracy": {t: results[t].get("acc,none") for t in tasks},
            "accuracy_norm": {t: results[t].get("acc_norm,none") for t in tasks},
            "stderr": {t: results[t].get("acc_stderr,none") for t in tasks},
            "samples": {t: output.get("n-samples", {}).get(t, {}).get("effective") for t in tasks}}
