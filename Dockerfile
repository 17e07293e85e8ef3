# Two images, one per kind of stage, because vLLM pins its own torch build:
#
#   generate: vLLM's image plus megadoc-megatron, for `megadoc synth --backend vllm` (synth.sbatch),
#             and the CPU stages around it (preprocess, megadocs, blend, merge, synth --dry-run).
#     docker build --target generate -t megadoc-megatron:generate .
#   train (the default target): NVIDIA's PyTorch container, which carries CUDA, torch, Transformer
#             Engine, flash-attn and apex (pip finds them satisfied and keeps them), for preprocess,
#             train, eval, run and sweep (preprocess.sbatch, train.sbatch, eval.sbatch, run.sbatch).
#     docker build -t megadoc-megatron .
#
# Use: CONTAINER_IMAGE=megadoc-megatron+generate.sqsh sbatch examples/slurm/synth.sbatch   (enroot/pyxis)
#      CONTAINER_IMAGE=megadoc-megatron.sqsh sbatch examples/slurm/train.sbatch
# `megadoc run` in the train image generates with --backend openai against a vLLM server (the
# generate image serves one: `vllm serve MODEL`), or with hf; vLLM itself is not in that image.
# Check: python benchmarks/gpu_check.py on one GPU of the train image (Transformer Engine included).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# The repository's files, copied once into both images
FROM scratch AS source
COPY setup.py README.md /
COPY megadoc_megatron /megadoc_megatron
COPY tools /tools
COPY examples /examples
COPY benchmarks /benchmarks

FROM ${VLLM_IMAGE} AS generate
WORKDIR /opt/megadoc-megatron
COPY --from=source / ./
# vLLM's torch satisfies ours (torch>=2.4); the constraint keeps pip from replacing it.
RUN python3 -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/keep-torch.txt \
    && pip install --no-cache-dir -c /tmp/keep-torch.txt -e ".[openai]"
ENTRYPOINT []
CMD ["megadoc", "--help"]

FROM ${BASE_IMAGE} AS train
WORKDIR /opt/megadoc-megatron
COPY --from=source / ./
RUN pip install --no-cache-dir -e ".[gpu,openai,eval]"
CMD ["megadoc", "--help"]
