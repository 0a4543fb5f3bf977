"""vilbert_kernels.layer_norm: LayerNorm(dropout(x) + residual) against float64 references, forward and every gradient.

On the CPU the kernels run in Triton's interpreter (fp32 mostly; the fp16/bf16 checks at fewer rows than on a GPU).
Tolerances are relative to PyTorch's own error doing the same maths in the same dtype (reference.layer_norm), plus a
small floor.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torch._dynamo.testing import CompileCounterWithBackend

from vilbert_kernels import bias_gelu, layer_norm, reference
from vilbert_kernels.launch import as_rows, draw_seed
from vilbert_kernels.layer_norm import _dropout_keep_mask, layer_norm_bwd, layer_norm_fwd

from numerics import assert_close, philox_keep_reference

GRAD_NAMES = ("dx", "dweight", "dbias", "dresidual")


def reference_f64(x, weight, bias, eps=1e-12, residual=None, keep=None, dropout_p=0.0):
    """reference.layer_norm's maths with a given dropout keep mask, in x's dtype (reference.layer_norm itself always
    normalises in fp32, so it cannot be the float64 reference)."""
    z = x if keep is None else x * keep / (1.0 - dropout_p)
    if residual is not None:
        z = z + residual
    return F.layer_norm(z, (z.shape[-1],), weight, bias, eps)


def run(op, dtype, x, weight, bias, residual, dy, **kwargs):
    """op on fresh leaf copies in dtype, then backward with dy; returns [y, dx, dweight, dbias(, dresidual)]."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, weight, bias)]
    if residual is not None:
        leaves.append(residual.detach().to(dtype).requires_grad_())
    y = op(*leaves[:3], residual=leaves[3] if residual is not None else None, **kwargs)
    y.backward(dy.to(dtype))
    return [y.detach()] + [t.grad for t in leaves]


def peek_op_seed(dropout_p):
    """The Philox seed the next layer_norm call with dropout_p will draw, leaving the generator untouched."""
    state = torch.get_rng_state()
    op_seed = draw_seed(dropout_p)
    torch.set_rng_state(state)
    return op_seed


def check_against_references(x, weight, bias, residual, dy, dropout_p, eps=1e-12, dtype=torch.float32):
    """The kernel in dtype against float64 (same dropout mask) with PyTorch-in-dtype as the error baseline."""
    rows, C = x.reshape(-1, x.shape[-1]).shape
    keep = None
    if dropout_p > 0.0:
        keep = _dropout_keep_mask(rows, C, dropout_p, peek_op_seed(dropout_p), x.device).reshape(x.shape)
    got = run(layer_norm, dtype, x, weight, bias, residual, dy, eps=eps, dropout_p=dropout_p)
    expected = run(reference_f64, torch.float64, x, weight, bias, residual, dy, eps=eps, keep=keep,
                   dropout_p=dropout_p)

    def baseline_op(x, weight, bias, residual=None, eps=1e-12):
        return reference.layer_norm(x if keep is None else x * keep / (1.0 - dropout_p), weight, bias, eps, residual)

    baseline = run(baseline_op, dtype, x, weight, bias, residual, dy, eps=eps)
    floor = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps / 4  # below 1/2 unit of rounding in dtype
    for name, g, e, b in zip(("y",) + GRAD_NAMES, got, expected, baseline):
        assert g.dtype == dtype, f"{name} has dtype {g.dtype}, expected {dtype}"
        assert_close(name, g, e, b, factor=2 if name == "y" else 3, floor=floor)


@pytest.mark.parametrize("fusion", ["plain", "residual", "residual+dropout"])
@pytest.mark.parametrize("C", [1, 7, 33, 768, 1000, 1024])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_matches_float64_reference(rows, C, fusion, seed, device, poison_empty):
    x, dy = torch.randn(rows, C, device=device), torch.randn(rows, C, device=device)
    weight, bias = torch.randn(C, device=device), torch.randn(C, device=device)
    residual = torch.randn(rows, C, device=device) if "residual" in fusion else None
    check_against_references(x, weight, bias, residual, dy, dropout_p=0.25 if "dropout" in fusion else 0.0)


