"""Where to cut a document: into pieces of about equal token count, on paragraph or sentence
boundaries where one is near, else between words."""

from __future__ import annotations

import bisect
import re

_PARAGRAPH_END = re.compile(r"\n\s*\n\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_WORD_START = re.compile(r"\s+")


def token_starts(tokenizer, text: str) -> list[int]:
    """The character offset where each token of `text` begins (fast HF tokenizers)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [start for start, _ in offsets]


def split_points(text: str, starts: list[int], pieces: int, slack: float = 0.25) -> list[int] | None:
    """pieces - 1 increasing character offsets that cut `text` into `pieces` parts of about equal
    token count; each cut snaps to a paragraph end, else a sentence end, within `slack` of a part's
    length, else to the nearest word start, else stays at its token boundary. None when the text has
    too few tokens for that many non-empty parts."""
    if pieces < 2:
        return []
    if len(starts) < pieces:
        return None
    paragraphs = [m.end() for m in _PARAGRAPH_END.finditer(text) if m.end() < len(text)]
    sentences = [m.end() for m in _SENTENCE_END.finditer(text) if m.end() < len(text)]
    words = [m.end() for m in _WORD_START.finditer(text) if m.end() < len(text)]
    tolerance = slack * len(text) / pieces
    cuts: list[int] = []
    for k in range(1, pieces):
        target = starts[round(k * len(starts) / pieces)]
        lower = cuts[-1] if cuts else 0
        cut = (_nearest(paragraphs, target, tolerance, lower) or _nearest(sentences, target, tolerance, lower)
               or _nearest(words, target, tolerance, lower) or target)
        if cut <= lower:
            return None
        cuts.append(cut)
    return cuts


def _nearest(boundaries: list[int], target: int, tolerance: float, lower: int) -> int | None:
    """The boundary closest to target within tolerance and above lower, if any."""
    i = bisect.bisect_left(boundaries, target)
    near = [b for b in boundaries[max(i - 1, 0):i + 1] if abs(b - target) <= tolerance and b > lower]
    return min(near, key=lambda b: abs(b - target)) if near else None


def head(text: str, starts: list[int], tokens: int) -> str:
    """The first `tokens` tokens of text."""
    return text if tokens >= len(starts) else text[:starts[tokens]]


def tail(text: str, starts: list[int], tokens: int) -> str:
    """The last `tokens` tokens of text."""
    return text if tokens >= len(starts) else text[starts[len(starts) - tokens]:] if tokens > 0 else ""
