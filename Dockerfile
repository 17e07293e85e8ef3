# GPU image: NVIDIA's PyTorch container carries CUDA, torch, Transformer Engine,
# flash-attn and apex; pip finds them already satisfied and keeps them.
# Build: docker build -t megadoc-megatron .   (override BASE_IMAGE for another release)
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

WORKDIR /opt/megadoc-megatron
COPY setup.py README.md ./
COPY megadoc_megatron ./megadoc_megatron
COPY tools ./tools
COPY examples ./examples
RUN pip install --no-cache-dir -e ".[gpu,openai]"
# vLLM pins its own torch build: generation jobs run in an image of their own,
# e.g. FROM vllm/vllm-openai plus `pip install -e ".[openai]"` of this repository.

CMD ["megadoc", "--help"]
