"""Fused attention and bidirectional co-attention for ViLBERT, forward and backward, in Triton.

Maths (per batch b, head h; scale = softmax_scale, 1/sqrt(D) by default)::

    S = scale * Q K^T                      (Lq, Lk); keys j >= kv_len masked to -inf
    P = softmax(S) row-wise,  LSE = logsumexp(S) row-wise
    Z = keep / (1 - p)                     keep ~ Bernoulli(1 - p), one draw per (direction, b, h, i, j)
    O = (P * Z) V                          rows i >= q_len are zero

The forward walks the key blocks of one query tile with an online softmax (running max m and sum l in fp32) and
never writes S or P; it stores LSE (fp32, (B, H, Lq)) for the backward. With dP = dO V^T and
delta_i = rowsum(dO_i * O_i) = sum_j P_ij Z_ij dP_ij, the backward is::

    dV = (P * Z)^T dO,   dS = P * (Z * dP - delta),   dQ = scale * dS K,   dK = scale * dS^T Q

P is recomputed from Q, K and LSE; Z is regenerated from the same Philox seed and element offsets (one Philox call per
4 keys, see philox.py), so neither the scores nor the dropout mask is ever stored. delta is computed inside both
backward kernels from the O and dO tiles they load anyway (no separate pre-pass launch).

Co-attention runs both directions (text queries over image keys, image queries over text keys) in ONE forward launch:
the grid's last axis is the direction and each program picks its direction's pointers, strides and lengths. The backward
covers both directions in two launches: one program per key block computes dK and dV (no atomics, deterministic), one
program per query tile computes dQ. When one key block holds every key (in fp16/bf16 up to 128 keys at head dims up to
128: ViLBERT's pretraining and downstream lengths; fp32's blocks are smaller, see its launch configurations), the dK/dV
program sees all of each query row and writes its dQ too, so the backward is one launch that reads every input once
(the least traffic possible) instead of two that each read Q, K, V, O and dO.
`attention` is the same kernels with one direction.

The public functions validate their inputs, apply torch.autocast, draw the dropout seed from torch's default generator
and call registered custom ops (`torch.ops.vilbert_kernels.attention_forward` etc., with fakes and autograd), so
torch.compile(fullgraph=True) sees no graph break.

Layout legend: B batch, Lq / Lk query / key length, H heads, D head dim; T text length, V image length.
Precision: fp32 accumulation and statistics (m, l, LSE, delta); outputs and gradients in the inputs' dtype. fp32
inputs multiply in exact fp32 or, when PyTorch's fp32 matmul setting allows it, in TF32 (see `dot_precision`).
"""
import itertools
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
import triton
import triton.language as tl

from .kernel_spec import KernelSpec
from .launch import (HOPPER_SHARED_MEMORY, SUPPORTED_DTYPES, check_device, device_of, draw_seed,
                     shared_memory_per_program)
from .philox import philox_keep

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): the kernels work in base 2
LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------------

@triton.jit
def _valid_len(LENS, b, L):
    """Number of real positions of sample b: LENS[b] clamped to [0, L] (int32)."""
    return tl.minimum(tl.maximum(tl.load(LENS + b), 0), L).to(tl.int32)  # clamped before the cast: int64 lens


@triton.jit
def _direction_inputs(
    direction, b, h, Q0, K0, V0, Q1, K1, V1, LENS_A, LENS_B,
    stride_q0b, stride_q0l, stride_q0h, stride_k0b, stride_k0l, stride_k0h, stride_v0b, stride_v0l, stride_v0h,
    stride_q1b, stride_q1l, stride_q1h, stride_k1b, stride_k1l, stride_k1h, stride_v1b, stride_v1l, stride_v1h,
    L_A, L_B,
):
    """Direction 0 is L_A queries over L_B keys, direction 1 the reverse. Returns the (b, h) row-0 pointers of q, k, v,
    their row strides, the padded lengths Lq, Lk and the real lengths q_len, kv_len."""
    len_a = _valid_len(LENS_A, b, L_A)
    len_b = _valid_len(LENS_B, b, L_B)
    if direction == 0:
        q = Q0 + b * stride_q0b + h * stride_q0h
        k = K0 + b * stride_k0b + h * stride_k0h
        v = V0 + b * stride_v0b + h * stride_v0h
        stride_ql, stride_kl, stride_vl = stride_q0l, stride_k0l, stride_v0l
        Lq, Lk, q_len, kv_len = L_A, L_B, len_a, len_b
    else:
        q = Q1 + b * stride_q1b + h * stride_q1h
        k = K1 + b * stride_k1b + h * stride_k1h
        v = V1 + b * stride_v1b + h * stride_v1h
        stride_ql, stride_kl, stride_vl = stride_q1l, stride_k1l, stride_v1l
        Lq, Lk, q_len, kv_len = L_B, L_A, len_b, len_a
    return q, k, v, stride_ql, stride_kl, stride_vl, Lq, Lk, q_len, kv_len


@triton.jit
def _row_ptrs(X, rows, stride_row, HEAD_DIM: tl.constexpr):
    """(rows, HEAD_DIM) pointers. Every row starts 16-byte aligned (the launcher ensures it) and is contiguous, which
    the hints pass on to the compiler for 16-byte vector loads."""
    ptrs = X + rows[:, None] * stride_row + tl.arange(0, HEAD_DIM)[None, :]
    return tl.max_contiguous(tl.multiple_of(ptrs, [16, 16]), [1, HEAD_DIM])