def test_many_row_blocks(seed, device, poison_empty):
    """More row blocks than backward programs: each program sums dweight / dbias over several blocks."""
    x, residual, dy = (torch.randn(300, 33, device=device) for _ in range(3))
    weight, bias = torch.randn(33, device=device), torch.randn(33, device=device)
    check_against_references(x, weight, bias, residual, dy, dropout_p=0.25)


@pytest.mark.parametrize("fusion", ["plain", "residual+dropout"])
@pytest.mark.parametrize("C", [4097, 8192])
def test_widest_rows(C, fusion, seed, device, poison_empty):
    """Rows wider than 4096, which the backward walks in tiles, adding dweight / dbias into partial-sum buffers it
    does not zero: 6 rows, so some of the interpreter's 4 programs take two row blocks."""
    x, residual, dy = (torch.randn(6, C, device=device) for _ in range(3))
    weight, bias = torch.randn(C, device=device), torch.randn(C, device=device)
    check_against_references(x, weight, bias, residual if "residual" in fusion else None, dy,
                             dropout_p=0.1 if "dropout" in fusion else 0.0, eps=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("C", [3072, 5000, 8192])
def test_wide_rows_many(C, seed, device):
    x, residual, dy = (torch.randn(33, C, device=device) for _ in range(3))
    weight, bias = torch.randn(C, device=device), torch.randn(C, device=device)
    check_against_references(x, weight, bias, residual, dy, dropout_p=0.1)


def test_strided_and_batched_inputs(seed, device, poison_empty):
    C = 40
    # (2, 5, C) views with row stride C + 8: the kernels read them in place.
    x = torch.randn(2, 5, C + 8, device=device)[..., :C]
    residual = torch.randn(2, 5, C + 3, device=device)[..., 3:]
    dy = torch.randn(2, 5, C + 1, device=device)[..., 1:]
    assert as_rows(x, C).data_ptr() == x.data_ptr()
    weight, bias = torch.randn(C, device=device), torch.randn(C, device=device)
    check_against_references(x, weight, bias, residual, dy, dropout_p=0.2)
    # A column stride other than 1 is copied first.
    x_t = torch.randn(C, 6, device=device).t()  # (6, C), column stride 6
    check_against_references(x_t, weight, bias, None, torch.randn(6, C, device=device), dropout_p=0.0)
    # Strided and expanded (stride-0) weight and bias.
    weight_t, bias_t = torch.randn(C, 2, device=device).unbind(1)  # (C,) each, stride 2
    check_against_references(x, weight_t, bias_t, residual, dy, dropout_p=0.2)
    check_against_references(x, torch.randn(1, device=device).expand(C), torch.randn(1, device=device).expand(C),
                             residual, dy, dropout_p=0.0)


@pytest.mark.parametrize("C", [768, 769, 3072])
@pytest.mark.parametrize("value", [0.1, 100.3, -7000.7])
def test_constant_rows_give_the_bias(value, C, device):
    """Rows with zero variance normalise to 0, so y is the bias exactly (as PyTorch's), at BERT's eps = 1e-12: a mean off
    by a rounding error would be scaled up by rstd = 1e6."""
    x = torch.full((3, C), value, device=device)
    weight, bias = torch.randn(C, device=device), torch.randn(C, device=device)
    torch.testing.assert_close(layer_norm(x, weight, bias), bias.expand(3, C), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)])
def test_no_rows(shape, device):
    x = torch.randn(shape, device=device, requires_grad=True)
    weight = torch.randn(16, device=device, requires_grad=True)
    bias = torch.randn(16, device=device, requires_grad=True)
    y = layer_norm(x, weight, bias, residual=torch.zeros_like(x), dropout_p=0.5)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(weight.grad, torch.zeros(16, device=device))
    assert torch.equal(bias.grad, torch.zeros(16, device=device))


