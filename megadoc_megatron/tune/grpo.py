"""`megadoc synth tune`: tune a generator with GRPO (TRL) for one operation, on weighted rewards
(see rewards.py), into an HF folder that `megadoc synth --backend hf|vllm --model DIR` loads.

Prompts are rendered exactly as `megadoc synth` renders them (the style's prompt in the
generator's chat template), so the tuned model is asked what it was tuned on. Each reward is
logged separately (TRL's rewards/NAME/mean) into OUTPUT/rewards.jsonl; OUTPUT/tune.json records
the settings, the base model and the pre-training checkpoint the influence reward used.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megadoc_megatron.errors import InputError
from megadoc_megatron.files import write_text_atomic
from megadoc_megatron.jsonl import expand_inputs

STYLE_OF_OPERATION = {"rephrase": "faithful_rephrase", "reformat": "reformat_entries"}
REWARDS = ("length", "format", "faithfulness", "quality", "influence")


@dataclass
class TuneConfig:
    """The settings of `megadoc synth tune`."""
    input: list[str]                    # real documents (JSONL) to rephrase while tuning
    output: str                         # folder for the tuned model (HF), tune.json, rewards.jsonl
    tuned_operation: str = "rephrase"   # rephrase | reformat: what the generator is tuned to do
    style: str | None = None            # prompt style (default: that of the operation)
    prompts: str | None = None          # YAML file of your own styles
    model: str | None = None            # HF folder of the generator (default: SmolLM2-135M-Instruct)
    checkpoint: str | None = None       # the current pre-training checkpoint: the influence reward
    reference: list[str] | None = None  # reference documents (JSONL) for the influence reward
    weights: list[str] = field(default_factory=lambda: [f"{r}=1" for r in REWARDS])  # NAME=WEIGHT
    faithfulness_model: str | None = None
    quality_model: str | None = None
    floor_chars: int = 500              # shorter outputs earn 0
    max_ratio: float = 1.25             # length reward: output/source characters
    influence_steps: int = 2
    influence_lr: float = 1e-3
    id_key: str = "id"
    text_key: str = "text"
    max_documents: int | None = None
    max_source_chars: int = 4000        # longer documents are cut (head)
    steps: int = 100                    # GRPO steps (one prompt each)
    num_generations: int = 4            # completions per prompt (the group)
    max_new_tokens: int = 512
    temperature: float = 1.0
    learning_rate: float = 1e-6
    beta: float = 0.0                   # KL penalty to the base model
    seed: int = 0


def parse_weights(items: list[str]) -> dict[str, float]:
    weights = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in REWARDS:
            raise InputError(f"bad reward weight {item!r}",
                             fix=f"write NAME=WEIGHT with NAME one of {', '.join(REWARDS)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise InputError(f"reward weight {item!r} is not a number", fix="e.g. faithfulness=0.5") from None
    return {name: weight for name, weight in weights.items() if weight}


def build_rewards(config: TuneConfig, weights: dict[str, float], device):
    from megadoc_megatron.tune import rewards

    if "influence" in weights and not (config.checkpoint and config.reference):
        raise InputError("the influence reward needs --checkpoint (pre-training) and --reference (documents)",
                         fix="pass both, or influence=0 in --weights")
    makers = {
        "length": lambda: rewards.LengthReward(config.floor_chars, config.max_ratio),
        "format": lambda: rewards.FormatReward(config.floor_chars, config.tuned_operation),
        "faithfulness": lambda: rewards.FaithfulnessReward(config.floor_chars, config.faithfulness_model, device.type),
        "quality": lambda: rewards.QualityReward(config.floor_chars, config.quality_model, device.type),
        "influence": lambda: rewards.InfluenceReward(
            config.floor_chars, config.checkpoint, [text for _, text in _documents(config.reference, config)], device,
            config.influence_steps, config.influence_lr),
    }
    return [makers[name]() for name in weights]


def _documents(inputs, config: TuneConfig, limit: int | None = None):
    from megadoc_megatron.jsonl import read_documents

    return list(itertools.islice(read_documents(expand_inputs(inputs), config.id_key, config.text_key), limit))


def prompt_dataset(config: TuneConfig, tokenizer):
    from datasets import Dataset

    from megadoc_megatron.synth.prompts import load_catalogue

    catalogue = load_catalogue(config.prompts)
    style = config.style or STYLE_OF_OPERATION[config.tuned_operation]
    if style not in catalogue or catalogue[style].operation != "rephrase":
        raise InputError(f"no rephrase style named {style!r}", fix="see `megadoc synth styles`")
    rows = []
    for _, text in _documents(config.input, config, config.max_documents):
        source = text[:config.max_source_chars]
        messages = catalogue[style].render(document=source)
        rows.append({"prompt": tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                     "source": source})
    if not rows:
        raise InputError("no documents to tune on", config.input[0], fix="give a JSONL file of {id, text} records")
    return Dataset.from_list(rows), catalogue[style]


def _settings(config: TuneConfig) -> dict:
    """What decides the tuned generator (everything but where it goes), as tune.json records it."""
    return json.loads(json.dumps({k: v for k, v in asdict(config).items() if k != "output"}))


def _finished(config: TuneConfig, output: Path) -> dict | None:
    """tune.json of a generator already tuned into `output` with these settings (a rerun after a kill that
    came once it was complete is done, not an error); another folder there is refused."""
    if not output.exists():
        return None
    record = output / "tune.json"
    if record.is_file() and json.loads(record.read_text()).get("settings") == _settings(config):
        print(f"{output} already holds a generator tuned with these settings", flush=True)
        return json.loads(record.read_text())
    raise InputError("the output folder exists and holds something else than a generator tuned with these "
                     "settings", output, fix="give a new --output-dir (a tuned generator is never overwritten)")


def run_tune(config: TuneConfig) -> dict:
    weights = parse_weights(config.weights)
    if not weights:
        raise InputError("every reward weight is 0", fix="give at least one NAME=WEIGHT above 0")
    output = Path(config.output)
    finished = _finished(config, output)
    if finished:
        return finished
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from megadoc_megatron.distributed import shutdown
    from megadoc_megatron.synth.backends import load_chat_tokenizer
    from megadoc_megatron.synth.default_model import DEFAULT_MODEL, default_model_dir

    # Everything is written here and renamed at the end: `--model OUTPUT` never finds half a generator.
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    model = config.model or str(default_model_dir())
    tokenizer = load_chat_tokenizer(model)
    tokenizer.padding_side = "left"
    dataset, prompt = prompt_dataset(config, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "influence" in weights:
        from megadoc_megatron.evaluate.losses import evaluation_process_group

        device = evaluation_process_group()
    try:
        reward_functions = build_rewards(config, weights, device)
        grpo = GRPOConfig(
            output_dir=str(staging / "trainer"), max_steps=config.steps,
            per_device_train_batch_size=config.num_generations,
            num_generations=config.num_generations, max_completion_length=config.max_new_tokens,
            temperature=config.temperature, learning_rate=config.learning_rate, beta=config.beta,
            reward_weights=list(weights.values()), logging_steps=1, report_to=[], save_strategy="no",
            use_cpu=device.type == "cpu", bf16=device.type == "cuda", seed=config.seed, disable_tqdm=False)
        start = time.time()
        trainer = GRPOTrainer(model=model, reward_funcs=reward_functions, args=grpo, train_dataset=dataset,
                              processing_class=tokenizer)
        trainer.train()
    finally:
        if "influence" in weights:
            shutdown()
    trainer.save_model(str(staging))
    tokenizer.save_pretrained(str(staging))
    shutil.rmtree(staging / "trainer", ignore_errors=True)
    history = [entry for entry in trainer.state.log_history if any(k.startswith("rewards/") for k in entry)]
    write_text_atomic(staging / "rewards.jsonl", "".join(json.dumps(entry) + "\n" for entry in history))
    record = {"base_model": config.model or DEFAULT_MODEL, "operation": config.tuned_operation, "style": prompt.style,
              "prompt_version": prompt.version, "weights": weights, "checkpoint": config.checkpoint,
              "reference": config.reference, "steps": config.steps, "num_generations": config.num_generations,
              "max_new_tokens": config.max_new_tokens, "learning_rate": config.learning_rate, "beta": config.beta,
              "floor_chars": config.floor_chars, "seconds": round(time.time() - start, 1),
              "final_rewards": {k: v for k, v in history[-1].items() if k.startswith("rewards/")} if history else {},
              "settings": _settings(config)}
    write_text_atomic(staging / "tune.json", json.dumps(record, indent=2) + "\n")
    os.replace(staging, output)
    return record
