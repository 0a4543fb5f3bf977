"""Fused bias add + exact (erf) GELU: y = GELU(x + bias), the activation of BERT's feed-forward block.

Elementwise, so rows are cut into column tiles (any C); the backward also reduces dbias over the rows, through
per-program partial sums and one deterministic sum over the programs.

Layers, top to bottom: Triton kernels -> launchers (`_launch_*`, on (N, C) rows) -> custom ops
`vilbert_kernels::bias_gelu_fwd` / `bias_gelu_bwd` (fakes and autograd registered, so torch.compile traces
`bias_gelu` without graph breaks) -> `bias_gelu`, which validates.

Maths, per element (the names are the kernels' names):

    u     = x + bias
    cdf   = (1 + erf(u / sqrt(2))) / 2              the standard normal CDF, Phi(u)
    y     = u * cdf

Backward. d/du (u * Phi(u)) = Phi(u) + u * phi(u), with the normal density pdf = phi(u) = exp(-u^2 / 2) / sqrt(2 pi):

    dx    = dy * (cdf + u * pdf)
    dbias = sum over rows of dx

Saved for the backward: x and bias (u is recomputed; nothing new is stored).

Precision: loads are converted to fp32, all arithmetic is fp32, y and dx are stored in x's dtype, dbias in bias's
dtype. u is not rounded to x's dtype (the reference, `F.gelu(x + bias)`, rounds it when both are half precision).
Under torch.autocast, x is cast to the autocast dtype first, so the op runs (and returns) in the autocast dtype; bias
is used in its own dtype (an fp32 bias does not promote the output to fp32, as `x + bias` would).

Layout legend: N rows (all leading dims flattened), C columns.
"""

import torch
import triton
import triton.language as tl

from .kernel_spec import KernelSpec
from .launch import SUPPORTED_DTYPES, as_rows, check_device, device_of, max_partial_sum_programs


