"""vilbert_kernels: fused Triton kernels for ViLBERT training (torch + triton only).

Each op lives in its own module (Triton kernels -> autograd Function -> public function); `reference` holds the plain
PyTorch definition of every op, the spec the kernels are tested and benchmarked against.
"""
from . import reference

__all__ = ["reference"]
