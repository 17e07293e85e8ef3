"""gigatoken checked against the reference tokenizer (`tokenizers`), which runs in a process of its
own: any difference makes the run say so and convert with the reference instead."""

from __future__ import annotations

import multiprocessing
import os
import sys

from megadoc_megatron.data.preprocess.parts import GIGATOKEN, REFERENCE, Part, PartResult
from megadoc_megatron.data.preprocess.worker import START_METHOD
from megadoc_megatron.data.tokenizer import GigatokenEncoder, load_tokenizer
from megadoc_megatron.errors import InputError


class GigatokenUnusable(Exception):
    """gigatoken cannot load the tokenizer, or gives other ids than the reference tokenizer."""


def check_sample(result: PartResult, part: Part, reference) -> None:
    """Raise GigatokenUnusable unless the reference tokenizer gives gigatoken's ids for the sample."""
    expected = reference.encode_batch([text for _, text, _ in result.sample or []])
    for (label, text, ids), reference_ids in zip(result.sample or [], expected):
        if list(reference_ids) != ids:
            where = (label if label.startswith("a probe")
                     else f"{part.path}, {label} of the part starting at byte {part.start}")
            raise GigatokenUnusable(f"its ids differ from {reference.type_name}'s for {where}: {text[:60]!r}")


class ReferenceProcess:
    """The reference tokenizer in a process of its own, for gigatoken's checks: it loads on another
    core while this process loads gigatoken (each takes about a second for a 150k vocabulary)."""

    def __init__(self, tokenizer_type: str, tokenizer_model: str):
        context = multiprocessing.get_context(START_METHOD)
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve_reference,
                                        args=(child, self._connection, tokenizer_type, tokenizer_model), daemon=True)
        self._process.start()
        child.close()
        self._described = None

    def _ask(self, *request):
        try:
            self._connection.send(request)
            reply = self._connection.recv()
        except (EOFError, OSError):
            raise InputError("the process of the reference tokenizer died (out of memory?)",
                             fix="run the same command again: finished parts are reused") from None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._ask("encode", texts)

    def describe(self) -> dict:
        if self._described is None:
            self._described = self._ask("describe")
        return self._described

    type_name = property(lambda self: self.describe()["type"])
    vocab_size = property(lambda self: self.describe()["vocab_size"])
    eod = property(lambda self: self.describe()["eod"])

    def close(self) -> None:
        self._connection.close()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()


def _serve_reference(connection, asking_end, tokenizer_type: str, tokenizer_model: str) -> None:
    asking_end.close()  # a forked child holds it too: closed here, the asker's exit ends the loop below
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tokenizer = load_tokenizer(tokenizer_type, tokenizer_model)
    except Exception as error:  # sent back to the asking process, which raises it
        tokenizer = error
    while True:
        try:
            kind, *args = connection.recv()
        except EOFError:
            return
        if isinstance(tokenizer, Exception):
            connection.send(tokenizer)
        else:
            connection.send(tokenizer.describe() if kind == "describe" else tokenizer.encode_batch(*args))


def backend_for(tokenizer_type: str, fast: bool) -> str:
    """gigatoken for HuggingFace tokenizers (checked against `tokenizers` as it runs), else the reference.
    SentencePiece stays on `sentencepiece`: gigatoken reads "<s>" in a text as the control token."""
    if not fast or tokenizer_type != "HuggingFaceTokenizer":
        return REFERENCE
    try:
        GigatokenEncoder.version()
    except ImportError:
        print("gigatoken is not installed: converting with tokenizers (slower); pip install gigatoken", file=sys.stderr)
        return REFERENCE
    return GIGATOKEN