def test_dropout_reproducible_under_manual_seed_and_fresh_per_call(device):
    x, residual, dy = (torch.randn(5, 64, device=device) for _ in range(3))
    weight, bias = torch.randn(64, device=device), torch.randn(64, device=device)
    torch.manual_seed(1)
    first = run(layer_norm, torch.float32, x, weight, bias, residual, dy, dropout_p=0.3)
    torch.manual_seed(1)
    again = run(layer_norm, torch.float32, x, weight, bias, residual, dy, dropout_p=0.3)
    other = run(layer_norm, torch.float32, x, weight, bias, residual, dy, dropout_p=0.3)
    for name, a, b in zip(("y",) + GRAD_NAMES, first, again):
        assert torch.equal(a, b), f"{name} differs under the same torch.manual_seed"
    assert not torch.equal(first[0], other[0]), "two calls drew the same dropout mask"


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(dropout_p, seed, device):
    rows, C = 16, 1000
    keep = _dropout_keep_mask(rows, C, dropout_p, draw_seed(dropout_p), device)
    n = rows * C
    sigma = (dropout_p * (1 - dropout_p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - dropout_p)) < 5 * sigma
    # Neither rows nor columns repeat the same mask (compared over enough elements that a chance match is ~0).
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, :500], keep[:, 500:])
    # Neighbours within and across the 4-column groups that share a Philox call agree as independent draws do.
    independent = dropout_p ** 2 + (1 - dropout_p) ** 2
    for shift in (1, 2, 3, 4):
        agree = (keep[:, shift:] == keep[:, :-shift]).float().mean().item()
        assert abs(agree - independent) < 0.03, (shift, agree, independent)


@pytest.mark.parametrize("C", [5, 37])
def test_dropout_rows_draw_their_own_numbers(C, seed, device):
    """Each element has a Philox output of its own, also where rows meet when C is not a multiple of 4 (each row's
    counters start at a multiple of ceil(C / 4)): a row's last column and the next row's first agree as independent
    draws do."""
    rows, dropout_p = 2048, 0.5
    keep = _dropout_keep_mask(rows, C, dropout_p, draw_seed(dropout_p), device)
    agree = (keep[:-1, -1] == keep[1:, 0]).float().mean().item()
    assert abs(agree - 0.5) < 0.06, agree  # 5 standard deviations of 2047 fair coins' agreement rate


def test_dropout_mask_is_the_documented_philox_draw(device):
    """Element (row, col) keeps iff output col % 4 of Philox at the 64-bit counter row * ceil(C / 4) + col // 4 (low
    and high 32 bits as the counter's first two words) is >= p: recomputed with numpy."""
    rows, C, dropout_p = 7, 37, 0.3
    seed = draw_seed(dropout_p)
    keep = _dropout_keep_mask(rows, C, dropout_p, seed, device)
    groups = (C + 3) // 4
    counter = np.arange(rows, dtype=np.int64)[:, None] * groups + np.arange(groups)[None, :]
    expected = philox_keep_reference(int(seed), (counter & 0xFFFFFFFF).astype(np.uint32),
                                     (counter >> 32).astype(np.uint32), dropout_p)
    assert np.array_equal(keep.cpu().numpy(), expected.reshape(rows, groups * 4)[:, :C])


def test_finite_difference_with_fixed_seed(seed, device):
    """Directional derivative of sum(g * y) along a random direction, with the dropout mask held fixed by the seed."""
    rows, C, dropout_p = 3, 33, 0.3
    x, weight, bias, residual = (torch.randn(shape, device=device) for shape in ((rows, C), (C,), (C,), (rows, C)))
    g = torch.randn(rows, C, device=device)
    inputs = [t.requires_grad_() for t in (x, weight, bias, residual)]
    direction = [torch.randn_like(t) for t in inputs]

    def loss(x, weight, bias, residual):
        torch.manual_seed(seed)
        return (g * layer_norm(x, weight, bias, 1e-5, residual, dropout_p)).sum()

    loss(*inputs).backward()
    analytic = sum((t.grad * v).sum() for t, v in zip(inputs, direction)).item()
    h = 1e-2
    with torch.no_grad():
        plus = loss(*(t + h * v for t, v in zip(inputs, direction))).item()
        minus = loss(*(t - h * v for t, v in zip(inputs, direction))).item()
    numeric = (plus - minus) / (2 * h)
    assert abs(numeric - analytic) <= 1e-2 * (1 + abs(analytic)), (numeric, analytic)


