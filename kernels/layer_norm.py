"""Fused dropout + residual add + LayerNorm: y = LayerNorm(dropout(x) + residual), the BERT "output" block.

One kernel forward (each program normalises whole rows held in registers), one kernel backward (dx, dresidual and
per-program partial sums of dweight / dbias, then one deterministic sum over the programs). The backward holds rows of
up to 4096 in registers; wider rows it walks twice in 4096-wide tiles (the row sums, then the outputs).

Layers, top to bottom: Triton kernels -> launchers (`_launch_*`, on (N, C) rows) -> custom ops
`vilbert_kernels::layer_norm_fwd` / `layer_norm_bwd` (fakes and autograd registered, so torch.compile traces
`layer_norm` without graph breaks) -> `layer_norm`, which validates and draws the dropout seed that both ops take.

Maths, per row of C elements (the names are the kernels' names):

    keep  = u(seed, row, col) >= dropout_p          Philox uniform on [0, 1), one call per 4 columns; P(keep) = 1 - p
    z     = x * keep / (1 - dropout_p) + residual   the pre-norm sum, rounded to x's dtype (as the reference does)
    mean  = sum(z) / C
    rstd  = 1 / sqrt(sum((z - mean)^2) / C + eps)
    xhat  = (z - mean) * rstd
    y     = xhat * weight + bias

Backward. With wdy = weight * dy, and d xhat_j / d z_i = rstd * (delta_ij - 1/C - xhat_i xhat_j / C):

    dz        = rstd * (wdy - sum(wdy) / C - xhat * sum(wdy * xhat) / C)
    dresidual = dz
    dx        = dz * keep / (1 - dropout_p)         the same mask, regenerated from (seed, row, col), never stored
    dweight   = sum over rows of dy * xhat
    dbias     = sum over rows of dy

Saved for the backward: z (only when it differs from x, i.e. with a residual or dropout; otherwise x itself), weight,
and mean / rstd in fp32, (N,) each.

Precision: loads are converted to fp32, statistics and all arithmetic are fp32, outputs are stored in x's dtype
(dweight / dbias in the parameters' dtypes). Under torch.autocast, x and residual are cast to the autocast dtype
first, so the op runs (and returns) in the autocast dtype with fp32 statistics; weight and bias are used in their own
dtype. (torch's own layer_norm runs in fp32 under autocast; a fused op that feeds the next half-precision GEMM gains
nothing from a fp32 output.)

Layout legend: N rows (all leading dims flattened), C hidden size.
"""
import math
import numbers
from typing import Optional

import torch
import triton
import triton.language as tl

from .kernel_spec import KernelSpec
from .launch import SUPPORTED_DTYPES, as_rows, check_device, device_of, draw_seed, max_partial_sum_programs
from .philox import philox_keep

MAX_C = 8192  # the forward holds a whole row in registers; wider rows would spill


