"""Installs two packages: `vilbert` (the model, data pipeline and heads) and `vilbert_kernels` (the Triton kernels,
torch + triton only, importable by other projects without the model).

torch is not pinned: GPU users bring their own CUDA build; on a machine without a GPU install the CPU wheel first
(`pip install torch==2.13.0`), because a bare `torch` requirement pulls a multi-GB CUDA build.
"""
from setuptools import find_packages, setup

kernel_packages = ["vilbert_kernels"] + [
    "vilbert_kernels." + p for p in find_packages("kernels")
]

setup(
    name="vilbert-triton",
    version="0.1.0",
    description="ViLBERT with fused Triton attention, co-attention and training kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vilbert", "vilbert.*"]) + kernel_packages,
    package_dir={"vilbert_kernels": "kernels"},
    # The C library's header, runtime and notes travel with vilbert_kernels.aot: its generator's output includes them.
    package_data={"vilbert": ["data/*.txt"],
                  "vilbert_kernels.aot": ["include/*.h", "runtime/*.c", "runtime/*.h", "README.md"]},
    install_requires=[
        "torch>=2.4",
        # The GPU image runs triton 3.6.0; kernels are checked against it.
        "triton>=3.6",
        # triton 3.6.0's interpreter (the CPU test path) fails on a loop bound with numpy 2.4.
        "numpy>=1.26,<2.4",
        "deepspeed>=0.18",
        "lmdb>=1.4",
        "msgpack>=1.0",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "matplotlib>=3.7", "tensorboard>=2.14"],
        "bench": ["matplotlib>=3.7"],
        # Optional accelerators: detected at import, never required (neither builds on a machine without CUDA).
        "flash": ["flash-attn>=2.6"],
        "apex": ["apex"],
    },
)