def test_autocast_runs_in_autocast_dtype(seed, device):
    low = torch.bfloat16 if device.type == "cpu" else torch.float16
    # As in a model under autocast: x from a GEMM in the low dtype, an fp32 residual stream, fp32 parameters.
    x = torch.randn(4, 48, device=device).to(low).requires_grad_()
    residual = torch.randn(4, 48, device=device).requires_grad_()
    weight, bias = torch.randn(48, device=device), torch.randn(48, device=device)
    with torch.autocast(device.type, dtype=low):
        y = layer_norm(x, weight, bias, residual=residual)
    assert y.dtype == low
    y.float().sum().backward()
    assert x.grad.dtype == low and residual.grad.dtype == torch.float32
    expected = reference_f64(x.detach().double(), weight.double(), bias.double(), residual=residual.detach().double())
    assert (y.double() - expected).abs().max() < 0.1  # a few units of bf16 / fp16 rounding at |y| ~ 3


@pytest.mark.parametrize("fusion", ["plain", "residual+dropout"])
def test_opcheck(fusion, seed, device):
    """The custom ops' registration: schema and mutation info, fakes (every output's shape, dtype and strides, the
    statistics included), autograd registration and AOT dispatch with dynamic shapes, on a strided x."""
    C, dropout_p = 24, 0.3 if "dropout" in fusion else 0.0
    x = torch.randn(2, 3, C + 5, device=device)[..., :C].requires_grad_()  # row stride C + 5
    weight, bias = (torch.randn(C, device=device, requires_grad=True) for _ in range(2))
    residual = torch.randn(2, 3, C, device=device, requires_grad=True) if "residual" in fusion else None
    op_seed = draw_seed(dropout_p)
    torch.library.opcheck(layer_norm_fwd, (x, weight, bias, 1e-5, residual, dropout_p, op_seed))

    with torch.no_grad():
        y, z, mean, rstd = layer_norm_fwd(x, weight, bias, 1e-5, residual, dropout_p, op_seed)
    saved = z if residual is not None else x.detach()  # what setup_context saves
    # The backward op has no autograd formula (no double backward): its inputs do not require grad, so
    # test_autograd_registration has nothing to check.
    torch.library.opcheck(layer_norm_bwd, (torch.randn(2, 3, C, device=device), saved, weight.detach(), mean, rstd,
                                           residual is not None, dropout_p, op_seed),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compiles_without_graph_breaks(seed, device):
    """A BERT output block then an FFN activation, compiled as one graph (fullgraph=True): the same output and
    gradients as eager under the same torch.manual_seed, so the seed travels from forward to backward in the graph."""
    C = 32
    x, residual = (torch.randn(2, 5, C, device=device, requires_grad=True) for _ in range(2))
    weight, bias, ffn_bias = (torch.randn(C, device=device, requires_grad=True) for _ in range(3))
    dy = torch.randn(2, 5, C, device=device)

    def block(x, weight, bias, residual, ffn_bias):
        return bias_gelu(layer_norm(x, weight, bias, 1e-12, residual, 0.25), ffn_bias)

    def run_block(fn):
        torch.manual_seed(seed)
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, residual, ffn_bias)]
        y = fn(*leaves)
        y.backward(dy)
        return [y.detach()] + [t.grad for t in leaves]

    backend = CompileCounterWithBackend("aot_eager")
    compiled = run_block(torch.compile(block, fullgraph=True, backend=backend))
    eager = run_block(block)
    assert backend.frame_count == 1
    targets = {node.target for graph in backend.graphs for node in graph.graph.nodes}
    ops = torch.ops.vilbert_kernels
    assert {ops.layer_norm_fwd.default, ops.bias_gelu_fwd.default} <= targets
    for name, c, e in zip(("y", "dx", "dweight", "dbias", "dresidual", "dffn_bias"), compiled, eager):
        assert torch.equal(c, e), f"{name}: compiled differs from eager"
    # Forward and backward used the mask of the seed the forward drew (equal to eager alone cannot show it).
    torch.manual_seed(seed)
    keep = _dropout_keep_mask(10, C, 0.25, draw_seed(0.25), device).reshape(x.shape)
    with torch.no_grad():
        expected = reference.bias_gelu(reference_f64(x.double(), weight.double(), bias.double(), 1e-12,
                                                     residual.double(), keep, 0.25), ffn_bias.double())
    assert (compiled[0].double() - expected).abs().max() < 1e-4
    assert torch.equal(compiled[1] != 0, keep)


