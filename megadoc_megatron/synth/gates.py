"""Cheap quality gates on generated text. A rejected generation keeps its reason and goes to the
shard's side file; nothing is dropped silently."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gates:
    min_tokens: int = 16              # shorter outputs are rejected (the pair is skipped, and recorded)
    min_length_ratio: float = 0.2     # rephrase only: output tokens / input tokens
    max_length_ratio: float = 4.0
    allow_truncated: bool = False     # accept outputs cut off by max_new_tokens
    max_repeated_ngrams: float = 0.5  # fraction of word 4-grams that repeat an earlier one
    ngram: int = 4

    def reason(self, text: str, completion_tokens: int, finish_reason: str, input_tokens: int | None) -> str | None:
        """Why this output is rejected, or None to keep it. `input_tokens` None skips the ratio gate."""
        if not text.strip():
            return "empty"
        if finish_reason == "length" and not self.allow_truncated:
            return "truncated"
        if completion_tokens < self.min_tokens:
            return "too_short"
        if input_tokens:
            ratio = completion_tokens / input_tokens
            cut_short = finish_reason == "length"  # a kept truncation: max_new_tokens, not the model, set its length
            if ratio > self.max_length_ratio or ratio < self.min_length_ratio and not cut_short:
                return "length_ratio"
        if repeated_ngram_fraction(text, self.ngram) > self.max_repeated_ngrams:
            return "repetition"
        return None


def repeated_ngram_fraction(text: str, n: int) -> float:
    """Share of the word n-grams that already occurred earlier in the text (0 for short texts)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2 * n:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
