"""The plain PyTorch definition of every op in `vilbert_kernels`.

This file is the spec: the kernels are tested against it (in float64), the model's `"torch"` backend runs it, and the
benchmarks time it as the "plain PyTorch" baseline. It is written the way a BERT implementation does it (transpose to
heads-first, matmul, additive mask, softmax, dropout, matmul), with no fusion.

Layout legend: B batch, Lq / Lk query / key length, H heads, D head dim, N rows, C hidden size.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def key_padding_mask(lens: Optional[torch.Tensor], length: int, device) -> Optional[torch.Tensor]:
    """(B,) lengths -> (B, length) bool, True at real positions; None when lens is None (everything is real)."""
    if lens is None:
        return None
    return torch.arange(length, device=device)[None, :] < lens.to(device)[:, None]


def attention(q, k, v, q_lens=None, kv_lens=None, dropout_p=0.0, softmax_scale=None):
    """softmax(q k^T * scale, keys >= kv_lens masked) -> dropout -> @ v; rows >= q_lens are zero.

    q: (B, Lq, H, D); k, v: (B, Lk, H, D); q_lens, kv_lens: (B,) integer or None. Returns (B, Lq, H, D) in q's dtype.
    A sample with kv_lens == 0 gives zeros. Dropout (training semantics) when dropout_p > 0.
    """
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    key_valid = key_padding_mask(kv_lens, Lk, q.device)
    if key_valid is not None:
        key_valid = key_valid[:, None, None, :]  # (B, 1, 1, Lk)
        # A finite fill keeps an all-masked row finite; multiplying by the mask then zeroes it.
        scores = scores.masked_fill(~key_valid, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    if key_valid is not None:
        probs = probs * key_valid
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, vh).transpose(1, 2)  # (B, Lq, H, D)
    query_valid = key_padding_mask(q_lens, Lq, q.device)
    if query_valid is not None:
        out = out * query_valid[:, :, None, None]
    return out


def co_attention(text_q, text_k, text_v, image_q, image_k, image_v, text_lens=None, image_lens=None,
                 dropout_p=0.0, softmax_scale=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both directions of ViLBERT's co-attention: text queries over image keys/values, image queries over text.

    text_*: (B, T, H, D); image_*: (B, V, H, D). Returns (text_out (B, T, H, D), image_out (B, V, H, D)).
    """
    text_out = attention(text_q, image_k, image_v, text_lens, image_lens, dropout_p, softmax_scale)
    image_out = attention(image_q, text_k, text_v, image_lens, text_lens, dropout_p, softmax_scale)
    return text_out, image_out


def layer_norm(x, weight, bias, eps=1e-12, residual=None, dropout_p=0.0):
    """LayerNorm(dropout(x) + residual) over the last dim (the BERT output block after the dense bias).

    x, residual: (..., C); weight, bias: (C,). Statistics in fp32 (fp64 for fp64 input), output in x's dtype.
    """
    if dropout_p > 0.0:
        x = F.dropout(x, p=dropout_p, training=True)
    if residual is not None:
        x = x + residual
    compute = torch.promote_types(x.dtype, torch.float32)
    return F.layer_norm(x.to(compute), (x.shape[-1],), weight.to(compute), bias.to(compute), eps).to(x.dtype)


def bias_gelu(x, bias):
    """Exact (erf) GELU of x + bias, in x's dtype. x: (..., C); bias: (C,)."""
    return F.gelu(x + bias.to(x.dtype))
