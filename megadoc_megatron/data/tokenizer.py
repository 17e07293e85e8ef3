"""The project's one tokenizer abstraction (converter, trainer and evaluators all use it).

Token ids match Megatron-LM's default (non-legacy) tokenizers for the two types we
support: a HuggingFace folder encodes without special tokens, a SentencePiece model
encodes plain text; the EOD id is the tokenizer's end-of-sequence token. Only local
files are read: nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np

from megadoc_megatron.errors import InputError

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer")
BPE_CACHE_WORDS = 500_000
# Texts where two implementations of one tokenizer part ways if they ever do: normalization,
# pretokenizer edge cases (spaces, digits, contractions, newlines), bytes without a token of
# their own, scripts, and (added per tokenizer) the text of every added token.
PROBE_TEXTS = (
    "", " ", "  \n\n\t  x", "\r\n\r\n", "Hello, world!", "trailing   ", "   leading", "a\u00a0b\u200bc\u3000d",
    "12345 3.14159 1,000,000 007 ١٢٣", "I'm you're THEY'LL we'VE it's",
    "e\u0301 \u00e9 \ufb01 \u2460 \uff46\uff55\uff4c\uff4c",
    "\x00\x01\x04\x1b\x7f\x85", "中文文本测试，标点。", "日本語のテキストです", "한국어 텍스트", "مرحبا بالعالم",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467 \U0001f600\U0001f3fd", "def f(x):\n    return x ** 2  # note\n",
    "https://example.org/a?b=c&d=%20", "!!!!????....----____", "a" * 3000, " " * 300 + "\n" * 30,
)


def optimal_dtype(vocab_size: int) -> type[np.number]:
    """Megatron-LM's rule (`DType.optimal_dtype`): uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


class Tokenizer:
    """Base class: vocab size, EOD id, token dtype, batch encoding and decoding."""

    type_name: str
    vocab_size: int
    eod: int

    def __init__(self, model_path: Path):
        self.model_path = model_path

    @property
    def dtype(self) -> type[np.number]:
        return optimal_dtype(self.vocab_size)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All token ids one after another, and the token count of each text."""
        return _flat_lists(self.encode_batch(texts))

    def decode(self, ids) -> str:
        raise NotImplementedError

    @staticmethod
    def files_at(model_path: Path) -> list[Path]:
        """The files that define the tokenizer at `model_path` (found without loading it)."""
        raise NotImplementedError

    def model_files(self) -> list[Path]:
        return self.files_at(self.model_path)

    def fingerprint(self) -> str:
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = files_fingerprint(self.type_name, self.model_files())
        return self._fingerprint

    @property
    def unique_identifiers(self) -> dict:
        """What megatron-core's datasets put into their index-cache keys."""
        return {"class": self.type_name, "fingerprint": self.fingerprint()}

    def describe(self) -> dict:
        return {
            "type": self.type_name,
            "model": str(self.model_path),
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "fingerprint": self.fingerprint(),
        }


