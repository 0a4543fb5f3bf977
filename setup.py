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
    # What the model, its data pipeline and the kernels import; the training entry points (train/, not installed)
    # add DeepSpeed: the `train` extra.
    install_requires=[
        "torch>=2.4",
        # The GPU image runs triton 3.6.0; kernels are checked against it.
        "triton>=3.6",
        "numpy>=1.26",
        "lmdb>=1.4",
        "msgpack>=1.0",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "train": ["deepspeed>=0.18"],
        # numpy < 2.4: triton 3.6.0's interpreter (the CPU test path) fails on a loop bound with numpy 2.4.
        "test": ["deepspeed>=0.18", "numpy>=1.26,<2.4", "pytest>=8", "pytest-timeout>=2.3", "psutil>=5.9",
                 "matplotlib>=3.7", "tensorboard>=2.14"],
        "bench": ["matplotlib>=3.7"],
        # Optional: detected at import, never required (it does not build on a machine without CUDA). NVIDIA's apex,
        # which bench/ops.py also detects, is not on PyPI (the "apex" there is another project): build it from source.
        "flash": ["flash-attn>=2.6"],
    },
)
