"""Loss evaluators on held-out indexed datasets: i.i.d. loss, long-context loss by position,
and ensembles of checkpoints. Every evaluator writes one JSON schema (see `result`).

- i.i.d. loss: the held-out documents packed as in training (Megatron's GPTDataset: sample i is
  tokens [i*S, (i+1)*S + 1) of the concatenated stream), token-weighted mean loss.
- long-context loss: one document per sequence from its first token (no packing), cut at S + 1
  tokens; mean loss per position bucket, and over positions at or beyond an offset; reported for
  documents longer than a threshold ("long") and the others ("short").
- ensemble: the loss of the mean of K members' predicted probabilities of each target token,
  for K = 1..N (members in the order given), on the i.i.d. sequences.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megadoc_megatron.data.indexed import IndexedDatasetView
from megadoc_megatron.errors import InputError
from megadoc_megatron.progress import Progress


@dataclass
class LoadedModel:
    model: torch.nn.Module
    checkpoint: Path        # the iter_XXXXXXX folder
    iteration: int
    seq_length: int
    vocab_size: int
    tokenizer: dict         # the training tokenizer's type, model path and fingerprint
    eod: int | None = None  # the end-of-document id when trained with document masking (packed sequences)


def load_model(root, iteration: int | None, device: torch.device) -> LoadedModel:
    """The model of a `megadoc train` checkpoint, on one device (TP = PP = 1), in eval mode.
    Needs the process groups (see `evaluation_process_group`)."""
    from megatron.core import dist_checkpointing

    from megadoc_megatron.model.build import build_model, resolve_backend
    from megadoc_megatron.train import checkpoint
    from megadoc_megatron.train.config import ParallelConfig, config_from_dict

    root = Path(root)
    iteration = iteration if iteration is not None else checkpoint.latest_iteration(root)
    source = checkpoint.iteration_dir(root, iteration or 0)
    if iteration is None or not source.is_dir():
        raise InputError(f"no checkpoint{'' if iteration is None else f' for iteration {iteration}'} here",
                         root, fix="pass the checkpoint.dir of a `megadoc train` run (and an --iteration it saved)")
    common = dist_checkpointing.load_common_state_dict(str(source))
    info = checkpoint.CheckpointInfo.of(common)
    if info is None:
        raise InputError("this checkpoint does not record its sequence length and vocabulary", source,
                         fix="evaluate checkpoints written by this version of `megadoc train`")
    config = config_from_dict(common["config"], source)
    config = dataclasses.replace(config, parallel=ParallelConfig(),
                                 precision=dataclasses.replace(config.precision, fp8=None,
                                                               bf16=config.precision.bf16 and device.type == "cuda"))
    _, (model,), _ = build_model(config, info.vocab_size, info.seq_length, device)
    backend = resolve_backend(config.model.backend)  # a GPU (TE) checkpoint loads into portable layers on CPU
    state = checkpoint.model_state(model, backend=backend, saved_backend=info.backend)
    checkpoint.load_model_state(model, dist_checkpointing.load({"model": state}, str(source))["model"])
    model.eval()
    eod = info.tokenizer.get("eod") if config.data.reset_attention_mask else None
    return LoadedModel(model, source, iteration, info.seq_length, info.vocab_size, info.tokenizer, eod)


def evaluation_process_group():
    """One process with TP = PP = 1 (megatron-core's layers need parallel_state)."""
    from megadoc_megatron.distributed import initialize, launch_environment

    return initialize(launch=launch_environment({}))


def check_dataset(dataset: IndexedDatasetView, loaded: LoadedModel) -> None:
    """The held-out data must be tokenized like the training data (blend.datasets.check_tokenized_alike)."""
    from megadoc_megatron.blend.datasets import check_tokenized_alike

    check_tokenized_alike([dataset.prefix], {**loaded.tokenizer, "vocab_size": loaded.vocab_size},
                          loaded.eod is not None, whose="the checkpoint's tokenizer")


def token_losses(model, tokens: torch.Tensor, grad: bool = False, eod: int | None = None) -> torch.Tensor:
    """Per-token loss [batch, length - 1] of predicting tokens[:, 1:] from tokens[:, :-1]; with `eod`,
    each document attends only to itself (the document masking of training)."""
    from megadoc_megatron.model.gpt import document_packing

    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1], device=tokens.device).unsqueeze(0).expand_as(inputs)
    with torch.set_grad_enabled(grad):
        if eod is None:
            return model(inputs, positions, None, labels=labels).float()
        packed = document_packing(inputs, eod)
        flat = model(inputs.reshape(1, -1), positions.reshape(1, -1), None, labels=labels.reshape(1, -1),
                     packed_seq_params=packed)
        return flat.float().reshape(inputs.shape)