class HuggingFaceTokenizer(Tokenizer):
    """A local HF tokenizer folder holding `tokenizer.json` (fast tokenizer)."""

    type_name = "HuggingFaceTokenizer"
    _NO_FAST_FIX = (
        "save a fast tokenizer into the folder: "
        "transformers.AutoTokenizer.from_pretrained(PATH).save_pretrained(PATH)"
    )

    def __init__(self, model_path: Path):
        super().__init__(model_path)
        import tokenizers

        self._json_path = _tokenizer_json(model_path)
        self._tokenizer = tokenizers.Tokenizer.from_file(str(self._json_path))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eod = self._eos_id()
        # Memoizes more words than BPE's default 10k: ~20% faster on real corpora, same ids.
        if hasattr(self._tokenizer.model, "_resize_cache"):
            self._tokenizer.model._resize_cache(BPE_CACHE_WORDS)
        # encode_batch_fast skips character offsets, which we never use.
        self._encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)

    def _eos_id(self) -> int:
        eos = eos_text(self._json_path)
        token_id = self._tokenizer.token_to_id(eos) if eos else None
        if token_id is None:
            raise InputError(f"cannot find the end-of-sequence token (eos_token={eos!r}) used as EOD",
                             self._json_path.parent / "tokenizer_config.json",
                             fix='set "eos_token" in tokenizer_config.json to a token of the vocabulary')
        return token_id

    def encode_batch(self, texts):
        return [encoding.ids for encoding in self._encode(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @staticmethod
    def files_at(model_path: Path) -> list[Path]:
        json_path = model_path / "tokenizer.json" if model_path.is_dir() else model_path
        return [p for p in (json_path, json_path.parent / "tokenizer_config.json") if p.is_file()]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file; EOD is its `eos_id`."""

    type_name = "SentencePieceTokenizer"

    def __init__(self, model_path: Path):
        super().__init__(model_path)
        import sentencepiece

        if not model_path.is_file():
            raise InputError("SentencePiece model file not found", model_path, fix="pass the path of a .model file")
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        if self.eod < 0:
            raise InputError("the SentencePiece model has no EOS piece to use as EOD", model_path,
                             fix="train it with an eos_id (the default, 2)")

    def encode_batch(self, texts):
        return self._sp.encode(texts, out_type=int, num_threads=1)

    def decode(self, ids):
        return self._sp.decode([int(i) for i in ids])

    @staticmethod
    def files_at(model_path: Path) -> list[Path]:
        return [model_path]


def files_fingerprint(type_name: str, files: list[Path]) -> str:
    """Content hash of the files that define a tokenizer (not their paths)."""
    digest = hashlib.sha256(type_name.encode())
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _tokenizer_json(model_path: Path) -> Path:
    json_path = model_path / "tokenizer.json" if model_path.is_dir() else model_path
    if not json_path.is_file():
        raise InputError("no tokenizer.json in the HuggingFace tokenizer folder", model_path,
                         fix=HuggingFaceTokenizer._NO_FAST_FIX)
    return json_path


def eos_text(json_path: Path) -> str | None:
    """The end-of-sequence token that tokenizer_config.json names (Megatron's EOD)."""
    config_path = json_path.parent / "tokenizer_config.json"
    eos = json.loads(config_path.read_text()).get("eos_token") if config_path.is_file() else None
    return eos.get("content") if isinstance(eos, dict) else eos


def probe_texts(json_path: Path) -> list[str]:
    """PROBE_TEXTS, and every added token of tokenizer.json alone, between words and against letters."""
    added = [token["content"] for token in added_tokens(json_path)]
    return [*PROBE_TEXTS, *(form for token in added for form in (token, f"x {token} y", f"ab{token}cd\n"))]


def added_tokens(json_path: Path) -> list[dict]:
    """tokenizer.json's "added_tokens" list, parsed alone: the whole file (vocabulary and merges)
    takes Python's json half a second for a 150k vocabulary, and decoding it a tenth."""
    data = json_path.read_bytes()
    key = data.find(b'"added_tokens"')  # a key: inside a JSON string its quotes would be escaped
    if key < 0:
        return []
    start, size = data.index(b"[", key), 1 << 16
    while True:  # a window that grows until it holds the whole list
        window = data[start:start + size].decode("utf-8", errors="ignore")  # drops a character cut at its end
        try:
            return json.JSONDecoder().raw_decode(window)[0]
        except json.JSONDecodeError:
            if start + size >= len(data):
                raise
            size *= 8


def _flat_lists(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return tokens, lengths


class GigatokenEncoder:
    """The `gigatoken` package's Rust BPE for a HuggingFace tokenizer folder: tens of times
    faster than `tokenizers` and returns flat arrays. It does not load every tokenizer (it
    raises then), and where it loads, the converter checks its ids against `tokenizers`."""

    def __init__(self, model_path: Path):
        import gigatoken

        self.json_path = _tokenizer_json(model_path)
        self._tokenizer = gigatoken.Tokenizer(str(self.json_path))  # the file: no config-driven lookup
        self.vocab_size = self._tokenizer.vocab_size
        eos = eos_text(self.json_path)
        eos_ids = self.encode_batch([eos])[0] if eos else []
        self.eod = eos_ids[0] if len(eos_ids) == 1 else -1  # -1: the converter's check finds the mismatch

    @staticmethod
    def version() -> str:
        from importlib.metadata import version

        return version("gigatoken")

    # parallel=False: one thread per worker process, as for the other tokenizers
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tokenizer.encode_batch_list(texts, parallel=False)

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return _flat_awkward(self._tokenizer.encode_batch(texts, parallel=False))

    def encode_jsonl(self, path: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """The `key` text of every line gigatoken's JSON reader accepts (it skips the others, and is
        laxer than Python's json: the caller checks the count and the lines' shape)."""
        import gigatoken

        return _flat_awkward(self._tokenizer.encode_files(gigatoken.JsonlFileSource([path], key), parallel=False))


def _flat_awkward(encoded) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (uint32) and per-document counts of gigatoken's awkward array, without copies."""
    offsets = np.asarray(encoded.layout.offsets)
    return np.asarray(encoded.layout.content.data)[offsets[0]:offsets[-1]], np.diff(offsets)


def load_tokenizer(tokenizer_type: str, tokenizer_model) -> Tokenizer:
    """Load a tokenizer by Megatron's `--tokenizer-type` name from a local path."""
    return _CLASSES[tokenizer_type](tokenizer_path(tokenizer_type, tokenizer_model))


def tokenizer_fingerprint(tokenizer_type: str, model_path: Path) -> str:
    """`Tokenizer.fingerprint()` without loading the tokenizer."""
    return files_fingerprint(tokenizer_type, _CLASSES[tokenizer_type].files_at(model_path))


def tokenizer_path(tokenizer_type: str, tokenizer_model) -> Path:
    """The tokenizer's local path, resolved, once the type and path are checked (nothing is loaded)."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise InputError(f"unsupported --tokenizer-type {tokenizer_type!r}",
                         fix=f"use one of {', '.join(TOKENIZER_TYPES)}")
    if tokenizer_model is None:
        raise InputError("--tokenizer-model is required", fix="pass a local tokenizer folder or .model file")
    path = Path(tokenizer_model).expanduser()
    if not path.exists():
        raise InputError("tokenizer not found (only local files are read, nothing is downloaded)", path,
                         fix="pass the path of a local tokenizer folder or SentencePiece .model file")
    return path.resolve()


_CLASSES = {cls.type_name: cls for cls in (HuggingFaceTokenizer, SentencePieceTokenizer)}
