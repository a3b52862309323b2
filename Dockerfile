# megatron_sdmoe on NVIDIA's PyTorch container: the image's torch, Transformer Engine, Apex, NCCL
# and CUDA stay as they are; the project and the rest of its dependencies go on top.
#
#   docker build -t megatron-sdmoe .
#   docker run --gpus all --rm megatron-sdmoe sdmoe-train configs/tiny-qwen3-moe.yaml run.dir=runs/demo
#   sdmoe-submit CONFIG --nodes 2 --gpus-per-node 8 --container IMAGE ...   (SLURM with pyxis/enroot)
#
# Linted in the tests (tests/test_dockerfile.py, hadolint); it is not built there.
# 25.12: CUDA 13.1, torch 2.10 (NVIDIA's build), Python 3.12 (which the project requires).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

# The versions the code is written against; tests/test_dockerfile.py checks them against constraints.txt.
ARG MEGATRON_CORE_VERSION=0.19.2
ARG DEEPSPEED_VERSION=0.19.8

WORKDIR /workspace/megatron_sdmoe
COPY pyproject.toml constraints.txt docker/pip_inputs.py ./
# How the image's torch, Transformer Engine and Apex stay installed:
# - the image pins every package it ships in /etc/pip/constraint.txt (its PIP_CONSTRAINT), and
#   pip_inputs.py drops those packages from our constraints.txt, so the two never disagree;
# - torch==2.13.0 (pyproject.toml's PyPI wheel) is left out of the requirements, and the project
#   itself is installed with --no-deps;
# - megatron-core and deepspeed are the ARGs above (pip_inputs.py takes them out of the image's
#   constraints, should it pin other versions);
# - --no-build-isolation: DeepSpeed's source package builds against the image's torch instead of
#   downloading another one into a build environment.
RUN python pip_inputs.py \
    && pip install --no-cache-dir --no-build-isolation -c image-constraints.txt -r image-requirements.txt \
        "megatron-core==${MEGATRON_CORE_VERSION}" "deepspeed==${DEEPSPEED_VERSION}" \
    && rm pip_inputs.py image-requirements.txt image-constraints.txt

COPY . .
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
    && mkdir -p runs .cache \
    && chmod 1777 runs .cache

# Any user may run it (enroot runs the job as the submitting user; docker run --user): runs and
# caches go to world-writable directories, not to a home directory that may not exist.
ENV SDMOE_CACHE=/workspace/megatron_sdmoe/.cache/megatron_sdmoe \
    XDG_CACHE_HOME=/workspace/megatron_sdmoe/.cache \
    TRITON_CACHE_DIR=/workspace/megatron_sdmoe/.cache/triton \
    PYTHONUNBUFFERED=1

# The entrypoint stays the base image's (NVIDIA's, which runs the command it is given):
# sdmoe-submit's container mode runs `python -m megatron_sdmoe.train ...` (with --per-node,
# `python -m megatron_sdmoe.launch.torchrun ...`) with the image's python, where the project is installed.
CMD ["sdmoe-train", "--help"]