def packed_sequences(dataset: IndexedDatasetView, seq_length: int, max_tokens: int | None) -> np.ndarray:
    """[n, seq_length + 1] samples of the concatenated documents, as GPTDataset packs them."""
    wanted = max(1, max_tokens // seq_length) * seq_length + 1 if max_tokens else None
    pieces, held = [], 0
    for document in range(dataset.num_documents):  # read only as far as max_tokens needs
        pieces.append(dataset.document_tokens(document))
        held += len(pieces[-1])
        if wanted and held >= wanted:
            break
    return pack(np.concatenate(pieces), seq_length, wanted // seq_length if wanted else None, dataset.prefix)


def pack(stream: np.ndarray, seq_length: int, max_sequences: int | None, source,
         fix: str = "evaluate on more held-out documents") -> np.ndarray:
    """[n, seq_length + 1] samples of a token stream, consecutive ones sharing a token (as GPTDataset)."""
    stream = np.asarray(stream, dtype=np.int64)
    count = (len(stream) - 1) // seq_length
    if max_sequences:
        count = min(count, max_sequences)
    if count < 1:
        raise InputError(f"{source} holds {len(stream)} tokens, fewer than one sequence of {seq_length + 1}",
                         source, fix=fix)
    return np.stack([stream[i * seq_length:(i + 1) * seq_length + 1] for i in range(count)])


def sequence_losses(loaded: LoadedModel, sequences: np.ndarray, device, micro_batch: int) -> np.ndarray:
    """Per-token losses [n, seq_length] of equal-length sequences, masked as in training."""
    out = []
    with Progress("eval", sequences[:, 1:].size, "tokens", scale=True) as progress:
        for start in range(0, len(sequences), micro_batch):
            batch = torch.as_tensor(sequences[start:start + micro_batch], device=device)
            out.append(token_losses(loaded.model, batch, eod=loaded.eod).cpu().numpy())
            progress.update(out[-1].size)
    return np.concatenate(out)


def iid_loss(loaded: LoadedModel, dataset, device, micro_batch: int = 4, max_tokens: int | None = None) -> dict:
    sequences = packed_sequences(dataset, loaded.seq_length, max_tokens)
    losses = sequence_losses(loaded, sequences, device, micro_batch)
    return {"loss": float(losses.mean()), "tokens": int(losses.size), "sequences": len(sequences)}


def default_buckets(seq_length: int) -> list[int]:
    """0, 512, 1k, 2k, 4k, ... up to the sequence length (quarters of it when that is short)."""
    edges = [0] + [512 * 2 ** i for i in range(16) if 512 * 2 ** i < seq_length] + [seq_length]
    return edges if len(edges) > 2 else [0] + [seq_length * k // 4 for k in (1, 2, 3)] + [seq_length]


def position_losses(model, documents: list[np.ndarray], seq_length: int, device, micro_batch: int):
    """(sum, count) of the loss at each position [seq_length], one document per sequence from its start.
    Sequences are right-padded: causal attention keeps padding from touching earlier positions."""
    sums, counts = np.zeros(seq_length), np.zeros(seq_length, dtype=np.int64)
    documents = sorted((d[:seq_length + 1].astype(np.int64) for d in documents if len(d) >= 2), key=len)
    with Progress("eval", len(documents), "documents") as progress:
        for start in range(0, len(documents), micro_batch):
            group = documents[start:start + micro_batch]
            width = len(group[-1])
            batch = np.zeros((len(group), width), dtype=np.int64)
            for row, document in enumerate(group):
                batch[row, :len(document)] = document
            losses = token_losses(model, torch.as_tensor(batch, device=device)).cpu().numpy()
            for row, document in enumerate(group):
                sums[:len(document) - 1] += losses[row, :len(document) - 1]
                counts[:len(document) - 1] += 1
            progress.update(len(group))
    return sums, counts


def summarize_positions(sums: np.ndarray, counts: np.ndarray, buckets: list[int], offset: int, documents: int) -> dict:
    def mean(a: int, b: int):
        tokens = int(counts[a:b].sum())
        return tokens, (float(sums[a:b].sum() / tokens) if tokens else None)

    tokens, loss = mean(0, len(sums))
    beyond_tokens, beyond = mean(offset, len(sums))
    return {"documents": documents, "tokens": tokens, "loss": loss,
            "buckets": [dict(zip(("start", "end", "tokens", "loss"), (a, b, *mean(a, b))))
                        for a, b in zip(buckets[:-1], buckets[1:])],
            "beyond_offset": {"offset": offset, "tokens": beyond_tokens, "loss": beyond}}


def long_context_loss(loaded: LoadedModel, dataset, device, threshold: int, buckets: list[int] | None = None,
                      offset: int | None = None, max_documents: int = 500, micro_batch: int = 4) -> dict:
    lengths = dataset.document_lengths()
    seq = loaded.seq_length
    buckets = sorted({min(b, seq) for b in (buckets or default_buckets(seq))} | {0, seq})
    offset = offset if offset is not None else min(threshold, seq // 2)
    results = {}
    for name, chosen in (("long", np.flatnonzero(lengths > threshold)),
                         ("short", np.flatnonzero((lengths <= threshold) & (lengths >= 2)))):
        chosen = chosen[:max_documents]
        sums, counts = position_losses(loaded.model, [dataset.document_tokens(d) for d in chosen], seq, device,
                                       micro_batch)
        results[name] = summarize_positions(sums, counts, buckets, offset, len(chosen))
    if results["long"]["documents"] == 0:
        raise InputError(f"no held-out document is longer than {threshold} tokens (longest: {int(lengths.max())})",
                         dataset.prefix, fix="lower --threshold or add long held-out documents")
    return {"threshold": threshold, **results}


def ensemble_losses(member_losses: list[np.ndarray]) -> list[dict]:
    """Loss of the first K members' averaged probabilities, K = 1..N, from per-token losses."""
    stacked = -np.stack([m.reshape(-1) for m in member_losses]).astype(np.float64)  # log-probabilities
    out = []
    for k in range(1, len(member_losses) + 1):
        log_mean = np.logaddexp.reduce(stacked[:k], axis=0) - math.log(k)
        out.append({"members": k, "loss": float(-log_mean.mean())})
    return out