BAD_INPUTS = [
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.ones(2, 8, dtype=torch.float64)), TypeError, "x has dtype torch.float64"),
    (dict(x=torch.ones(2, 8, dtype=torch.int32)), TypeError, "x has dtype torch.int32"),
    (dict(x=torch.tensor(1.0)), ValueError, r"x has shape \(\)"),
    (dict(x=torch.ones(1, 8193), weight=torch.ones(8193), bias=torch.ones(8193)), ValueError, "C <= 8192"),
    (dict(weight=torch.ones(9)), ValueError, r"weight has shape \(9,\); expected \(8,\)"),
    (dict(bias=torch.ones(1, 8)), ValueError, r"bias has shape \(1, 8\)"),
    (dict(weight=torch.ones(8, dtype=torch.float64)), TypeError, "weight has dtype torch.float64"),
    (dict(bias=torch.ones(8, device="meta")), ValueError, "bias is on meta"),
    (dict(weight=[1.0] * 8), TypeError, "weight must be a torch.Tensor"),
    (dict(residual=[[0.0] * 8] * 2), TypeError, "residual must be a torch.Tensor or None"),
    (dict(residual=torch.ones(2, 8, device="meta")), ValueError, "residual is on meta"),
    (dict(residual=torch.ones(2, 7)), ValueError, r"residual has shape \(2, 7\)"),
    (dict(residual=torch.ones(2, 8, dtype=torch.float16)), TypeError, "residual has dtype torch.float16"),
    (dict(dropout_p=1.0), ValueError, "dropout_p is 1.0"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p is -0.1"),
    (dict(dropout_p=True), ValueError, "dropout_p is True"),
    (dict(eps=-1e-5), ValueError, "eps is -1e-05"),
]


@pytest.mark.parametrize("bad, error, message", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(bad, error, message):
    args = dict(x=torch.ones(2, 8), weight=torch.ones(8), bias=torch.zeros(8), eps=1e-12, residual=None,
                dropout_p=0.0)
    args.update(bad)
    with pytest.raises(error, match=message):
        layer_norm(**args)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="need a CUDA device"):
        layer_norm(torch.ones(2, 8), torch.ones(8), torch.zeros(8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C", [768, 1000, 1024, 3072, 8192])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_half_precision(dtype, C, dropout_p, seed, device):
    rows = (4, 37) if device.type == "cuda" else (2, 7)  # the interpreter handles fp16/bf16 loads, stores and maths
    x, residual, dy = (torch.randn(*rows, C, device=device) for _ in range(3))
    weight, bias = 1 + 0.1 * torch.randn(C, device=device), 0.1 * torch.randn(C, device=device)
    # Round the inputs to dtype first, so every path sees the same values.
    x, residual, dy, weight, bias = (t.to(dtype).float() for t in (x, residual, dy, weight, bias))
    check_against_references(x, weight, bias, residual, dy, dropout_p, dtype=dtype)


@pytest.mark.gpu
def test_backward_is_deterministic_on_gpu(seed, device):
    x, residual, dy = (torch.randn(512, 1024, device=device) for _ in range(3))
    weight, bias = torch.randn(1024, device=device), torch.randn(1024, device=device)
    torch.manual_seed(seed)
    first = run(layer_norm, torch.float32, x, weight, bias, residual, dy, dropout_p=0.1)
    torch.manual_seed(seed)
    again = run(layer_norm, torch.float32, x, weight, bias, residual, dy, dropout_p=0.1)
    for name, a, b in zip(("y",) + GRAD_NAMES, first, again):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
