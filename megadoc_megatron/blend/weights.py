"""Megatron blend weights and a train length that realize a mixing weight w for
the synthetic stream and exactly E passes over the real training data (or, with --train-tokens,
a token budget split w : 1 - w, for mixture studies; w = 1 trains on synthetic data only).

How megatron-core spends a blend (core 0.16, `BlendedMegatronDatasetBuilder`, `GPTDataset`):
- N train samples; dataset i is asked for ceil(N * w_i) samples (weights normalized) and built
  with ceil(ceil(N * w_i) * (1 + surplus)) samples, surplus = `mid_level_dataset_surplus`.
- A sample is `sequence_length + 1` tokens, consecutive samples overlapping by one token, so
  E passes over T tokens hold S(E) = (E * T - 1) // sequence_length samples.
- A GPTDataset needing more than E epochs shuffles the samples of its first E epochs together
  and the samples of a final epoch used for less than 80% separately, after them.

So asking the real dataset for exactly S(E) samples makes its build (S(E) plus the surplus)
spill just into epoch E + 1, which megatron-core shuffles separately: the S(E) samples drawn
are precisely the samples of E full passes, in shuffled order. The weights below are chosen
so that ceil(N * w_real) = S(E) whatever rounding the normalization does.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megadoc_megatron.data.dataset_info import DatasetInfo
from megadoc_megatron.data.indexed import dataset_paths, read_index
from megadoc_megatron.data.overlap import NGRAM, THRESHOLD, NgramIndex, check_settings
from megadoc_megatron.errors import InputError
from megadoc_megatron.files import update_digest, write_text_atomic

MEGATRON_SURPLUS = 0.005  # megatron-core's default mid_level_dataset_surplus
FINAL_EPOCH_THRESHOLD = 0.8  # GPTDataset shuffles a final epoch used for less than this apart


@dataclass
class BlendDataset:
    prefix: str
    stream: str  # "real" or "synthetic"
    train_tokens: int
    train_documents: int
    tokenizer: str | None  # content fingerprint from the preprocess metadata, when known
    dtype: str
    content: str  # fingerprint of the files, for the index cache folder
    original_fraction: float = 0.0  # share of its text that is real documents (megadocs)
    weight: float = 0.0
    samples: int = 0
    epochs: float = 0.0


@dataclass
class BlendFiles:
    data_args: str                          # data_args.txt: Megatron-LM's --data-args-path
    plan: str                               # this blend.json
    per_split_data_args: str | None = None  # with held-out data: Megatron-LM's --per-split-data-args-path


@dataclass
class Blend:
    """blend.json, written by `megadoc blend` and read by training, evaluation, the report and `megadoc run`."""
    train_samples: int
    train_iters: int
    global_batch_size: int
    seq_length: int
    epochs: int | None  # exact passes over the real data, or None for a token budget
    train_tokens: int | None  # the token budget, or None for exact epochs
    synthetic_weight_requested: float
    synthetic_weight_realized: float
    real_tokens_per_epoch: int
    real_epochs_inside_synthetic: float
    datasets: list[BlendDataset]  # those drawn from (weight above 0)
    split: str = "100,0,0"
    seed: int = 1234
    data_cache_path: str = ""
    files: BlendFiles | None = None
    megatron_flags: str = ""

    def to_dict(self) -> dict:
        values = asdict(self)
        if values["files"] and values["files"]["per_split_data_args"] is None:
            del values["files"]["per_split_data_args"]
        return values

    def save(self, path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "Blend":
        path = Path(path)
        if not path.is_file():
            raise InputError("blend file not found", path,
                             fix="run `megadoc blend ... --output-dir DIR` and use DIR/blend.json")
        try:
            values = json.loads(path.read_text())
            values["datasets"] = [BlendDataset(**d) for d in values["datasets"]]
            values["files"] = BlendFiles(**values["files"]) if values.get("files") else None
            return cls(**values)
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise InputError(f"not a blend.json of `megadoc blend` ({error})", path,
                             fix="rerun `megadoc blend` to write it again") from None

    def fingerprint(self) -> str:
        """What training draws: every dataset's content and weight, the samples, their length and order."""
        key = [[d.prefix, d.content, d.weight] for d in self.datasets] + \
            [self.train_samples, self.seq_length, self.global_batch_size, self.split, self.seed]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

    @property
    def real_tokens(self) -> int:
        return sum(d.train_tokens for d in self.datasets if d.stream == "real")

    def train_blend(self) -> tuple[list[str], list[float]]:
        """Megatron's (prefixes, weights) of the training data."""
        return [d.prefix for d in self.datasets], [d.weight for d in self.datasets]

    def validation_prefixes(self) -> list[str]:
        per_split = self.files.per_split_data_args if self.files else None
        if not per_split:
            return []
        return json.loads(Path(per_split).read_text())["valid"][1::2]