@triton.jit
def _bias_gelu_fwd_kernel(
    X,  # (N, C) input, row stride stride_x_row, unit column stride
    BIAS,  # (C,)
    Y,  # (N, C) output, contiguous
    stride_x_row,
    N, C,
    BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows64 = rows.to(tl.int64)  # N * C may exceed 2**31
    col_ok = cols < C
    mask = (rows < N)[:, None] & col_ok[None, :]  # (BLOCK_ROWS, BLOCK_C)
    x = tl.load(X + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    u = x + bias[None, :]
    cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))  # 1 / sqrt(2)
    tl.store(Y + rows64[:, None] * C + cols[None, :], (u * cdf).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY,  # (N, C) output gradient, row stride stride_dy_row, unit column stride
    X,  # (N, C) input, row stride stride_x_row, unit column stride
    BIAS,  # (C,)
    DX,  # (N, C) input gradient, contiguous
    DBIAS_PARTIAL,  # (num_row_programs, C) fp32: this program's sum of dx over its rows
    stride_dy_row, stride_x_row,
    N, C,
    BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    dbias_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    # Program pid takes row blocks pid, pid + num_programs, ...: a fixed order, so the partial sums are deterministic.
    for row_block in range(pid, tl.cdiv(N, BLOCK_ROWS), tl.num_programs(0)):
        rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        rows64 = rows.to(tl.int64)
        mask = (rows < N)[:, None] & col_ok[None, :]  # (BLOCK_ROWS, BLOCK_C)
        dy = tl.load(DY + rows64[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = x + bias[None, :]
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))  # 1 / sqrt(2)
        pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327  # 1 / sqrt(2 pi)
        dx = dy * (cdf + u * pdf)  # masked elements: dy = 0, so dx = 0
        tl.store(DX + rows64[:, None] * C + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dbias_acc += tl.sum(dx, axis=0)
    partial = DBIAS_PARTIAL + pid.to(tl.int64) * C  # num_programs * C may exceed 2**31
    tl.store(partial + cols, dbias_acc, mask=col_ok)


def _launch_config(C):
    """(BLOCK_C, BLOCK_ROWS, num_warps) for rows of C elements: tiles of up to 1024 columns and 2048 elements,
    8 elements per thread."""
    BLOCK_C = min(triton.next_power_of_2(C), 1024)
    BLOCK_ROWS = max(1, 2048 // BLOCK_C)
    num_warps = BLOCK_ROWS * BLOCK_C // 256  # 8
    return BLOCK_C, BLOCK_ROWS, num_warps


def _launch_bias_gelu_fwd(x, bias):
    """x: (N, C) rows. Returns y (N, C) in x's dtype."""
    N, C = x.shape
    y = torch.empty((N, C), dtype=x.dtype, device=x.device)
    BLOCK_C, BLOCK_ROWS, num_warps = _launch_config(C)
    if N > 0:
        with device_of(x):
            _bias_gelu_fwd_kernel[(triton.cdiv(N, BLOCK_ROWS), triton.cdiv(C, BLOCK_C))](
                x, bias, y, x.stride(0), N, C, BLOCK_ROWS=BLOCK_ROWS, BLOCK_C=BLOCK_C, num_warps=num_warps)
    return y


def _launch_bias_gelu_bwd(dy, x, bias):
    """dy, x: (N, C) rows. Returns dx (N, C) in x's dtype, dbias (C,) fp32."""
    N, C = x.shape
    BLOCK_C, BLOCK_ROWS, num_warps = _launch_config(C)
    num_row_programs = min(triton.cdiv(N, BLOCK_ROWS), max_partial_sum_programs(x.device))
    dx = torch.empty((N, C), dtype=x.dtype, device=x.device)
    dbias_partial = torch.empty((num_row_programs, C), dtype=torch.float32, device=x.device)
    if num_row_programs > 0:
        with device_of(x):
            _bias_gelu_bwd_kernel[(num_row_programs, triton.cdiv(C, BLOCK_C))](
                dy, x, bias, dx, dbias_partial, dy.stride(0), x.stride(0), N, C,
                BLOCK_ROWS=BLOCK_ROWS, BLOCK_C=BLOCK_C, num_warps=num_warps)
    return dx, dbias_partial.sum(0)  # (C,); a 0-program sum gives zeros


# torch.compile sees the kernels through two custom ops with fakes (no graph break, no tracing into Triton).
# torch.library.triton_op + wrap_triton would let Inductor see the kernels themselves, but under TRITON_INTERPRET=1
# (the CPU tests) wrap_triton does not recognise the interpreter's kernels and torch.compile runs them on fake tensors,
# so the ops are opaque custom_ops.


@torch.library.custom_op("vilbert_kernels::bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x: (..., C). Returns y (..., C) in x's dtype."""
    return _launch_bias_gelu_fwd(as_rows(x, x.shape[-1]), bias).view(x.shape)


@bias_gelu_fwd.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("vilbert_kernels::bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x: (..., C). Returns dx (..., C) in x's dtype, dbias (C,) fp32."""
    C = x.shape[-1]
    dx, dbias = _launch_bias_gelu_bwd(as_rows(dy, C), as_rows(x, C), bias)
    return dx.view(x.shape), dbias


@bias_gelu_bwd.register_fake
def _(dy, x, bias):
    return x.new_empty(x.shape), x.new_empty((x.shape[-1],), dtype=torch.float32)


def _bias_gelu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # x, bias: u is recomputed


def _bias_gelu_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = bias_gelu_bwd(dy, x, bias)
    return dx, dbias.to(bias.dtype)


bias_gelu_fwd.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup_context)


def _autocast(x):
    """Under torch.autocast, x in the autocast dtype (bias stays as it is)."""
    if (isinstance(x, torch.Tensor) and x.dtype in SUPPORTED_DTYPES and x.device.type != "meta"
            and torch.is_autocast_enabled(x.device.type)):  # (meta tensors have no autocast)
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return x


def _validate(x, bias):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"bias_gelu: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"bias_gelu: x has dtype {x.dtype}; expected one of {SUPPORTED_DTYPES}")
    if x.dim() == 0 or x.shape[-1] < 1:
        raise ValueError(f"bias_gelu: x has shape {tuple(x.shape)}; expected (..., C) with C >= 1")
    check_device(x, "bias_gelu: x")
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias_gelu: bias must be a torch.Tensor, got {type(bias).__name__}")
    if tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias_gelu: bias has shape {tuple(bias.shape)}; expected ({x.shape[-1]},) to match x's "
                         "last dim")
    if bias.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"bias_gelu: bias has dtype {bias.dtype}; expected one of {SUPPORTED_DTYPES}")
    if bias.device != x.device:
        raise ValueError(f"bias_gelu: bias is on {bias.device} but x is on {x.device}")


def bias_gelu(x, bias):
    """Exact (erf) GELU of x + bias, fused into one kernel (and one for the backward).

    Args:
        x: (..., C) fp32 / fp16 / bf16, any C >= 1; rows may be strided (unit stride along C), else copied.
        bias: (C,) fp32 / fp16 / bf16, on x's device, any stride; used in fp32.

    Returns:
        y: (..., C) in x's dtype (the autocast dtype under torch.autocast), computed in fp32.
    Differentiable in x and bias.
    """
    x = _autocast(x)
    _validate(x, bias)
    return bias_gelu_fwd(x, bias.contiguous())  # the kernels read bias as a dense (C,) vector


def sm90_specs():
    """The launch configurations `bias_gelu` uses at C = 768, 1024, 3072 and 8192 (one tile for all), per dtype
    (bias in x's dtype; another bias dtype changes only one load)."""
    specs = []
    pointer = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
    for BLOCK_C, BLOCK_ROWS, num_warps in sorted({_launch_config(C) for C in (768, 1024, 3072, 8192)}):
        constexprs = {"BLOCK_ROWS": BLOCK_ROWS, "BLOCK_C": BLOCK_C}
        for dtype in SUPPORTED_DTYPES:
            t = pointer[dtype]
            tag = f"{t[1:]},BLOCK_C={BLOCK_C},BLOCK_ROWS={BLOCK_ROWS}"
            specs.append(KernelSpec(
                name=f"bias_gelu_fwd[{tag}]", fn=_bias_gelu_fwd_kernel,
                signature={"X": t, "BIAS": t, "Y": t, "stride_x_row": "i32", "N": "i32", "C": "i32",
                           "BLOCK_ROWS": "constexpr", "BLOCK_C": "constexpr"},
                constexprs=constexprs, num_warps=num_warps))
            specs.append(KernelSpec(
                name=f"bias_gelu_bwd[{tag}]", fn=_bias_gelu_bwd_kernel,
                signature={"DY": t, "X": t, "BIAS": t, "DX": t, "DBIAS_PARTIAL": "*fp32", "stride_dy_row": "i32",
                           "stride_x_row": "i32", "N": "i32", "C": "i32",
                           "BLOCK_ROWS": "constexpr", "BLOCK_C": "constexpr"},
                constexprs=constexprs, num_warps=num_warps))
    return specs