@triton.jit
def _keep_mask(SEED, stream, rows, first_col, Lk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dropout keep decisions (BLOCK_M, BLOCK_N) of queries `rows` x keys first_col .. first_col + BLOCK_N - 1
    (first_col a multiple of 4), each kept with probability 1 - dropout_p. Element (i, j) of stream
    (direction * B + b) * H + h is output j % 4 of the Philox call at counter (i * ceil(Lk / 4) + j // 4, stream): its
    own uniform number, the same in every kernel whatever its tiles, with 32-bit arithmetic only."""
    groups = first_col // 4 + tl.arange(0, BLOCK_N // 4)
    c0 = (rows[:, None] * ((Lk + 3) // 4) + groups[None, :]).to(tl.uint32)  # (BLOCK_M, BLOCK_N // 4)
    return philox_keep(SEED, c0, c0 * 0 + stream, dropout_p, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["SEED", "L_A", "L_B"])
def _attention_fwd_kernel(
    Q0, K0, V0, O0, LSE0,  # direction 0: q (B, L_A, H, D), k/v (B, L_B, H, D), out (B, L_A, H, D), lse (B, H, L_A)
    Q1, K1, V1, O1, LSE1,  # direction 1 (co-attention only): q (B, L_B, H, D), k/v (B, L_A, H, D), out, lse
    LENS_A, LENS_B,  # (B,) int lengths of the L_A / L_B sequences (the launcher passes full ones when none given)
    stride_q0b, stride_q0l, stride_q0h, stride_k0b, stride_k0l, stride_k0h, stride_v0b, stride_v0l, stride_v0h,
    stride_q1b, stride_q1l, stride_q1h, stride_k1b, stride_k1l, stride_k1h, stride_v1b, stride_v1l, stride_v1h,
    L_A, L_B,  # padded sequence lengths
    H,  # heads
    softmax_scale, dropout_p, SEED,
    DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (batch*head, query tile, direction): out and LSE of BLOCK_M queries."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    direction = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    Q, K, V, stride_ql, stride_kl, stride_vl, Lq, Lk, q_len, kv_len = _direction_inputs(
        direction, b, h, Q0, K0, V0, Q1, K1, V1, LENS_A, LENS_B,
        stride_q0b, stride_q0l, stride_q0h, stride_k0b, stride_k0l, stride_k0h, stride_v0b, stride_v0l, stride_v0h,
        stride_q1b, stride_q1l, stride_q1h, stride_k1b, stride_k1l, stride_k1h, stride_v1b, stride_v1l, stride_v1h,
        L_A, L_B)
    if direction == 0:
        O, LSE = O0, LSE0
    else:
        O, LSE = O1, LSE1

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_valid = rows < q_len
    q = tl.load(_row_ptrs(Q, rows, stride_ql, HEAD_DIM), mask=row_valid[:, None], other=0.0)
    qk_scale = softmax_scale * LOG2E
    stream = (direction * tl.num_programs(0) + pid_bh).to(tl.uint32)  # dropout stream of (direction, b, h)
    dropout_scale = 1.0 / (1.0 - dropout_p)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of S (base-2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(S - m)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # A query tile entirely past q_len is padding: it skips the key loop and writes zeros.
    kv_end = tl.where(pid_m * BLOCK_M < q_len, kv_len, 0)
    for start_n in range(0, kv_end, BLOCK_N):
        cols = start_n + offs_n
        col_valid = cols < kv_len
        k = tl.load(_row_ptrs(K, cols, stride_kl, HEAD_DIM), mask=col_valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(col_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every visited block has a real key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax normaliser counts dropped entries too
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _keep_mask(SEED, stream, rows, start_n, Lk, dropout_p, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)  # 1 / (1 - p) once, on the output: p (up to 1) times it overflows fp16
        v = tl.load(_row_ptrs(V, cols, stride_vl, HEAD_DIM), mask=col_valid[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = row_valid & (l_i > 0.0)
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if DROPOUT:
        out = out * dropout_scale
    out = tl.where(row_valid[:, None], out, 0.0)
    # Rows without keys get LSE = +inf, so the backward's exp(S - LSE) is 0 there with no extra masking.
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("inf"))
    O_bh = O + (b * Lq * H + h) * HEAD_DIM  # out is contiguous (B, Lq, H, D)
    tl.store(_row_ptrs(O_bh, rows, H * HEAD_DIM, HEAD_DIM), out.to(O.dtype.element_ty), mask=(rows < Lq)[:, None])
    tl.store(LSE + pid_bh * Lq + rows, lse, mask=rows < Lq)


@triton.jit(do_not_specialize=["SEED", "L_A", "L_B"])
def _attention_bwd_dkdv_kernel(
    Q0, K0, V0, O0, LSE0, DO0, DK0, DV0, DQ0,  # direction 0: as in the forward; do like out; dk/dv/dq contiguous
    Q1, K1, V1, O1, LSE1, DO1, DK1, DV1, DQ1,  # direction 1 (co-attention only)
    LENS_A, LENS_B,  # (B,) int lengths of the L_A / L_B sequences
    stride_q0b, stride_q0l, stride_q0h, stride_k0b, stride_k0l, stride_k0h, stride_v0b, stride_v0l, stride_v0h,
    stride_q1b, stride_q1l, stride_q1h, stride_k1b, stride_k1l, stride_k1h, stride_v1b, stride_v1l, stride_v1h,
    L_A, L_B, H,
    softmax_scale, dropout_p, SEED,
    DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FUSED_DQ: tl.constexpr,  # one key block covers every key (Lk <= BLOCK_N): also write dQ, complete per query tile
):
    """One program per (batch*head, key block, direction): dK, dV of BLOCK_N keys, looping over the query tiles; with
    FUSED_DQ also dQ of every query tile, so the whole backward is this one launch (DQ* are unused otherwise)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    direction = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    Q, K, V, stride_ql, stride_kl, stride_vl, Lq, Lk, q_len, kv_len = _direction_inputs(
        direction, b, h, Q0, K0, V0, Q1, K1, V1, LENS_A, LENS_B,
        stride_q0b, stride_q0l, stride_q0h, stride_k0b, stride_k0l, stride_k0h, stride_v0b, stride_v0l, stride_v0h,
        stride_q1b, stride_q1l, stride_q1h, stride_k1b, stride_k1l, stride_k1h, stride_v1b, stride_v1l, stride_v1h,
        L_A, L_B)
    if direction == 0:
        O, LSE, DO, DK, DV, DQ = O0, LSE0, DO0, DK0, DV0, DQ0
    else:
        O, LSE, DO, DK, DV, DQ = O1, LSE1, DO1, DK1, DV1, DQ1
    q_bh = (b * Lq * H + h) * HEAD_DIM  # out, do, dq: contiguous (B, Lq, H, D)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    col_valid = cols < kv_len
    k = tl.load(_row_ptrs(K, cols, stride_kl, HEAD_DIM), mask=col_valid[:, None], other=0.0)
    v = tl.load(_row_ptrs(V, cols, stride_vl, HEAD_DIM), mask=col_valid[:, None], other=0.0)
    qk_scale = softmax_scale * LOG2E
    stream = (direction * tl.num_programs(0) + pid_bh).to(tl.uint32)
    dropout_scale = 1.0 / (1.0 - dropout_p)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # A key block entirely past kv_len gets no gradient: skip the query loop and write zeros.
    q_end = tl.where(pid_n * BLOCK_N < kv_len, q_len, 0)
    for start_m in range(0, q_end, BLOCK_M):
        rows = start_m + offs_m
        row_valid = rows < q_len
        q = tl.load(_row_ptrs(Q, rows, stride_ql, HEAD_DIM), mask=row_valid[:, None], other=0.0)
        o = tl.load(_row_ptrs(O + q_bh, rows, H * HEAD_DIM, HEAD_DIM), mask=row_valid[:, None], other=0.0)
        do = tl.load(_row_ptrs(DO + q_bh, rows, H * HEAD_DIM, HEAD_DIM), mask=row_valid[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (BLOCK_M,)
        lse = tl.load(LSE + pid_bh * Lq + rows, mask=row_valid, other=float("inf")) * LOG2E
        # Transposed tiles (keys x queries), so the dK/dV products need no register transposes.
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.where(col_valid[:, None], tl.exp2(s_t - lse[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
        pz_t = p_t
        if DROPOUT:
            keep = tl.trans(_keep_mask(SEED, stream, rows, pid_n * BLOCK_N, Lk, dropout_p, BLOCK_M, BLOCK_N))
            # Scaled here (p_t is normalised, so p_t / (1 - p) overflows fp16 only past p = 0.99998 with a dominant
            # key): scaling dV at the store instead spills 32 bytes at D=128 with triton 3.9.
            pz_t = tl.where(keep, p_t * dropout_scale, 0.0)
            dp_t = tl.where(keep, dp_t * dropout_scale, 0.0)
        dv = tl.dot(pz_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        if FUSED_DQ:
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PRECISION)
            tl.store(_row_ptrs(DQ + q_bh, rows, H * HEAD_DIM, HEAD_DIM), (dq * softmax_scale).to(DQ.dtype.element_ty),
                     mask=(rows < Lq)[:, None])
    if FUSED_DQ:  # query tiles the loop skipped (padding, or no keys at all) have zero dQ
        for start_m in range(tl.cdiv(q_end, BLOCK_M) * BLOCK_M, Lq, BLOCK_M):
            rows = start_m + offs_m
            tl.store(_row_ptrs(DQ + q_bh, rows, H * HEAD_DIM, HEAD_DIM),
                     tl.zeros([BLOCK_M, HEAD_DIM], DQ.dtype.element_ty), mask=(rows < Lq)[:, None])

    kv_bh = (b * Lk * H + h) * HEAD_DIM  # dk, dv: contiguous (B, Lk, H, D)
    store_mask = (cols < Lk)[:, None]
    tl.store(_row_ptrs(DK + kv_bh, cols, H * HEAD_DIM, HEAD_DIM), (dk * softmax_scale).to(DK.dtype.element_ty),
             mask=store_mask)
    tl.store(_row_ptrs(DV + kv_bh, cols, H * HEAD_DIM, HEAD_DIM), dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit(do_not_specialize=["SEED", "L_A", "L_B"])
def _attention_bwd_dq_kernel(
    Q0, K0, V0, O0, LSE0, DO0, DQ0,  # direction 0: as in the forward; do like out; dq contiguous like q
    Q1, K1, V1, O1, LSE1, DO1, DQ1,  # direction 1 (co-attention only)
    LENS_A, LENS_B,  # (B,) int lengths of the L_A / L_B sequences
    stride_q0b, stride_q0l, stride_q0h, stride_k0b, stride_k0l, stride_k0h, stride_v0b, stride_v0l, stride_v0h,
    stride_q1b, stride_q1l, stride_q1h, stride_k1b, stride_k1l, stride_k1h, stride_v1b, stride_v1l, stride_v1h,
    L_A, L_B, H,
    softmax_scale, dropout_p, SEED,
    DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (batch*head, query tile, direction): dQ of BLOCK_M queries, looping over the key blocks."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    direction = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    Q, K, V, stride_ql, stride_kl, stride_vl, Lq, Lk, q_len, kv_len = _direction_inputs(
        direction, b, h, Q0, K0, V0, Q1, K1, V1, LENS_A, LENS_B,
        stride_q0b, stride_q0l, stride_q0h, stride_k0b, stride_k0l, stride_k0h, stride_v0b, stride_v0l, stride_v0h,
        stride_q1b, stride_q1l, stride_q1h, stride_k1b, stride_k1l, stride_k1h, stride_v1b, stride_v1l, stride_v1h,
        L_A, L_B)
    if direction == 0:
        O, LSE, DO, DQ = O0, LSE0, DO0, DQ0
    else:
        O, LSE, DO, DQ = O1, LSE1, DO1, DQ1
    q_bh = (b * Lq * H + h) * HEAD_DIM  # out, do, dq: contiguous (B, Lq, H, D)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_valid = rows < q_len
    q = tl.load(_row_ptrs(Q, rows, stride_ql, HEAD_DIM), mask=row_valid[:, None], other=0.0)
    o = tl.load(_row_ptrs(O + q_bh, rows, H * HEAD_DIM, HEAD_DIM), mask=row_valid[:, None], other=0.0)
    do = tl.load(_row_ptrs(DO + q_bh, rows, H * HEAD_DIM, HEAD_DIM), mask=row_valid[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (BLOCK_M,)
    lse = tl.load(LSE + pid_bh * Lq + rows, mask=row_valid, other=float("inf")) * LOG2E
    qk_scale = softmax_scale * LOG2E
    stream = (direction * tl.num_programs(0) + pid_bh).to(tl.uint32)
    dropout_scale = 1.0 / (1.0 - dropout_p)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    kv_end = tl.where(pid_m * BLOCK_M < q_len, kv_len, 0)
    for start_n in range(0, kv_end, BLOCK_N):
        cols = start_n + offs_n
        col_valid = cols < kv_len
        k = tl.load(_row_ptrs(K, cols, stride_kl, HEAD_DIM), mask=col_valid[:, None], other=0.0)
        v = tl.load(_row_ptrs(V, cols, stride_vl, HEAD_DIM), mask=col_valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.where(col_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if DROPOUT:
            keep = _keep_mask(SEED, stream, rows, start_n, Lk, dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    tl.store(_row_ptrs(DQ + q_bh, rows, H * HEAD_DIM, HEAD_DIM), (dq * softmax_scale).to(DQ.dtype.element_ty),
             mask=(rows < Lq)[:, None])


# ----------------------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------------------

# TF32's tiles (see _tf32_launch_config) fit in shared memory up to this head dim; above it fp32 stays exact.
TF32_MAX_HEAD_DIM = 128


def dot_precision(dtype: torch.dtype, head_dim: int) -> str:
    """How the kernels multiply matrices of this dtype: "half" (fp16/bf16 on the tensor cores), "tf32" (fp32 inputs
    rounded to TF32 on the tensor cores: 10 mantissa bits, fp32 accumulation) or "ieee" (exact fp32 on the CUDA cores).
    fp32 follows PyTorch's setting for fp32 matrix products, read at each call as FlexAttention does: exact by default,
    TF32 after torch.set_float32_matmul_precision("high") (or "medium") or torch.backends.cuda.matmul.fp32_precision =
    "tf32", at head dims up to TF32_MAX_HEAD_DIM."""
    if dtype != torch.float32:
        return "half"
    if head_dim > TF32_MAX_HEAD_DIM:
        return "ieee"
    # torch >= 2.9 keeps the setting here ("none" until set; the legacy setters write it too). Its legacy getter raises
    # once another backend's precision was set through the new API, so it is read only on older torch.
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if setting is None:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "tf32" if setting == "tf32" else "ieee"


def _block(length: int) -> int:
    """Tile size along a sequence: the smallest of 16/32/64 covering it (ViLBERT's sequences are 36..101 long)."""
    return min(max(16, triton.next_power_of_2(length)), 64)


def attention_launch_config(lq: int, lk: int, head_dim: int, precision: str = "half",
                            shared_memory: int = HOPPER_SHARED_MEMORY) -> dict:
    """Block sizes and warps of the three kernels for at most lq queries and lk keys (max over both directions), for
    matrix products in `precision` ("half", "tf32" or "ieee": see `dot_precision`), on a GPU that gives a program
    `shared_memory` bytes.

    Tiles are short (16/32/64) because the sequences are: one query tile and one or two key blocks per (batch, head)
    at ViLBERT's lengths. The tile each program owns (queries in fwd/dq, keys in dkdv) is up to 64 rows, so Hopper's
    wgmma (64-row warpgroup MMA) applies; the tile a backward program loops over is at most 32, which keeps its fp32
    score, probability and dropout tiles in registers next to the accumulators (no spills at D=128 with dropout,
    also when the dkdv program computes dQ as well, i.e. lk <= bwd_dkdv's BLOCK_N). Warps grow with the head dim for
    the same reason.

    The dkdv key block covers every key up to 128 keys at head dims up to 128 (with 8 warps, as many warps per SM as
    two programs of 4): the backward is then one launch, also for the downstream co-attention (80 x 101). At D=128
    that block steps over 16 queries at a time with three load stages: 32 queries, or two stages, spill with dropout
    (compile_check, triton 3.6).

    TF32 and exact fp32 have tiles of their own: see _tf32_launch_config and _fp32_launch_config. TF32's 128-key
    dK/dV block needs Hopper's shared memory (224 KB at D=128); with less (A100: 163 KB, Ada: 99 KB) the TF32
    backward keeps two launches.
    """
    own_m, own_n = _block(lq), _block(lk)
    if precision == "ieee":
        return _fp32_launch_config(own_m, own_n, head_dim)
    num_warps = 4 if head_dim <= 64 else 8
    dkdv = dict(BLOCK_M=min(own_m, 32), BLOCK_N=own_n, num_warps=num_warps, num_stages=2)
    one_launch_fits = precision != "tf32" or shared_memory >= HOPPER_SHARED_MEMORY
    if 64 < lk <= 128 and head_dim <= 128 and one_launch_fits:
        dkdv.update(BLOCK_N=128, num_warps=8)
        if head_dim > 64:
            dkdv.update(BLOCK_M=16, num_stages=3)
    configs = {
        "fwd": dict(BLOCK_M=own_m, BLOCK_N=own_n, num_warps=num_warps, num_stages=2),
        "bwd_dkdv": dkdv,
        "bwd_dq": dict(BLOCK_M=own_m, BLOCK_N=min(_block(lk), 32), num_warps=num_warps, num_stages=2),
    }
    return _tf32_launch_config(configs, head_dim) if precision == "tf32" else configs


def _tf32_launch_config(half: dict, head_dim: int) -> dict:
    """fp32 inputs with TF32 products: wgmma as in half precision, but every tile holds twice the bytes, and half
    precision's tiles spill (up to 552 bytes of stack per thread; in a 64-key dK/dV block at D=128, K, V and the two
    accumulators alone take 128 fp32 registers per thread). So dK/dV programs step over 16 queries, forward programs
    have 8 warps, and at D=128 key steps are at most 32 (16 in dQ) and a dK/dV program owns 32 keys, or 128 with one
    load stage (224 KB of shared memory: the one-launch backward at 65-128 keys). Picked from a sweep of tiles, warps
    and stages compiled with triton 3.6 and 3.9: spill-free with both at every tile pair (test_compile_check). Head
    dims up to TF32_MAX_HEAD_DIM: at 256 these tiles overflow shared memory."""
    fwd, dkdv, dq = (dict(half[name]) for name in ("fwd", "bwd_dkdv", "bwd_dq"))
    fwd["num_warps"] = 8
    dkdv["BLOCK_M"] = 16
    if head_dim > 64:
        fwd["BLOCK_N"] = min(fwd["BLOCK_N"], 32)
        dq["BLOCK_N"] = 16
        if dkdv["BLOCK_N"] == 128:
            dkdv["num_stages"] = 1
        else:
            dkdv["BLOCK_N"] = min(dkdv["BLOCK_N"], 32)
    return {"fwd": fwd, "bwd_dkdv": dkdv, "bwd_dq": dq}


def _fp32_launch_config(own_m: int, own_n: int, head_dim: int) -> dict:
    """fp32 inputs: the kernels' tl.dot runs in exact fp32 ("ieee"), on CUDA cores with its operands in registers, not
    on the tensor cores. Half precision's tiles spill there (up to 9 KB of stack per thread, compile_check), so the
    loop tiles are smaller and every kernel has 8 warps: forward steps of 32 keys at head dim 64 and 16 at 128, dQ
    programs of up to 64 queries at head dim 64 and 32 at 128 stepping over 16 keys, and dK/dV steps of 16 queries
    (32 in a 32-key block). ptxas trades a few registers for occupancy differently from one Triton release to the next
    (8-byte spills come and go); these tiles are spill-free on sm_90 at head dims 64 and 128, with and without dropout,
    at every tile pair the lengths can ask for, with triton 3.6 (the GPU image's) and 3.9 (test_compile_check). A
    128-key dK/dV block spills kilobytes: the one-launch backward stops at 64 keys here. Shared memory stays inside
    Hopper's 227 KB per program up to head dim 256 (test_compile_check)."""
    return {
        "fwd": dict(BLOCK_M=own_m, BLOCK_N=32 if head_dim <= 64 else 16, num_warps=8, num_stages=2),
        "bwd_dkdv": dict(BLOCK_M=32 if own_n == 32 else 16, BLOCK_N=own_n, num_warps=8, num_stages=2),
        "bwd_dq": dict(BLOCK_M=min(own_m, 64 if head_dim <= 64 else 32), BLOCK_N=16, num_warps=8, num_stages=2),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Launchers (one or two directions)
# ----------------------------------------------------------------------------------------------------------------------

def _aligned(t: torch.Tensor) -> torch.Tensor:
    """The kernels read rows of headdim contiguous elements starting at 16-byte boundaries (so they can use vector
    loads), at 32-bit offsets from their sample and head: true of contiguous tensors and of slices of a fused
    projection. Anything else (e.g. a sequence-first layout with a huge row stride) is copied once."""
    def ok(x):
        return (x.stride(-1) == 1 and x.data_ptr() % 16 == 0
                and all(stride * x.element_size() % 16 == 0 for size, stride in zip(x.shape[:3], x.stride()[:3])
                        if size > 1)
                and (x.shape[1] + _MAX_TILE) * x.stride(1) + x.shape[3] <= _MAX_ROW_OFFSET)
    if ok(t):
        return t
    t = t.contiguous()
    return t if ok(t) else t.clone()


def _strides(directions: Sequence[Tuple[torch.Tensor, ...]]) -> List[int]:
    """(b, l, h) strides of q, k, v for direction 0 then direction 1 (direction 0 repeated for plain attention)."""
    sets = list(directions) + [directions[0]] * (2 - len(directions))
    return [s for q, k, v in (d[:3] for d in sets) for t in (q, k, v) for s in t.stride()[:3]]


# tl.dot's input_precision for each dot_precision() (fp16/bf16 products ignore it).
_DOT_INPUT_PRECISION = {"half": "tf32", "tf32": "tf32", "ieee": "ieee"}


def _lengths(lens: Optional[Tensor], x: Tensor) -> Tensor:
    """lens as int64, or when None (every position real) x's sequence length for each sample. The kernels always take
    int64 lengths: one specialization, the one compile_check checks (compiled without lengths, some spilled)."""
    if lens is None:
        return torch.full((x.shape[0],), x.shape[1], dtype=torch.int64, device=x.device)
    return lens.to(torch.int64)


def _common_args(directions, lens_a, lens_b, dropout_p, softmax_scale, seed):
    """Arguments shared by the three kernels (after their pointers), their constexprs and the launch configs."""
    q, k, _ = directions[0]
    _, l_a, num_heads, head_dim = q.shape
    l_b = k.shape[1]
    # The kernels index lengths as lens[b]: an expanded (stride-0) or sliced lengths tensor must be made dense. (The
    # public functions already passed them through _lengths, a no-op now; the custom ops may be called directly.)
    lens_a, lens_b = _lengths(lens_a, q).contiguous(), _lengths(lens_b, k).contiguous()
    args = [lens_a, lens_b, *_strides(directions), l_a, l_b, num_heads, softmax_scale, dropout_p, seed]
    precision = dot_precision(q.dtype, head_dim)
    meta = dict(DROPOUT=dropout_p > 0.0, HEAD_DIM=head_dim, DOT_PRECISION=_DOT_INPUT_PRECISION[precision])
    configs = attention_launch_config(max(d[0].shape[1] for d in directions),
                                      max(d[1].shape[1] for d in directions), head_dim, precision,
                                      shared_memory_per_program(q.device))
    return args, meta, configs


def _attention_forward(directions, lens_a, lens_b, dropout_p, softmax_scale, seed):
    """directions: [(q, k, v)] or [(q0, k0, v0), (q1, k1, v1)] -> ([out per direction], [lse per direction])."""
    directions = [tuple(_aligned(t) for t in d) for d in directions]
    q, _, _ = directions[0]
    batch, _, num_heads, _ = q.shape
    outs = [torch.empty(d[0].shape, dtype=d[0].dtype, device=d[0].device) for d in directions]
    lses = [torch.empty((batch, num_heads, d[0].shape[1]), dtype=torch.float32, device=q.device) for d in directions]
    args, meta, configs = _common_args(directions, lens_a, lens_b, dropout_p, softmax_scale, seed)
    pointers = [[*d, o, lse] for d, o, lse in zip(directions, outs, lses)]
    config = configs["fwd"]
    max_lq = max(d[0].shape[1] for d in directions)
    grid = (batch * num_heads, triton.cdiv(max_lq, config["BLOCK_M"]), len(directions))
    # Plain attention passes direction 0's pointers twice; the grid never runs direction 1.
    with device_of(q):
        _attention_fwd_kernel[grid](*pointers[0], *pointers[-1], *args, **meta, **config)
    return outs, lses


def _attention_backward(directions, outs, lses, douts, lens_a, lens_b, dropout_p, softmax_scale, seed):
    """Gradients (dq, dk, dv) per direction: one dK/dV launch and one dQ launch cover every direction, or the dK/dV
    launch alone when one key block holds every key (ViLBERT's lengths in fp16/bf16): it then computes dQ too."""
    directions = [tuple(_aligned(t) for t in d) for d in directions]
    # The kernels read dO with out's layout (contiguous) from a 16-byte aligned start.
    douts = [_aligned(do.contiguous()) for do in douts]
    q, _, _ = directions[0]
    batch, _, num_heads, _ = q.shape
    grads = [tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in d) for d in directions]
    args, meta, configs = _common_args(directions, lens_a, lens_b, dropout_p, softmax_scale, seed)

    config = configs["bwd_dkdv"]
    pointers = [[*d, o, lse, do, dk, dv, dq]
                for d, o, lse, do, (dq, dk, dv) in zip(directions, outs, lses, douts, grads)]
    max_lk = max(d[1].shape[1] for d in directions)
    fused_dq = max_lk <= config["BLOCK_N"]
    grid = (batch * num_heads, triton.cdiv(max_lk, config["BLOCK_N"]), len(directions))
    with device_of(q):
        _attention_bwd_dkdv_kernel[grid](*pointers[0], *pointers[-1], *args, **meta, **config, FUSED_DQ=fused_dq)
    if fused_dq:
        return grads

    config = configs["bwd_dq"]
    pointers = [[*d, o, lse, do, dq] for d, o, lse, do, (dq, _, _) in zip(directions, outs, lses, douts, grads)]
    max_lq = max(d[0].shape[1] for d in directions)
    grid = (batch * num_heads, triton.cdiv(max_lq, config["BLOCK_M"]), len(directions))
    with device_of(q):
        _attention_bwd_dq_kernel[grid](*pointers[0], *pointers[-1], *args, **meta, **config)
    return grads


# ----------------------------------------------------------------------------------------------------------------------
# Registered ops (opaque to torch.compile: no graph breaks), their fakes and autograd
# ----------------------------------------------------------------------------------------------------------------------
# The dropout seed travels as a CPU int64 tensor of shape (1,) drawn by the public function from torch's default
# generator (so torch.manual_seed reproduces it and torch.compile can trace the draw); the ops read it on the host,
# which is no device synchronisation.

@torch.library.custom_op("vilbert_kernels::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, q_lens: Optional[Tensor], kv_lens: Optional[Tensor],
                      dropout_p: float, softmax_scale: float, seed: Tensor) -> Tuple[Tensor, Tensor]:
    """out (B, Lq, H, D) and lse (B, H, Lq) fp32 of one attention direction."""
    (out,), (lse,) = _attention_forward([(q, k, v)], q_lens, kv_lens, dropout_p, softmax_scale, int(seed.item()))
    return out, lse


@attention_forward.register_fake
def _(q, k, v, q_lens, kv_lens, dropout_p, softmax_scale, seed):
    batch, lq, num_heads, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((batch, num_heads, lq),
                                                                                   dtype=torch.float32)


@torch.library.custom_op("vilbert_kernels::attention_backward", mutates_args=())
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       q_lens: Optional[Tensor], kv_lens: Optional[Tensor], dropout_p: float, softmax_scale: float,
                       seed: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one attention direction; the dropout mask is regenerated from seed."""
    ((dq, dk, dv),) = _attention_backward([(q, k, v)], [out], [lse], [dout], q_lens, kv_lens, dropout_p,
                                          softmax_scale, int(seed.item()))
    return dq, dk, dv


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, q_lens, kv_lens, dropout_p, softmax_scale, seed):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, q_lens, kv_lens, dropout_p, softmax_scale, seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, q_lens, kv_lens, seed)
    ctx.dropout_p, ctx.softmax_scale = dropout_p, softmax_scale


def _attention_autograd(ctx, dout, dlse):  # lse is non-differentiable: dlse is None
    q, k, v, out, lse, q_lens, kv_lens, seed = ctx.saved_tensors
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, q_lens, kv_lens, ctx.dropout_p, ctx.softmax_scale, seed)
    return dq, dk, dv, None, None, None, None, None


attention_forward.register_autograd(_attention_autograd, setup_context=_attention_setup_context)


@torch.library.custom_op("vilbert_kernels::co_attention_forward", mutates_args=())
def co_attention_forward(text_q: Tensor, text_k: Tensor, text_v: Tensor, image_q: Tensor, image_k: Tensor,
                         image_v: Tensor, text_lens: Optional[Tensor], image_lens: Optional[Tensor], dropout_p: float,
                         softmax_scale: float, seed: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(text_out, image_out, text_lse, image_lse): both directions in one launch."""
    directions = [(text_q, image_k, image_v), (image_q, text_k, text_v)]
    (text_out, image_out), (text_lse, image_lse) = _attention_forward(directions, text_lens, image_lens, dropout_p,
                                                                      softmax_scale, int(seed.item()))
    return text_out, image_out, text_lse, image_lse


@co_attention_forward.register_fake
def _(text_q, text_k, text_v, image_q, image_k, image_v, text_lens, image_lens, dropout_p, softmax_scale, seed):
    outs = [torch.empty_like(q, memory_format=torch.contiguous_format) for q in (text_q, image_q)]
    lses = [q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32) for q in (text_q, image_q)]
    return (*outs, *lses)


@torch.library.custom_op("vilbert_kernels::co_attention_backward", mutates_args=())
def co_attention_backward(text_dout: Tensor, image_dout: Tensor, text_q: Tensor, text_k: Tensor, text_v: Tensor,
                          image_q: Tensor, image_k: Tensor, image_v: Tensor, text_out: Tensor, image_out: Tensor,
                          text_lse: Tensor, image_lse: Tensor, text_lens: Optional[Tensor],
                          image_lens: Optional[Tensor], dropout_p: float, softmax_scale: float,
                          seed: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the six inputs: one or two launches for both directions."""
    directions = [(text_q, image_k, image_v), (image_q, text_k, text_v)]
    (text_dq, image_dk, image_dv), (image_dq, text_dk, text_dv) = _attention_backward(
        directions, [text_out, image_out], [text_lse, image_lse], [text_dout, image_dout], text_lens, image_lens,
        dropout_p, softmax_scale, int(seed.item()))
    return text_dq, text_dk, text_dv, image_dq, image_dk, image_dv


@co_attention_backward.register_fake
def _(text_dout, image_dout, text_q, text_k, text_v, image_q, image_k, image_v, *rest):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (text_q, text_k, text_v, image_q, image_k, image_v))


def _co_attention_setup_context(ctx, inputs, output):
    *qkv, text_lens, image_lens, dropout_p, softmax_scale, seed = inputs
    ctx.mark_non_differentiable(*output[2:])  # the LSEs
    ctx.save_for_backward(*qkv, *output, text_lens, image_lens, seed)
    ctx.dropout_p, ctx.softmax_scale = dropout_p, softmax_scale


def _co_attention_autograd(ctx, text_dout, image_dout, text_dlse, image_dlse):
    *saved, text_lens, image_lens, seed = ctx.saved_tensors
    grads = co_attention_backward(text_dout, image_dout, *saved, text_lens, image_lens, ctx.dropout_p,
                                  ctx.softmax_scale, seed)
    return (*grads, None, None, None, None, None)


co_attention_forward.register_autograd(_co_attention_autograd, setup_context=_co_attention_setup_context)


# ----------------------------------------------------------------------------------------------------------------------
# Public functions and their input checks
# ----------------------------------------------------------------------------------------------------------------------

# The kernels take softmax_scale and dropout_p as fp32 and compute softmax_scale * log2(e) and 1 / (1 - dropout_p):
# both must stay finite there. fp16's backward also holds kept probabilities times 1 / (1 - dropout_p) (up to that
# scale itself), which must fit fp16.
_MAX_SOFTMAX_SCALE = torch.finfo(torch.float32).max / LOG2E.value
# fp16: 1 - p must be at least 1/65504 in fp32, where p lives as a multiple of 2^-24 below 1: 257 of them.
_MAX_DROPOUT_P = {torch.float16: 1 - 257 * 2**-24}
_MAX_DROPOUT_P_FP32 = 1 - 2**-24  # the largest fp32 number below 1
# Row offsets within one (sample, head) are int32: rows (up to a tile past seqlen, masked) times the row stride.
_MAX_ROW_OFFSET, _MAX_TILE = 2**31 - 1, 128


def _autocast(tensors):
    """Under torch.autocast, cast the inputs to the autocast dtype (the kernels run in one dtype)."""
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return tensors  # the checks that follow name the culprit
    device_type = tensors[0].device.type
    if device_type != "meta" and torch.is_autocast_enabled(device_type):  # (meta tensors have no autocast)
        dtype = torch.get_autocast_dtype(device_type)
        return [t.to(dtype) if t.is_floating_point() else t for t in tensors]
    return tensors


def _check_tensors(named: dict) -> None:
    """Every input a 4-D (batch, seqlen, nheads, headdim) floating tensor; one dtype, one device; head dim usable."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, nheads, headdim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    (first, ref), *rest = named.items()
    for name, t in rest:
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {ref.device}; expected one device")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first} has {ref.dtype}; expected one dtype")
        for dim, what in ((0, "batch"), (2, "nheads"), (3, "headdim")):
            if t.shape[dim] != ref.shape[dim]:
                raise ValueError(f"{name} has {what}={t.shape[dim]} but {first} has {what}={ref.shape[dim]}; "
                                 f"expected equal (shapes {tuple(t.shape)} and {tuple(ref.shape)})")
    head_dim = ref.shape[3]
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"headdim of {first} must be a power of 2 in [16, 256], got {head_dim}")
    for name, t in named.items():
        if t.shape[1] == 0:
            raise ValueError(f"{name} has seqlen 0; expected at least 1 (use lengths for empty samples)")
        if (t.shape[1] + _MAX_TILE) * t.shape[2] * t.shape[3] > _MAX_ROW_OFFSET:
            raise ValueError(f"{name} has seqlen * nheads * headdim = {t.shape[1] * t.shape[2] * t.shape[3]}; "
                             f"expected below {_MAX_ROW_OFFSET - _MAX_TILE * t.shape[2] * t.shape[3]} (the kernels "
                             f"address the rows of one sample with 32-bit offsets)")


def _check_same_len(named: dict) -> None:
    (first, ref), *rest = named.items()
    for name, t in rest:
        if t.shape[1] != ref.shape[1]:
            raise ValueError(f"{name} has seqlen {t.shape[1]} but {first} has {ref.shape[1]}; expected equal")


def _check_lens(name: str, lens, batch: int, device) -> None:
    if lens is None:
        return
    if not isinstance(lens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({batch},) or None, got {type(lens).__name__}")
    if lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype int32 or int64, got {lens.dtype}")
    if tuple(lens.shape) != (batch,):
        raise ValueError(f"{name} must have shape (batch,) = ({batch},), got {tuple(lens.shape)}")
    if lens.device != device:
        raise ValueError(f"{name} is on {lens.device}; expected the inputs' device {device}")


def _check_dropout_and_scale(dropout_p, softmax_scale, head_dim: int, dtype: torch.dtype) -> Tuple[float, float]:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    max_p = _MAX_DROPOUT_P.get(dtype, _MAX_DROPOUT_P_FP32)
    if dropout_p > max_p:
        raise ValueError(f"dropout_p must be at most {max_p!r} for {dtype} inputs (1 / (1 - dropout_p) must fit "
                         f"{'float16' if dtype == torch.float16 else 'float32'}), got {dropout_p!r}")
    if softmax_scale is None:
        return float(dropout_p), 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    # Comparisons only (no math.isfinite): a symbolic float under torch.compile supports them.
    if not 0 < softmax_scale <= _MAX_SOFTMAX_SCALE:
        raise ValueError(f"softmax_scale must be a positive float32 number of at most {_MAX_SOFTMAX_SCALE:.4e} "
                         f"(times log2(e) it must fit float32), got {softmax_scale}")
    return float(dropout_p), float(softmax_scale)


def attention(q, k, v, q_lens=None, kv_lens=None, dropout_p=0.0, softmax_scale=None):
    """Fused softmax attention with per-sample lengths and dropout on the probabilities.

    out[b, i, h] = sum_j dropout(softmax_j(softmax_scale * q[b, i, h] . k[b, j, h])) v[b, j, h], over keys
    j < kv_lens[b]; rows i >= q_lens[b] of out are zero. Equal to `vilbert_kernels.reference.attention`.

    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim), float16, bfloat16 or float32 (its products exact, or TF32 where
            torch.set_float32_matmul_precision allows: see `dot_precision`). Strided views are read in place
            when headdim is contiguous and every row starts 16-byte aligned (contiguous tensors, slices of a fused
            (batch_size, seqlen, 3, nheads, headdim) projection); other layouts are copied once.
        k, v: (batch_size, seqlen_k, nheads, headdim), same dtype and device as q. seqlen_k may differ from seqlen_q.
        q_lens: (batch_size,) int32/int64 on q's device, or None (all seqlen_q rows real). Rows >= q_lens[b] are
            padding: their output and the gradients flowing from them are zero.
        kv_lens: (batch_size,) int32/int64 on q's device, or None (all seqlen_k keys real). Keys >= kv_lens[b] are
            masked out. A sample with kv_lens[b] == 0 gives zeros (never NaN).
            Lengths are clamped to [0, seqlen] inside the kernel (a length above seqlen means "all"), so nothing
            is read back to the host.
        dropout_p: probability of dropping an attention probability, in [0, 1) (for float16 inputs at most
            0.9999847, so that the scale fits float16). Kept entries are scaled by 1 / (1 - dropout_p). Applied
            whenever dropout_p > 0 (pass 0.0 at eval time). The mask is drawn from a seed taken from torch's default
            (CPU) generator, so torch.manual_seed reproduces it; the backward regenerates it from that seed.
        softmax_scale: scaling of q k^T before the softmax; default 1 / sqrt(headdim).
    Return:
        out: (batch_size, seqlen_q, nheads, headdim), contiguous, q's dtype (fp32 accumulation inside).
        Differentiable with respect to q, k and v. Under torch.autocast the inputs are cast to the autocast dtype
        first. Works under torch.compile(fullgraph=True) (the kernels are registered custom ops).
    """
    q, k, v = _autocast([q, k, v])
    _check_tensors({"q": q, "k": k, "v": v})
    _check_same_len({"k": k, "v": v})
    _check_lens("q_lens", q_lens, q.shape[0], q.device)
    _check_lens("kv_lens", kv_lens, q.shape[0], q.device)
    dropout_p, softmax_scale = _check_dropout_and_scale(dropout_p, softmax_scale, q.shape[3], q.dtype)
    check_device(q, "q")
    q_lens, kv_lens = _lengths(q_lens, q), _lengths(kv_lens, k)
    out, _ = attention_forward(q, k, v, q_lens, kv_lens, dropout_p, softmax_scale, draw_seed(dropout_p))
    return out


def co_attention(text_q, text_k, text_v, image_q, image_k, image_v, text_lens=None, image_lens=None, dropout_p=0.0,
                 softmax_scale=None):
    """ViLBERT's co-attention, both directions in one kernel launch (one or two in the backward).

    text_out = attention(text_q, image_k, image_v, text_lens, image_lens, dropout_p, softmax_scale)
    image_out = attention(image_q, text_k, text_v, image_lens, text_lens, dropout_p, softmax_scale)
    with independent dropout masks for the two directions.

    Arguments:
        text_q, text_k, text_v: (batch_size, seqlen_text, nheads, headdim), float16, bfloat16 or float32; strided
            views as in `attention`.
        image_q, image_k, image_v: (batch_size, seqlen_image, nheads, headdim), same dtype, device, batch_size,
            nheads and headdim as the text tensors.
        text_lens: (batch_size,) int32/int64 or None: real text tokens per sample. Masks the text keys of the image
            direction and zeroes text_out rows >= text_lens[b].
        image_lens: (batch_size,) int32/int64 or None: real regions per sample. Masks the image keys of the text
            direction and zeroes image_out rows >= image_lens[b].
            Lengths are clamped to [0, seqlen] inside the kernel; a length of 0 gives zeros on the other side.
        dropout_p, softmax_scale: as in `attention`.
    Return:
        (text_out (batch_size, seqlen_text, nheads, headdim), image_out (batch_size, seqlen_image, nheads, headdim)),
        in the inputs' dtype; differentiable with respect to all six inputs.
    """
    text_q, text_k, text_v, image_q, image_k, image_v = _autocast([text_q, text_k, text_v, image_q, image_k, image_v])
    _check_tensors({"text_q": text_q, "text_k": text_k, "text_v": text_v,
                    "image_q": image_q, "image_k": image_k, "image_v": image_v})
    _check_same_len({"text_q": text_q, "text_k": text_k, "text_v": text_v})
    _check_same_len({"image_q": image_q, "image_k": image_k, "image_v": image_v})
    _check_lens("text_lens", text_lens, text_q.shape[0], text_q.device)
    _check_lens("image_lens", image_lens, text_q.shape[0], text_q.device)
    dropout_p, softmax_scale = _check_dropout_and_scale(dropout_p, softmax_scale, text_q.shape[3], text_q.dtype)
    check_device(text_q, "text_q")
    text_lens, image_lens = _lengths(text_lens, text_q), _lengths(image_lens, image_q)
    text_out, image_out, _, _ = co_attention_forward(text_q, text_k, text_v, image_q, image_k, image_v, text_lens,
                                                     image_lens, dropout_p, softmax_scale, draw_seed(dropout_p))
    return text_out, image_out


# ----------------------------------------------------------------------------------------------------------------------
# sm_90 compile check
# ----------------------------------------------------------------------------------------------------------------------

def _signature(fn, dtype: str, constexprs: dict) -> dict:
    """Argument types as the launcher passes them: q/k/v/out/grad tensors of `dtype`, fp32 LSE, int64 lengths,
    fp32 scale and dropout_p, int32 strides, lengths, head count and seed."""
    scalars = {"softmax_scale": "fp32", "dropout_p": "fp32", "SEED": "i32", "L_A": "i32", "L_B": "i32", "H": "i32"}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in scalars:
            signature[name] = scalars[name]
        elif name.startswith("stride_"):
            signature[name] = "i32"
        elif name.startswith("LENS_"):
            signature[name] = "*i64"
        elif name.startswith("LSE"):
            signature[name] = "*fp32"
        else:
            signature[name] = f"*{dtype}"
    return signature


# sm90_specs' dtypes: the tensors' dtype and the dot precision ("tf32": fp32 tensors with TF32 products).
_SPEC_DTYPES = {"fp16": ("fp16", "half"), "bf16": ("bf16", "half"), "tf32": ("fp32", "tf32"), "fp32": ("fp32", "ieee")}


def sm90_specs(head_dims=(64, 128), dtypes=("fp16", "bf16", "tf32", "fp32"), dropouts=(False, True),
               lengths=((37, 37), (101, 101), (32, 32), (1024, 1024)),
               shared_memory=HOPPER_SHARED_MEMORY) -> List[KernelSpec]:
    """The kernels at the configurations the launcher uses (both directions, (queries, keys) lengths given): by default
    every dtype (fp32 exact and TF32), D=64 (text heads) and 128 (visual and co-attention heads), with and without
    dropout, for lengths 33..64 (pretraining 36x37), 65..128 (downstream up to 101), 17..32 and above 128 (the square
    benchmarks): every kernel the backward's one or two launches use at each. shared_memory: a program's on the GPU
    the configurations are for (Hopper's by default)."""
    kernels = {"fwd": _attention_fwd_kernel, "bwd_dkdv": _attention_bwd_dkdv_kernel, "bwd_dq": _attention_bwd_dq_kernel}
    specs = {}
    for head_dim, spec_dtype, dropout, (lq, lk) in itertools.product(head_dims, dtypes, dropouts, lengths):
        dtype, precision = _SPEC_DTYPES[spec_dtype]
        if precision == "tf32" and head_dim > TF32_MAX_HEAD_DIM:
            continue  # exact fp32 there: the "fp32" specs
        configs = attention_launch_config(lq, lk, head_dim, precision, shared_memory)
        fused_dq = lk <= configs["bwd_dkdv"]["BLOCK_N"]
        for short in ("fwd", "bwd_dkdv") if fused_dq else ("fwd", "bwd_dkdv", "bwd_dq"):
            config = configs[short]
            constexprs = dict(DROPOUT=dropout, HEAD_DIM=head_dim, BLOCK_M=config["BLOCK_M"],
                              BLOCK_N=config["BLOCK_N"], DOT_PRECISION=_DOT_INPUT_PRECISION[precision])
            if short == "bwd_dkdv":
                constexprs["FUSED_DQ"] = fused_dq
            name = (f"attention_{short}{',dq' if short == 'bwd_dkdv' and fused_dq else ''}"
                    f"[D={head_dim},{spec_dtype},dropout={int(dropout)},BLOCK={config['BLOCK_M']}x"
                    f"{config['BLOCK_N']},warps={config['num_warps']}]")
            fn = kernels[short]
            specs.setdefault(name, KernelSpec(name, fn, _signature(fn, dtype, constexprs), constexprs,
                                              num_warps=config["num_warps"], num_stages=config["num_stages"]))
    return list(specs.values())