@triton.jit
def _dropout_keep(seed, rows64, first_col, C, dropout_p, BLOCK_ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """(BLOCK_ROWS, WIDTH) keep decisions at rows x columns first_col .. first_col + WIDTH - 1 (first_col a multiple
    of 4), each True with probability 1 - p: element (row, col) is output col % 4 of the Philox call at the 64-bit
    counter row * ceil(C / 4) + col // 4 (see philox.py)."""
    groups = first_col // 4 + tl.arange(0, WIDTH // 4)
    counter = rows64[:, None] * ((C + 3) // 4) + groups[None, :]  # (BLOCK_ROWS, WIDTH // 4) int64
    return philox_keep(seed, counter.to(tl.uint32), (counter >> 32).to(tl.uint32), dropout_p, BLOCK_ROWS, WIDTH)


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (N, C) input, row stride stride_x_row, unit column stride
    RESIDUAL,  # (N, C) residual, row stride stride_residual_row (read only if HAS_RESIDUAL)
    W,  # (C,) weight
    B,  # (C,) bias
    Y,  # (N, C) output, contiguous
    Z,  # (N, C) pre-norm sum for the backward, contiguous (written only if STORE_Z)
    MEAN,  # (N,) fp32
    RSTD,  # (N,) fp32
    stride_x_row, stride_residual_row,
    N, C, eps, dropout_p, seed,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_Z: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)
    rows64 = rows.to(tl.int64)  # N * C may exceed 2**31
    row_ok = rows < N
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]  # (BLOCK_ROWS, BLOCK_C)
    dense = rows64[:, None] * C + cols[None, :]  # element index in the contiguous (N, C) layout

    z = tl.load(X + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, rows64, 0, C, dropout_p, BLOCK_ROWS, BLOCK_C)
        z = tl.where(keep, z * (1.0 / (1.0 - dropout_p)), 0.0)
    if HAS_RESIDUAL:
        z += tl.load(RESIDUAL + rows64[:, None] * stride_residual_row + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
    if STORE_Z:
        # Round to x's dtype before the statistics, so the backward (which reads the stored z) sees the same values.
        z = z.to(Z.dtype.element_ty)
        tl.store(Z + dense, z, mask=mask)
        z = z.to(tl.float32)

    mean = tl.sum(z, axis=1) / C  # (BLOCK_ROWS,)
    # One correction pass removes the sum's rounding error from the mean. Without it a constant row's z - mean is a
    # rounding residue that rstd (up to 1/sqrt(eps) = 1e6) blows up to +-1, where the exact answer is 0.
    mean += tl.sum(tl.where(mask, z - mean[:, None], 0.0), axis=1) / C
    z_centered = tl.where(mask, z - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(z_centered * z_centered, axis=1) / C + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = z_centered * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + dense, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_load(DY, Z, W, rows64, row_ok, cols, mean, rstd, stride_dy_row, stride_z_row, C):
    """At (rows, cols): dy, xhat and weight * dy in fp32, zero outside the (N, C) rows, and that mask."""
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]  # (BLOCK_ROWS, len(cols))
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)  # reloaded (cached): fewer live registers
    dy = tl.load(DY + rows64[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(Z + rows64[:, None] * stride_z_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
    return dy, xhat, w[None, :] * dy, mask


@triton.jit
def _layer_norm_bwd_store(DX, DRESIDUAL, rows64, first_col, mask, wdy, xhat, c_one, c_xhat, rstd, C, dropout_p, seed,
                          HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                          WIDTH: tl.constexpr):
    """At rows x columns first_col .. first_col + WIDTH - 1: dz from the row sums c_one, c_xhat, stored as dresidual
    and, through the regenerated dropout mask, as dx."""
    cols = first_col + tl.arange(0, WIDTH)
    dz = (wdy - c_one[:, None] - xhat * c_xhat[:, None]) * rstd[:, None]
    dense = rows64[:, None] * C + cols[None, :]  # element index in the contiguous (N, C) layout
    if HAS_RESIDUAL:
        tl.store(DRESIDUAL + dense, dz.to(DRESIDUAL.dtype.element_ty), mask=mask)
    dx = dz
    if HAS_DROPOUT:
        # Last, when only dz and the accumulators are live: Philox is register-hungry.
        keep = _dropout_keep(seed, rows64, first_col, C, dropout_p, BLOCK_ROWS, WIDTH)
        dx = tl.where(keep, dz * (1.0 / (1.0 - dropout_p)), 0.0)
    tl.store(DX + dense, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (N, C) output gradient, row stride stride_dy_row, unit column stride
    Z,  # (N, C) pre-norm sum (the saved z, or x itself), row stride stride_z_row
    W,  # (C,) weight
    MEAN,  # (N,) fp32
    RSTD,  # (N,) fp32
    DX,  # (N, C) input gradient, contiguous
    DRESIDUAL,  # (N, C) residual gradient, contiguous (written only if HAS_RESIDUAL)
    DW_PARTIAL,  # (num_programs, C) fp32: this program's sum of dy * xhat over its rows
    DB_PARTIAL,  # (num_programs, C) fp32: this program's sum of dy over its rows
    stride_dy_row, stride_z_row,
    N, C, dropout_p, seed,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, TILE_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    dw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)  # used when TILE_C == BLOCK_C (a whole row in one tile)
    db_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    # Program pid takes row blocks pid, pid + num_programs, ...: a fixed order, so the partial sums are deterministic.
    for row_block in range(pid, tl.cdiv(N, BLOCK_ROWS), tl.num_programs(0)):
        rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        rows64 = rows.to(tl.int64)  # N * C may exceed 2**31
        row_ok = rows < N
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        if TILE_C == BLOCK_C:
            # The whole row stays in registers from the loads to the stores.
            dy, xhat, wdy, mask = _layer_norm_bwd_load(DY, Z, W, rows64, row_ok, cols, mean, rstd,
                                                       stride_dy_row, stride_z_row, C)
            dw_acc += tl.sum(dy * xhat, axis=0)
            db_acc += tl.sum(dy, axis=0)
            c_xhat = tl.sum(wdy * xhat, axis=1) / C  # (BLOCK_ROWS,)
            c_one = tl.sum(wdy, axis=1) / C
            _layer_norm_bwd_store(DX, DRESIDUAL, rows64, 0, mask, wdy, xhat, c_one, c_xhat, rstd, C, dropout_p,
                                  seed, HAS_RESIDUAL, HAS_DROPOUT, BLOCK_ROWS, BLOCK_C)
        else:
            # A row too wide for registers is walked in TILE_C-wide tiles twice: once for the row sums, adding the
            # dweight / dbias terms into this program's rows of the partial sums in memory (no other program touches
            # them), and once for the outputs, from dy and z reloaded (in L1 / L2 since the first walk).
            # The barrier orders the previous row block's partial-sum stores before this one's loads: the threads
            # that load an element need not be those that stored it.
            tl.debug_barrier()
            c_xhat = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
            c_one = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
            for start in range(0, C, TILE_C):
                tile = start + tl.arange(0, TILE_C)
                dy, xhat, wdy, _ = _layer_norm_bwd_load(DY, Z, W, rows64, row_ok, tile, mean, rstd,
                                                        stride_dy_row, stride_z_row, C)
                c_xhat += tl.sum(wdy * xhat, axis=1)
                c_one += tl.sum(wdy, axis=1)
                in_row = tile < C
                dw = DW_PARTIAL + pid * C + tile
                db = DB_PARTIAL + pid * C + tile
                # The program's first row block starts the sums: the buffers are not zeroed, what they held is dropped.
                started = row_block > pid
                dw_sum = tl.where(started, tl.load(dw, mask=in_row, other=0.0), 0.0)
                db_sum = tl.where(started, tl.load(db, mask=in_row, other=0.0), 0.0)
                tl.store(dw, dw_sum + tl.sum(dy * xhat, axis=0), mask=in_row)
                tl.store(db, db_sum + tl.sum(dy, axis=0), mask=in_row)
            c_xhat /= C
            c_one /= C
            for start in range(0, C, TILE_C):
                tile = start + tl.arange(0, TILE_C)
                _, xhat, wdy, mask = _layer_norm_bwd_load(DY, Z, W, rows64, row_ok, tile, mean, rstd,
                                                          stride_dy_row, stride_z_row, C)
                _layer_norm_bwd_store(DX, DRESIDUAL, rows64, start, mask, wdy, xhat, c_one, c_xhat, rstd, C,
                                      dropout_p, seed, HAS_RESIDUAL, HAS_DROPOUT, BLOCK_ROWS, TILE_C)
    if TILE_C == BLOCK_C:
        col_ok = cols < C
        tl.store(DW_PARTIAL + pid * C + cols, dw_acc, mask=col_ok)
        tl.store(DB_PARTIAL + pid * C + cols, db_acc, mask=col_ok)


def _launch_config(C):
    """(BLOCK_C, BLOCK_ROWS, num_warps, TILE_C) for rows of C elements: a whole row per program, several rows when C
    is small (so a program handles >= 1024 elements), 8 elements of each tensor per thread. TILE_C: the width of the
    tiles the backward walks a row in, the whole row up to 4096. A whole 8192-wide row in the backward (dy, z, xhat,
    dz and the dweight / dbias sums, then dropout's Philox) spills registers: 64 a thread at 32 warps, 128 at 16.
    At least 4 columns: dropout draws 4 at a time."""
    BLOCK_C = max(4, triton.next_power_of_2(C))
    BLOCK_ROWS = max(1, 1024 // BLOCK_C)
    num_warps = BLOCK_ROWS * BLOCK_C // 256  # 4 (C <= 1024) ... 32 (C > 4096)
    return BLOCK_C, BLOCK_ROWS, num_warps, min(BLOCK_C, 4096)


def _stores_z(residual, dropout_p):
    """Whether the forward stores the pre-norm sum z (otherwise z is x)."""
    return residual is not None or dropout_p > 0.0


def _launch_layer_norm_fwd(x, weight, bias, eps, residual, dropout_p, seed):
    """x, residual: (N, C) rows. Returns y (N, C), z (N, C) (x itself when nothing is fused), mean, rstd (N,) fp32."""
    N, C = x.shape
    store_z = _stores_z(residual, dropout_p)
    y = torch.empty((N, C), dtype=x.dtype, device=x.device)
    z = torch.empty((N, C), dtype=x.dtype, device=x.device) if store_z else x
    mean = torch.empty((N,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((N,), dtype=torch.float32, device=x.device)
    BLOCK_C, BLOCK_ROWS, num_warps, _ = _launch_config(C)
    if N > 0:
        with device_of(x):
            _layer_norm_fwd_kernel[(triton.cdiv(N, BLOCK_ROWS),)](
                x, x if residual is None else residual, weight, bias, y, z, mean, rstd,
                x.stride(0), 0 if residual is None else residual.stride(0),
                N, C, eps, dropout_p, seed,
                HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0.0, STORE_Z=store_z,
                BLOCK_ROWS=BLOCK_ROWS, BLOCK_C=BLOCK_C, num_warps=num_warps)
    return y, z, mean, rstd


def _launch_layer_norm_bwd(dy, z, weight, mean, rstd, has_residual, dropout_p, seed):
    """dy, z: (N, C) rows. Returns dx (N, C), dresidual (N, C) or None, dweight / dbias (C,) fp32."""
    N, C = z.shape
    BLOCK_C, BLOCK_ROWS, num_warps, TILE_C = _launch_config(C)
    num_programs = min(triton.cdiv(N, BLOCK_ROWS), max_partial_sum_programs(z.device))
    dx = torch.empty((N, C), dtype=z.dtype, device=z.device)
    dresidual = torch.empty((N, C), dtype=z.dtype, device=z.device) if has_residual else None
    dw_partial = torch.empty((num_programs, C), dtype=torch.float32, device=z.device)
    db_partial = torch.empty((num_programs, C), dtype=torch.float32, device=z.device)
    if num_programs > 0:
        with device_of(z):
            _layer_norm_bwd_kernel[(num_programs,)](
                dy, z, weight, mean, rstd, dx, dx if dresidual is None else dresidual, dw_partial, db_partial,
                dy.stride(0), z.stride(0),
                N, C, dropout_p, seed,
                HAS_RESIDUAL=has_residual, HAS_DROPOUT=dropout_p > 0.0,
                BLOCK_ROWS=BLOCK_ROWS, BLOCK_C=BLOCK_C, TILE_C=TILE_C, num_warps=num_warps)
    return dx, dresidual, dw_partial.sum(0), db_partial.sum(0)  # (C,) each; a 0-program sum gives zeros


def _dropout_keep_mask(n_rows, C, dropout_p, seed, device):
    """The (n_rows, C) bool keep mask the kernels draw for (dropout_p, seed) (seed: from `draw_seed`), for tests
    (the op never stores it): the forward kernel itself, run on ones, stores z = keep / (1 - dropout_p)."""
    ones = torch.ones((n_rows, C), dtype=torch.float32, device=device)
    _, z, _, _ = _launch_layer_norm_fwd(ones, ones[0], ones[0], 1.0, None, dropout_p, int(seed))
    return z != 0


# torch.compile sees the kernels through two custom ops with fakes (no graph break, no tracing into Triton).
# torch.library.triton_op + wrap_triton would let Inductor see the kernels themselves, but under TRITON_INTERPRET=1
# (the CPU tests) wrap_triton does not recognise the interpreter's kernels and torch.compile runs them on fake tensors,
# so the ops are opaque custom_ops. The dropout seed is an op input (a CPU tensor drawn outside the op), so each op is a
# pure function of its inputs and the backward regenerates the forward's mask from the same seed.


@torch.library.custom_op("vilbert_kernels::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   residual: Optional[torch.Tensor], dropout_p: float,
                   seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: (..., C); seed: CPU int64 (1,). Returns y (..., C); z (..., C), or (0,) when nothing is fused (the
    backward then reads x: an op output may not alias an input); mean, rstd (N,) fp32."""
    C = x.shape[-1]
    residual_rows = None if residual is None else as_rows(residual, C)  # (N, C)
    y, z, mean, rstd = _launch_layer_norm_fwd(as_rows(x, C), weight, bias, eps, residual_rows, dropout_p, int(seed))
    z = z.view(x.shape) if _stores_z(residual, dropout_p) else x.new_empty((0,))
    return y.view(x.shape), z, mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, residual, dropout_p, seed):
    n_rows = math.prod(x.shape[:-1])
    return (x.new_empty(x.shape), x.new_empty(x.shape if _stores_z(residual, dropout_p) else (0,)),
            x.new_empty((n_rows,), dtype=torch.float32), x.new_empty((n_rows,), dtype=torch.float32))


@torch.library.custom_op("vilbert_kernels::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                   has_residual: bool, dropout_p: float,
                   seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy, z: (..., C) (z: the saved pre-norm sum, or x). Returns dx (..., C); dresidual (..., C), or (0,) without a
    residual; dweight, dbias (C,) fp32."""
    C = z.shape[-1]
    dx, dresidual, dweight, dbias = _launch_layer_norm_bwd(as_rows(dy, C), as_rows(z, C), weight, mean, rstd,
                                                           has_residual, dropout_p, int(seed))
    dresidual = dresidual.view(z.shape) if has_residual else z.new_empty((0,))
    return dx.view(z.shape), dresidual, dweight, dbias


@layer_norm_bwd.register_fake
def _(dy, z, weight, mean, rstd, has_residual, dropout_p, seed):
    C = z.shape[-1]
    return (z.new_empty(z.shape), z.new_empty(z.shape if has_residual else (0,)),
            z.new_empty((C,), dtype=torch.float32), z.new_empty((C,), dtype=torch.float32))


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, eps, residual, dropout_p, seed = inputs
    y, z, mean, rstd = output
    ctx.mark_non_differentiable(z, mean, rstd)
    ctx.save_for_backward(z if _stores_z(residual, dropout_p) else x, weight, mean, rstd, seed)
    ctx.has_residual, ctx.dropout_p, ctx.bias_dtype = residual is not None, dropout_p, bias.dtype


def _layer_norm_backward(ctx, dy, *_):  # z, mean and rstd are non-differentiable outputs
    z, weight, mean, rstd, seed = ctx.saved_tensors
    dx, dresidual, dweight, dbias = layer_norm_bwd(dy, z, weight, mean, rstd, ctx.has_residual, ctx.dropout_p, seed)
    return (dx, dweight.to(weight.dtype), dbias.to(ctx.bias_dtype), None,
            dresidual if ctx.has_residual else None, None, None)


layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)


def _autocast(x, residual):
    """Under torch.autocast, x and residual in the autocast dtype (before validation: they may differ until then)."""
    if isinstance(x, torch.Tensor) and x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, residual = (t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in SUPPORTED_DTYPES else t
                       for t in (x, residual))
    return x, residual


def _validate(x, weight, bias, eps, residual, dropout_p):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"layer_norm: x has dtype {x.dtype}; expected one of {SUPPORTED_DTYPES}")
    if x.dim() == 0 or not 1 <= x.shape[-1] <= MAX_C:
        raise ValueError(f"layer_norm: x has shape {tuple(x.shape)}; expected (..., C) with 1 <= C <= {MAX_C}")
    check_device(x, "layer_norm: x")
    C = x.shape[-1]
    for name, param in (("weight", weight), ("bias", bias)):
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"layer_norm: {name} must be a torch.Tensor, got {type(param).__name__}")
        if tuple(param.shape) != (C,):
            raise ValueError(f"layer_norm: {name} has shape {tuple(param.shape)}; expected ({C},), x's last dim")
        if param.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"layer_norm: {name} has dtype {param.dtype}; expected one of {SUPPORTED_DTYPES}")
        if param.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {param.device} but x is on {x.device}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"layer_norm: residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"layer_norm: residual has shape {tuple(residual.shape)}; expected x's shape "
                             f"{tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"layer_norm: residual has dtype {residual.dtype}; expected x's dtype {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"layer_norm: residual is on {residual.device} but x is on {x.device}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"layer_norm: dropout_p is {dropout_p!r}; expected a number in [0, 1)")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0.0:
        raise ValueError(f"layer_norm: eps is {eps!r}; expected a number >= 0")


def layer_norm(x, weight, bias, eps=1e-12, residual=None, dropout_p=0.0):
    """LayerNorm(dropout(x) + residual) over the last dim, fused into one kernel (and one for the backward).

    Args:
        x: (..., C) fp32 / fp16 / bf16, 1 <= C <= 8192; rows may be strided (unit stride along C), else copied.
        weight, bias: (C,) fp32 / fp16 / bf16, on x's device, any strides; used in fp32.
        eps: added to the variance (BERT uses 1e-12).
        residual: None or (..., C) like x (shape, dtype, device); added after dropout.
        dropout_p: probability of zeroing an element of x (survivors scaled by 1 / (1 - dropout_p)); the mask comes
            from torch's default CPU generator (torch.manual_seed reproduces it) and is regenerated in the backward.
            Always applied when > 0: pass 0.0 in evaluation.

    Returns:
        y: (..., C) in x's dtype (the autocast dtype under torch.autocast). Statistics are computed in fp32.
    Differentiable in x, weight, bias and residual.
    """
    x, residual = _autocast(x, residual)
    _validate(x, weight, bias, eps, residual, dropout_p)
    dropout_p = float(dropout_p)
    # The kernels read weight and bias as dense (C,) vectors: a strided or expanded one is copied (autograd-aware).
    y, _, _, _ = layer_norm_fwd(x, weight.contiguous(), bias.contiguous(), float(eps), residual, dropout_p,
                                draw_seed(dropout_p))
    return y


def sm90_specs():
    """The launch configurations `layer_norm` uses at C = 768, 1024, 3072 and 8192, per dtype, plain and with residual +
    dropout (weight and bias in x's dtype; other parameter dtypes change only two loads)."""
    specs = []
    pointer = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
    for BLOCK_C, BLOCK_ROWS, num_warps, TILE_C in sorted({_launch_config(C) for C in (768, 1024, 3072, 8192)}):
        for dtype in SUPPORTED_DTYPES:
            t = pointer[dtype]
            for fused in (False, True):
                tag = f"{t[1:]},{'residual+dropout' if fused else 'plain'},BLOCK_C={BLOCK_C},BLOCK_ROWS={BLOCK_ROWS}"
                specs.append(KernelSpec(
                    name=f"layer_norm_fwd[{tag}]", fn=_layer_norm_fwd_kernel,
                    signature={"X": t, "RESIDUAL": t, "W": t, "B": t, "Y": t, "Z": t, "MEAN": "*fp32", "RSTD": "*fp32",
                               "stride_x_row": "i32", "stride_residual_row": "i32", "N": "i32", "C": "i32",
                               "eps": "fp32", "dropout_p": "fp32", "seed": "i32",
                               "HAS_RESIDUAL": "constexpr", "HAS_DROPOUT": "constexpr", "STORE_Z": "constexpr",
                               "BLOCK_ROWS": "constexpr", "BLOCK_C": "constexpr"},
                    constexprs={"HAS_RESIDUAL": fused, "HAS_DROPOUT": fused, "STORE_Z": fused,
                                "BLOCK_ROWS": BLOCK_ROWS, "BLOCK_C": BLOCK_C},
                    num_warps=num_warps))
                specs.append(KernelSpec(
                    name=f"layer_norm_bwd[{tag},TILE_C={TILE_C}]", fn=_layer_norm_bwd_kernel,
                    signature={"DY": t, "Z": t, "W": t, "MEAN": "*fp32", "RSTD": "*fp32", "DX": t, "DRESIDUAL": t,
                               "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", "stride_dy_row": "i32",
                               "stride_z_row": "i32", "N": "i32", "C": "i32", "dropout_p": "fp32", "seed": "i32",
                               "HAS_RESIDUAL": "constexpr", "HAS_DROPOUT": "constexpr",
                               "BLOCK_ROWS": "constexpr", "BLOCK_C": "constexpr", "TILE_C": "constexpr"},
                    constexprs={"HAS_RESIDUAL": fused, "HAS_DROPOUT": fused,
                                "BLOCK_ROWS": BLOCK_ROWS, "BLOCK_C": BLOCK_C, "TILE_C": TILE_C},
                    num_warps=num_warps))
    return specs