@dataclass
class BlendConfig:
    """The settings of `megadoc blend`."""
    real: list[str]                  # real dataset prefixes
    synthetic: list[str] | None      # synthetic dataset prefixes (none: a real-only run)
    synthetic_weight: float          # mixing weight w of the synthetic stream
    epochs: int | None               # exact passes over the real training data, or
    seq_length: int
    global_batch_size: int
    output_dir: str
    split: str = "100,0,0"           # Megatron's train,valid,test split of every dataset
    seed: int = 1234                 # Megatron's --seed (it shuffles the datasets)
    valid_data: list[str] | None = None  # held-out dataset prefixes
    train_tokens: int | None = None  # instead of epochs: a budget of training tokens
    overlap_ngram: int = NGRAM       # the held-out check (check_held_out): n-gram length, in tokens
    overlap_threshold: float = THRESHOLD  # and the overlap at which it refuses
    held_out_checked: bool = False   # the caller compared the corpora already (megadoc run, on their words)


def split_fractions(split: str) -> list[float]:
    """Megatron's `--split` string as normalized train/valid/test fractions (same parsing rule)."""
    try:
        values = [float(v) for v in split.replace("/", ",").split(",")]
    except ValueError:
        values = []
    values += [0.0] * (3 - len(values))
    if len(values) != 3 or min(values) < 0 or sum(values) <= 0 or values[0] <= 0:
        raise InputError(f"bad --split {split!r}",
                         fix='give three non-negative numbers with a positive train part, e.g. "969,30,1"')
    return [v / sum(values) for v in values]


def train_sequence_range(num_sequences: int, split: str) -> tuple[int, int]:
    """The sequences GPTDataset takes for training: [0, round(train_fraction * n))."""
    return 0, int(round(split_fractions(split)[0] * float(num_sequences)))


def content_fingerprint(prefix) -> str:
    """Hash of the whole `.idx`, the `.bin` size and its first and last MiB."""
    bin_path, idx_path = dataset_paths(prefix)
    digest = hashlib.sha256()
    update_digest(digest, idx_path)
    update_digest(digest, bin_path, whole_up_to=0)
    return digest.hexdigest()[:16]


def original_fraction(info: DatasetInfo | None) -> float:
    """Share of characters that are real documents, from the megadocs summaries of the inputs."""
    from megadoc_megatron.megadocs.assemble import MegadocsSummary

    chars = originals = 0
    for source in info.inputs if info else []:
        if not MegadocsSummary.path_of(source).is_file():
            return 0.0
        summary = MegadocsSummary.load(source)
        chars += summary.chars
        originals += summary.original_chars
    return originals / chars if chars else 0.0


def describe_dataset(prefix: str, stream: str, split: str) -> BlendDataset:
    view = read_index(prefix)
    begin, end = train_sequence_range(len(view.sequence_lengths), split)
    info = DatasetInfo.load(prefix)
    return BlendDataset(
        prefix=str(Path(prefix).resolve()), stream=stream,
        train_tokens=int(view.sequence_lengths[begin:end].sum(dtype=np.int64)), train_documents=end - begin,
        tokenizer=info.tokenizer.get("fingerprint") if info else None, dtype=np.dtype(view.dtype).name,
        content=content_fingerprint(prefix),
        original_fraction=original_fraction(info) if stream == "synthetic" else 0.0)


def samples_for_epochs(tokens: int, epochs: int, sequence_length: int) -> int:
    """Samples in `epochs` passes over `tokens` (sequence_length + 1 tokens each, overlapping by one)."""
    return (epochs * tokens - 1) // sequence_length


def iterations_for_real_samples(real_samples: int, synthetic_weight: float, global_batch_size: int) -> int:
    """Whole batches in which the real samples make a share 1 - w of the draws."""
    return math.ceil(real_samples / ((1 - synthetic_weight) * global_batch_size))


