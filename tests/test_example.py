"""The README's main command runs: the tiny CPU example end to end (after the install step)."""

import json
import os
import subprocess

import numpy as np
from megadoc_megatron.data.indexed import read_index
from megadoc_megatron.data.tokenizer import load_tokenizer

from conftest import REPO


def test_tiny_cpu_example(tmp_path):
    done = subprocess.run(["bash", str(REPO / "examples/tiny_cpu/run.sh")], env={**os.environ, "WORK": str(tmp_path)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    train, heldout = read_index(tmp_path / "data/train_text_document"), read_index(tmp_path / "data/heldout_text_document")
    assert train.num_documents > 300 and 10 < heldout.num_documents < train.num_documents
    assert "document length (tokens):" in done.stdout
    # The trained tokenizer keeps the documents' layout: decoding gives back the text.
    tokenizer = load_tokenizer("SentencePieceTokenizer", tmp_path / "tokenizer.model")
    first = (tmp_path / "train.jsonl").read_text().splitlines()[0]
    text = json.loads(first)["text"]
    tokens = train.document_tokens(0)
    assert tokens[-1] == tokenizer.eod
    assert tokenizer.decode(tokens[:-1]) == text
    assert np.asarray(tokens).max() < tokenizer.vocab_size
