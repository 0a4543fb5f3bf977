"""The op backend switch: the four ops the model runs, by backend name.

    "torch"   vilbert_kernels.reference: plain PyTorch, the official computation (the benchmark's baseline)
    "sdpa"    torch.nn.functional.scaled_dot_product_attention with a boolean key-padding mask, torch LayerNorm/GELU
    "triton"  vilbert_kernels: the fused Triton kernels (imported on first use, so the other backends never need them)

Every backend takes the `vilbert_kernels` signatures (see kernels/reference.py): attention and co_attention on
(batch, seq, heads, head_dim) tensors with per-sample lengths `q_lens`/`kv_lens` (padding at the end, padded query rows
come out as zeros, a sample with no keys gives zeros), layer_norm(x, weight, bias, eps, residual, dropout_p) =
LayerNorm(dropout(x) + residual), and bias_gelu(x, bias) = exact GELU(x + bias).
"""
import importlib
import types
from typing import Optional

import torch
import torch.nn.functional as F
from vilbert_kernels import reference

OP_NAMES = ("attention", "co_attention", "layer_norm", "bias_gelu")


# ---- "sdpa" ---------------------------------------------------------------------------------------------------------
def _sdpa_attention(q, k, v, q_lens=None, kv_lens=None, dropout_p=0.0, softmax_scale=None):
    """q: (B, Lq, H, D); k, v: (B, Lk, H, D) -> (B, Lq, H, D)."""
    B, Lq, _, _ = q.shape
    Lk = k.shape[1]
    attn_mask = None
    if kv_lens is not None:
        key_valid = reference.key_padding_mask(kv_lens, Lk, q.device)  # (B, Lk) True at real keys
        # A sample with no keys would make every score -inf (NaN softmax and gradients): let it attend everywhere,
        # then zero its output below.
        no_keys = kv_lens.to(q.device) == 0
        attn_mask = (key_valid | no_keys[:, None])[:, None, None, :]  # (B, 1, 1, Lk)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, L, D)
                                         attn_mask=attn_mask, dropout_p=dropout_p, scale=softmax_scale)
    out = out.transpose(1, 2)  # (B, Lq, H, D)
    if q_lens is None and kv_lens is None:
        return out
    if q_lens is not None:
        row_valid = reference.key_padding_mask(q_lens, Lq, q.device)  # (B, Lq)
    else:
        row_valid = torch.ones(B, Lq, dtype=torch.bool, device=q.device)
    if kv_lens is not None:
        row_valid = row_valid & ~no_keys[:, None]
    out = out * row_valid[:, :, None, None].to(out.dtype)
    return out


def _sdpa_co_attention(text_q, text_k, text_v, image_q, image_k, image_v, text_lens=None, image_lens=None,
                       dropout_p=0.0, softmax_scale=None):
    text_out = _sdpa_attention(text_q, image_k, image_v, text_lens, image_lens, dropout_p, softmax_scale)
    image_out = _sdpa_attention(image_q, text_k, text_v, image_lens, text_lens, dropout_p, softmax_scale)
    return text_out, image_out


def _sdpa_layer_norm(x, weight, bias, eps=1e-12, residual=None, dropout_p=0.0):
    if dropout_p > 0.0:
        x = F.dropout(x, p=dropout_p, training=True)
    if residual is not None:
        x = x + residual
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _sdpa_bias_gelu(x, bias):
    return F.gelu(x + bias)


_SDPA = types.SimpleNamespace(attention=_sdpa_attention, co_attention=_sdpa_co_attention,
                              layer_norm=_sdpa_layer_norm, bias_gelu=_sdpa_bias_gelu)


# ---- "triton" -------------------------------------------------------------------------------------------------------
_triton_ops: Optional[types.SimpleNamespace] = None


def _load_triton_ops() -> types.SimpleNamespace:
    global _triton_ops
    if _triton_ops is None:
        kernels = importlib.import_module("vilbert_kernels")
        found = {}
        for name in OP_NAMES:
            fn = getattr(kernels, name, None)
            if fn is None or isinstance(fn, types.ModuleType):  # a submodule of that name is not the op
                raise ImportError(f"backend 'triton' needs vilbert_kernels.{name}, which this installation does not "
                                  "export; use backend='torch' or 'sdpa'")
            found[name] = fn
        _triton_ops = types.SimpleNamespace(**found)
    return _triton_ops


def get(backend: str):
    """The ops of `backend` as a namespace with `attention`, `co_attention`, `layer_norm`, `bias_gelu`."""
    if backend == "torch":
        return reference
    if backend == "sdpa":
        return _SDPA
    if backend == "triton":
        return _load_triton_ops()
    raise ValueError(f"unknown backend {backend!r}; expected one of 'torch', 'sdpa', 'triton'")