def final_epoch_is_separate(train_tokens: int, full_passes: int, requested: int, sequence_length: int) -> bool:
    """Whether GPTDataset, asked for `requested` samples (built with the surplus), shuffles the samples
    after the `full_passes` samples of the whole epochs apart from them."""
    built = math.ceil(requested * (1 + MEGATRON_SURPLUS))
    samples_per_epoch = (train_tokens - 1) // sequence_length
    return built - full_passes < int(FINAL_EPOCH_THRESHOLD * samples_per_epoch)


def _check(datasets: list[BlendDataset], synthetic_weight: float, epochs: int | None, sequence_length: int,
           global_batch_size: int, train_tokens: int | None = None) -> None:
    if (epochs is None) == (train_tokens is None):
        raise InputError("give either --epochs (exact passes over the real data) or --train-tokens (a budget)",
                         fix="e.g. -E 4, or --train-tokens 100000000")
    if train_tokens is not None and not 0 <= synthetic_weight <= 1:
        raise InputError(f"--synthetic-weight must lie in [0, 1], not {synthetic_weight}",
                         fix="the share of the budget spent on synthetic data, e.g. 0.3")
    if epochs is not None and not 0 <= synthetic_weight < 1:
        raise InputError(f"--synthetic-weight must lie in [0, 1) with --epochs, not {synthetic_weight}",
                         fix="use e.g. 0.75 (the paper searched 0.5, 0.75, 0.9), 0 for real data only, or "
                             "--train-tokens for synthetic data only (w = 1)")
    if (synthetic_weight > 0) != any(d.stream == "synthetic" for d in datasets):
        raise InputError("a synthetic weight above 0 needs synthetic datasets, "
                         "and synthetic datasets need a weight above 0",
                         fix="pass --synthetic-data-path PREFIX with -w > 0, or neither for a real-only run (-w 0)")
    if epochs is not None and epochs < 1:
        raise InputError(f"--epochs must be at least 1, not {epochs}", fix="count whole passes over the real data")
    if train_tokens is not None and train_tokens < sequence_length * global_batch_size:
        raise InputError(f"--train-tokens {train_tokens} is less than one batch "
                         f"({sequence_length * global_batch_size})",
                         fix="give a larger budget")
    if sequence_length < 1 or global_batch_size < 1:
        raise InputError("--seq-length and --global-batch-size must be positive")
    for dataset in datasets:
        if dataset.train_tokens < sequence_length + 1:
            raise InputError(f"the training split holds {dataset.train_tokens} tokens, fewer than one sample "
                             f"({sequence_length + 1} tokens)", dataset.prefix,
                             fix="add data, lower --seq-length, or give more of it to training with --split")
    fingerprints = {d.tokenizer for d in datasets if d.tokenizer}
    dtypes = {d.dtype for d in datasets}
    if len(fingerprints) > 1 or len(dtypes) > 1:
        rows = ", ".join(f"{Path(d.prefix).name}: {d.tokenizer or 'unknown'} ({d.dtype})" for d in datasets)
        raise InputError(f"the datasets were made with different tokenizers ({rows})",
                         fix="convert every stream with the same --tokenizer-type/--tokenizer-model")


def weigh(real: list[BlendDataset], synthetic: list[BlendDataset], synthetic_weight: float, epochs: int | None,
          sequence_length: int, global_batch_size: int, train_tokens: int | None = None) -> Blend:
    """Weights, train samples and iterations; fills in each dataset's weight, samples and epochs.

    With epochs: exactly E passes over the real data. Without synthetic data (w = 0) the real
    datasets fill every batch, so the last batch may reach up to one batch into pass E + 1
    (shuffled apart, after the E passes); its epochs say so. With train_tokens: a budget of
    whole batches, w of it synthetic, the real data repeated (or not used up) as that falls out;
    datasets of weight 0 (the real ones at w = 1) are left out."""
    _check(real + synthetic, synthetic_weight, epochs, sequence_length, global_batch_size, train_tokens)
    if train_tokens is None:
        train_samples = _weigh_for_epochs(real, synthetic_weight, epochs, sequence_length, global_batch_size)
    else:
        train_samples = math.ceil(train_tokens / (sequence_length * global_batch_size)) * global_batch_size
        _share(real, 1 - synthetic_weight, train_samples)
    _share(synthetic, 1 - sum(d.weight for d in real), train_samples)
    for dataset in real + synthetic:
        dataset.epochs = dataset.samples * sequence_length / dataset.train_tokens
    real_tokens = sum(d.train_tokens for d in real)
    extra_real_tokens = sum(d.samples * sequence_length * d.original_fraction for d in synthetic)
    return Blend(
        train_samples=train_samples, train_iters=train_samples // global_batch_size,
        global_batch_size=global_batch_size, seq_length=sequence_length, epochs=epochs, train_tokens=train_tokens,
        synthetic_weight_requested=synthetic_weight,
        synthetic_weight_realized=sum(d.samples for d in synthetic) / train_samples,
        real_tokens_per_epoch=real_tokens, real_epochs_inside_synthetic=extra_real_tokens / real_tokens,
        datasets=[d for d in real + synthetic if d.weight > 0])


