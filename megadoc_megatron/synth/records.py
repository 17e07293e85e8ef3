"""The generation record `megadoc synth` writes and `megadoc megadocs` reads.

    real document:  {"id": str, "text": str, ...}
    generation:     see generation_record below; "split_char" (rationale only) is where in the
                    source text the thought goes
"""

from __future__ import annotations

GENERATION_KEYS = {"id": str, "source_id": str, "operation": str, "index": int, "text": str}


def generation_record(*, source_id: str, operation: str, index: int, style: str, prompt_version: str,
                      generator: dict, seed: int, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                      text: str, source_input: dict, split_char: int | None = None) -> dict:
    """One generated text and its provenance: which document, operation, prompt (style and a hash of
    its text), generator (model, backend, sampling), generation index and seed produced it, how the
    source was fitted into the generator's window (`source_input`), and how generation ended."""
    record = {"id": f"{source_id}#{operation}{index}", "source_id": source_id, "operation": operation,
              "index": index, "style": style, "prompt_version": prompt_version, "generator": generator,
              "seed": seed, "finish_reason": finish_reason, "prompt_tokens": prompt_tokens,
              "completion_tokens": completion_tokens, "source_input": source_input, "text": text}
    if split_char is not None:
        record["split_char"] = split_char
    return record
