"""Training data every machine has, for the benchmarks and the GPU check: the standard library's
docstrings and a SentencePiece tokenizer trained on them (examples/tiny_cpu/make_corpus.py), kept
in a work folder between runs, converted and blended with megadoc's own commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples" / "tiny_cpu"))

from corpus import stdlib_documents  # noqa: E402  (the demo's corpus module, shared with the benchmarks)

__all__ = ["stdlib_blend", "stdlib_documents"]


def stdlib_blend(work: Path, seq_length: int, global_batch: int, iterations: int) -> str:
    """blend.json of a real-only blend of `iterations` global batches (the training docstrings,
    repeated as often as that takes), validated on the held-out docstrings."""
    from megadoc_megatron.blend.weights import BlendConfig, make_blend
    from megadoc_megatron.data.preprocess import PreprocessConfig, preprocess

    work = Path(work)
    subprocess.run([sys.executable, str(REPO / "examples/tiny_cpu/make_corpus.py"), "--output-dir", str(work)],
                   check=True,  # returns at once when the corpus there was made with the same settings
                   env={**os.environ,
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    prefixes = {}
    for split in ("train", "heldout"):
        prefix = work / "data" / split
        index = Path(f"{prefix}_text_document.idx")
        if not index.is_file() or index.stat().st_mtime < (work / f"{split}.jsonl").stat().st_mtime:
            preprocess(PreprocessConfig([str(work / f"{split}.jsonl")], str(prefix), "SentencePieceTokenizer",
                       str(work / "tokenizer.model"), append_eod=True, workers=2))
        prefixes[split] = f"{prefix}_text_document"
    blend = make_blend(BlendConfig([prefixes["train"]], [], 0.0, None, seq_length, global_batch,
                                   work / f"blend-{seq_length}-{global_batch}-{iterations}",
                                   valid_data=[prefixes["heldout"]],
                                   train_tokens=iterations * seq_length * global_batch))
    return blend.files.plan