def _share(datasets: list[BlendDataset], share: float, train_samples: int) -> None:
    """Split a share of the samples over datasets in proportion to their tokens."""
    tokens = sum(d.train_tokens for d in datasets)
    for dataset in datasets:
        dataset.weight = share * dataset.train_tokens / tokens
        dataset.samples = math.ceil(train_samples * dataset.weight)


def _weigh_for_epochs(real: list[BlendDataset], synthetic_weight: float, epochs: int, sequence_length: int,
                      global_batch_size: int) -> int:
    """Weights of the real datasets such that megatron-core draws exactly E passes; the train samples."""
    real_samples = [samples_for_epochs(d.train_tokens, epochs, sequence_length) for d in real]
    train_samples = iterations_for_real_samples(sum(real_samples), synthetic_weight,
                                                global_batch_size) * global_batch_size
    for dataset, samples in zip(real, real_samples):
        # Half a sample below the target: ceil() gives the target despite float rounding.
        dataset.weight = (samples - 0.5) / train_samples
        dataset.samples = samples
    if synthetic_weight == 0:  # the weights are normalized: each real dataset is drawn from in proportion
        for dataset in real:
            dataset.weight = dataset.samples / sum(real_samples)
            dataset.samples = math.ceil(train_samples * dataset.weight)
    for dataset, samples in zip(real, real_samples):
        if not final_epoch_is_separate(dataset.train_tokens, samples, dataset.samples, sequence_length):
            raise InputError(f"the real training split holds only {(dataset.train_tokens - 1) // sequence_length} "
                             f"samples per epoch: too few for megatron-core to keep {epochs} passes exact",
                             dataset.prefix, fix="add real data or lower --seq-length")
    return train_samples


def cache_folder(output_dir: Path, blend: Blend, split: str, seed: int) -> Path:
    """Megatron keys its index cache by path and settings, not by content: key ours by content too."""
    key = json.dumps([[d.prefix, d.content] for d in blend.datasets] + [split, seed])
    return output_dir / "index-cache" / hashlib.sha256(key.encode()).hexdigest()[:16]


def data_args(blend: Blend) -> list[str]:
    return [item for d in blend.datasets for item in (repr(d.weight), d.prefix)]


def megatron_flags(blend: Blend) -> str:
    flags = [f"--data-args-path {blend.files.data_args}", f"--split {blend.split}",
             f"--seq-length {blend.seq_length}", f"--global-batch-size {blend.global_batch_size}",
             f"--train-iters {blend.train_iters}", f"--seed {blend.seed}",
             f"--data-cache-path {blend.data_cache_path}"]
    return " ".join(flags)


