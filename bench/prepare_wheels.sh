#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels that the GPU machine's image lacks, for bench/gpu_suite.sh to install
# offline. Run here, on a machine with PyPI access, from anywhere in the checkout: bash bench/prepare_wheels.sh
#
# The GPU image (see /work/.library/device/KINDS.md) already has torch 2.11+cu130, triton 3.6.0, numpy, pytest,
# tokenizers, safetensors, msgpack, tqdm, einops, ninja, psutil, py-cpuinfo, packaging, nvidia-ml-py, matplotlib.
# Missing there: deepspeed and its pure-Python needs hjson and pydantic (+ pydantic-core, annotated-types,
# typing-inspection, and typing-extensions >= 4.14, which pydantic-core imports and the image may have older), and
# lmdb. Versions are the ones this project is developed with (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mkdir -p .whl

# Binary wheels for CPython 3.12 on x86-64 Linux (the GPU image's python3), whatever this machine runs.
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 lmdb==3.0.0 \
    typing-extensions==4.16.0

# deepspeed ships only an sdist: build a pure-Python wheel here (no C++/CUDA ops: DS_BUILD_OPS=0, they are built
# just-in-time where needed). --no-build-isolation lets its setup.py see this environment's torch.
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8

ls -la .whl
du -sh .whl
