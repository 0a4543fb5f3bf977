"""vilbert_kernels: fused Triton kernels for ViLBERT training (torch + triton only).

Each op lives in its own module, read top to bottom: Triton kernels -> launcher -> torch custom op with its autograd
(opaque to torch.compile, so no graph breaks) -> public function. `reference` holds the plain PyTorch definition of
every op, the spec the kernels are tested and benchmarked against.
"""
from . import reference
from .attention import attention, co_attention
from .bias_gelu import bias_gelu
from .layer_norm import layer_norm

__all__ = ["reference", "attention", "co_attention", "layer_norm", "bias_gelu"]