def format_blend(blend: Blend) -> str:
    lines = [f"{blend.train_iters:,} iterations x {blend.global_batch_size} sequences = "
             f"{blend.train_samples:,} samples of {blend.seq_length + 1} tokens",
             f"synthetic weight: {blend.synthetic_weight_realized:.4f} realized "
             f"({blend.synthetic_weight_requested} requested; the train length is a whole number of batches)",
             f"{'stream':<10} {'weight':>8} {'samples':>12} {'train tokens':>14} {'epochs':>8}  dataset"]
    for d in blend.datasets:
        lines.append(f"{d.stream:<10} {d.weight:>8.4f} {d.samples:>12,} {d.train_tokens:>14,} "
                     f"{d.epochs:>8.3f}  {d.prefix}")
    if blend.epochs is None:
        real = sum(d.samples for d in blend.datasets if d.stream == "real") * blend.seq_length
        lines.append(f"token budget {blend.train_tokens:,} ({blend.train_samples * blend.seq_length:,} in whole "
                     f"batches): {real / blend.real_tokens_per_epoch:.3f} passes over the real data, not exact")
        return "\n".join(lines)
    extra = blend.train_samples - sum(samples_for_epochs(d.train_tokens, blend.epochs, blend.seq_length)
                                      for d in blend.datasets)
    if blend.synthetic_weight_requested == 0 and extra:
        lines.append(f"real data only: {blend.epochs} passes, then {extra} samples of pass {blend.epochs + 1} "
                     "(shuffled apart, after them) to fill the last batch")
        return "\n".join(lines)
    lines.append(f"real data: exactly {blend.epochs} passes in the real stream"
                 + (f", plus {blend.real_epochs_inside_synthetic:.3f} epochs' worth of tokens as originals "
                    "inside the synthetic stream (estimated from characters)"
                    if blend.real_epochs_inside_synthetic else ""))
    return "\n".join(lines)


def check_held_out(real: list[str], held_out: list[str], ngram: int = NGRAM, threshold: float = THRESHOLD) -> None:
    """Held-out data that (nearly) repeats a real training document would measure memorization: refused
    when a training document and a held-out one overlap by `threshold` of their token n-grams (data/overlap.py;
    1.0: one holds the other whole). The real datasets only: synthetic ones are made from them (many times
    their size), and what generations quote is `megadoc decontaminate`'s question."""
    check_settings(ngram, threshold)
    index = NgramIndex((tokens for prefix in held_out for tokens in read_index(prefix).documents()), ngram)
    owners = [(prefix, number) for prefix in held_out for number in range(read_index(prefix).num_documents)]
    for prefix in real:
        found = [o for o in index.overlaps(read_index(prefix).documents()) if o.fraction >= threshold]
        if found:
            worst = max(found, key=lambda o: o.fraction)
            held_prefix, held_number = owners[worst.reference]
            raise InputError(f"{len(found)} training document(s) of {prefix} overlap held-out documents (training "
                             f"document {worst.query} and held-out document {held_number}: {worst.fraction:.0%} of "
                             f"{ngram}-grams shared, limit {threshold:.0%})", held_prefix,
                             fix="hold out documents the training data does not contain (deduplicate the corpora, "
                                 "then convert them again), or raise --overlap-threshold")


def make_blend(config: BlendConfig) -> Blend:
    """Weigh the datasets and write `data_args.txt`, `blend.json` (and `per_split_data_args.json`)."""
    synthetic = config.synthetic or []
    if not config.real:
        raise InputError("give at least one real dataset", fix="pass --real-data-path PREFIX")
    datasets = [describe_dataset(p, "real", config.split) for p in config.real] + \
        [describe_dataset(p, "synthetic", config.split) for p in synthetic]
    blend = weigh(datasets[:len(config.real)], datasets[len(config.real):], config.synthetic_weight, config.epochs,
                  config.seq_length, config.global_batch_size, config.train_tokens)
    if config.valid_data:  # checked before anything is written
        if split_fractions(config.split)[0] != 1.0:
            raise InputError("--valid-data-path needs --split 100,0,0 (the held-out data replaces the split)",
                             fix="drop --valid-data-path or use --split 100,0,0")
        if not config.held_out_checked:
            check_held_out(config.real, config.valid_data, config.overlap_ngram, config.overlap_threshold)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    blend.split, blend.seed = config.split, config.seed
    blend.data_cache_path = str(cache_folder(output_dir.resolve(), blend, config.split, config.seed))
    blend.files = BlendFiles(data_args=str((output_dir / "data_args.txt").resolve()),
                             plan=str((output_dir / "blend.json").resolve()))
    write_text_atomic(Path(blend.files.data_args), " ".join(data_args(blend)) + "\n")
    if config.valid_data:
        held_out = [item for p in config.valid_data for item in ("1.0", str(Path(p).resolve()))]
        blend.files.per_split_data_args = str((output_dir / "per_split_data_args.json").resolve())
        write_text_atomic(Path(blend.files.per_split_data_args),
                          json.dumps({"train": data_args(blend), "valid": held_out, "test": held_out}, indent=2) + "\n")
    blend.megatron_flags = megatron_flags(blend)
    blend.save(blend.files.plan)
    return blend
