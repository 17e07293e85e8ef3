# GPU image for the SLURM scripts in examples/slurm (preprocess, train, eval, run, sweep): NVIDIA's
# PyTorch container carries CUDA, torch, Transformer Engine, flash-attn and apex; pip finds them
# already satisfied and keeps them.
# Build: docker build -t megadoc-megatron .   (override BASE_IMAGE for another release)
# Use:   CONTAINER_IMAGE=megadoc-megatron.sqsh sbatch examples/slurm/train.sbatch   (enroot/pyxis)
# Check: python benchmarks/gpu_check.py on one GPU of the image (Transformer Engine layers included)
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

WORKDIR /opt/megadoc-megatron
COPY setup.py README.md ./
COPY megadoc_megatron ./megadoc_megatron
COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks
RUN pip install --no-cache-dir -e ".[gpu,openai,eval]"
# vLLM pins its own torch build: generation (synth.sbatch) runs in an image of its own, e.g.
# FROM vllm/vllm-openai plus `pip install -e ".[openai]"` of this repository; or serve the
# generator with vLLM anywhere and use `--backend openai` from this image.

CMD ["megadoc", "--help"]
