"""vilbert_kernels.bias_gelu: exact GELU(x + bias) against float64 references, forward and both gradients.

On the CPU the kernels run in Triton's interpreter (fp32 mostly; the fp16/bf16 checks at fewer rows than on a GPU).
Tolerances are relative to PyTorch's own error doing the same maths in the same dtype (reference.bias_gelu), plus a
small floor.
"""

import pytest
import torch

from torch._dynamo.testing import CompileCounterWithBackend

from vilbert_kernels import bias_gelu, reference
from vilbert_kernels.bias_gelu import bias_gelu_bwd, bias_gelu_fwd
from vilbert_kernels.launch import as_rows

from numerics import assert_close

NAMES = ("y", "dx", "dbias")


def run(op, dtype, x, bias, dy, bias_dtype=None):
    """op on fresh leaf copies (x in dtype, bias in bias_dtype or dtype), backward with dy; returns [y, dx, dbias]."""
    x = x.detach().to(dtype).requires_grad_()
    bias = bias.detach().to(bias_dtype or dtype).requires_grad_()
    y = op(x, bias)
    y.backward(dy.to(y.dtype))
    return [y.detach(), x.grad, bias.grad]


def check_against_references(x, bias, dy, dtype=torch.float32):
    """The kernel in dtype against float64, with PyTorch-in-dtype as the error baseline."""
    got = run(bias_gelu, dtype, x, bias, dy)
    expected = run(reference.bias_gelu, torch.float64, x, bias, dy)
    baseline = run(reference.bias_gelu, dtype, x, bias, dy)
    floor = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps / 4  # below 1/2 unit of rounding in dtype
    for name, g, e, b in zip(NAMES, got, expected, baseline):
        assert g.dtype == dtype, f"{name} has dtype {g.dtype}, expected {dtype}"
        assert_close(name, g, e, b, factor=2 if name == "y" else 3, floor=floor)


@pytest.mark.parametrize("C", [1, 7, 33, 768, 1000, 1024, 1025, 3072])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_matches_float64_reference(rows, C, seed, device, poison_empty):
    # Scale 3: u = x + bias spans GELU's curved region and both tails.
    x, dy = 3 * torch.randn(rows, C, device=device), torch.randn(rows, C, device=device)
    check_against_references(x, torch.randn(C, device=device), dy)


def test_many_row_blocks(seed, device, poison_empty):
    """More row blocks than backward programs: each program sums dbias over several blocks."""
    x, dy = 3 * torch.randn(300, 33, device=device), torch.randn(300, 33, device=device)
    check_against_references(x, torch.randn(33, device=device), dy)


def test_strided_and_batched_inputs(seed, device, poison_empty):
    C = 40
    # (2, 5, C) views with row stride C + 8: the kernels read them in place.
    x = 3 * torch.randn(2, 5, C + 8, device=device)[..., :C]
    dy = torch.randn(2, 5, C + 1, device=device)[..., 1:]
    assert as_rows(x, C).data_ptr() == x.data_ptr()
    check_against_references(x, torch.randn(C, device=device), dy)
    # A column stride other than 1 is copied first.
    x_t = torch.randn(C, 6, device=device).t()  # (6, C), column stride 6
    check_against_references(x_t, torch.randn(C, device=device), torch.randn(6, C, device=device))
    # A strided and an expanded (stride-0) bias.
    check_against_references(x, torch.randn(C, 2, device=device)[:, 0], dy)
    check_against_references(x, torch.randn(1, device=device).expand(C), dy)


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)])
def test_no_rows(shape, device):
    x = torch.randn(shape, device=device, requires_grad=True)
    bias = torch.randn(16, device=device, requires_grad=True)
    y = bias_gelu(x, bias)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(bias.grad, torch.zeros(16, device=device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_x_with_fp32_bias(dtype, seed, device):
    """The output keeps x's dtype (PyTorch's x + bias would promote to fp32); dbias comes back in fp32."""
    x, dy = 3 * torch.randn(5, 64, device=device), torch.randn(5, 64, device=device)
    bias = torch.randn(64, device=device)
    x = x.to(dtype).float()  # exactly representable in dtype
    y, dx, dbias = run(bias_gelu, dtype, x, bias, dy, bias_dtype=torch.float32)
    expected = run(reference.bias_gelu, torch.float64, x, bias, dy.to(dtype))
    assert (y.dtype, dx.dtype, dbias.dtype) == (dtype, dtype, torch.float32)
    rounding = torch.finfo(dtype).eps
    for name, g, e in zip(NAMES, (y, dx, dbias), expected):
        scale = e.abs().max().item() + 1
        assert (g.double() - e).abs().max() <= 2 * rounding * scale * (5 if name == "dbias" else 1), name


def test_autocast_runs_in_autocast_dtype(seed, device):
    low = torch.bfloat16 if device.type == "cpu" else torch.float16
    x = (3 * torch.randn(4, 48, device=device)).requires_grad_()
    bias = torch.randn(48, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=low):
        y = bias_gelu(x, bias)
    assert y.dtype == low
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    expected = reference.bias_gelu(x.detach().double(), bias.detach().double())
    assert (y.double() - expected).abs().max() <= 4 * torch.finfo(low).eps * (1 + expected.abs().max())


def test_opcheck(seed, device):
    """The custom ops' registration: schema and mutation info, fakes (shape, dtype and strides of every output),
    autograd registration and AOT dispatch with dynamic shapes, on a strided x."""
    C = 24
    x = (3 * torch.randn(2, 3, C + 5, device=device))[..., :C].requires_grad_()  # row stride C + 5
    bias = torch.randn(C, device=device, requires_grad=True)
    torch.library.opcheck(bias_gelu_fwd, (x, bias))
    # The backward op has no autograd formula (no double backward): its inputs do not require grad, so
    # test_autograd_registration has nothing to check.
    torch.library.opcheck(bias_gelu_bwd, (torch.randn(2, 3, C, device=device), x.detach(), bias.detach()),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compiles_without_graph_breaks(seed, device):
    """bias_gelu compiled as one graph (fullgraph=True) gives eager's output and gradients."""
    x, dy = 3 * torch.randn(2, 5, 32, device=device), torch.randn(2, 5, 32, device=device)
    bias = torch.randn(32, device=device)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = run(torch.compile(bias_gelu, fullgraph=True, backend=backend), torch.float32, x, bias, dy)
    eager = run(bias_gelu, torch.float32, x, bias, dy)
    assert backend.frame_count == 1
    targets = {node.target for graph in backend.graphs for node in graph.graph.nodes}
    assert torch.ops.vilbert_kernels.bias_gelu_fwd.default in targets
    for name, c, e in zip(NAMES, compiled, eager):
        assert torch.equal(c, e), f"{name}: compiled differs from eager"


BAD_INPUTS = [
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.ones(2, 8, dtype=torch.float64)), TypeError, "x has dtype torch.float64"),
    (dict(x=torch.ones(2, 8, dtype=torch.int64)), TypeError, "x has dtype torch.int64"),
    (dict(x=torch.tensor(1.0)), ValueError, r"x has shape \(\)"),
    (dict(x=torch.ones(2, 0), bias=torch.ones(0)), ValueError, r"x has shape \(2, 0\)"),
    (dict(bias=[0.0] * 8), TypeError, "bias must be a torch.Tensor"),
    (dict(bias=torch.ones(9)), ValueError, r"bias has shape \(9,\); expected \(8,\)"),
    (dict(bias=torch.ones(8, dtype=torch.float64)), TypeError, "bias has dtype torch.float64"),
    (dict(bias=torch.ones(8, device="meta")), ValueError, "bias is on meta"),
]


@pytest.mark.parametrize("bad, error, message", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(bad, error, message):
    args = dict(x=torch.ones(2, 8), bias=torch.zeros(8))
    args.update(bad)
    with pytest.raises(error, match=message):
        bias_gelu(**args)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="need a CUDA device"):
        bias_gelu(torch.ones(2, 8), torch.zeros(8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C", [768, 1000, 3072, 4096])
def test_half_precision(dtype, C, seed, device):
    rows = (4, 37) if device.type == "cuda" else (2, 7)  # the interpreter handles fp16/bf16 loads, stores and maths
    # Inputs rounded to dtype first, so every path sees the same values.
    x, bias, dy = (t.to(dtype).float() for t in (3 * torch.randn(*rows, C, device=device),
                                                 torch.randn(C, device=device), torch.randn(*rows, C, device=device)))
    check_against_references(x, bias, dy, dtype=dtype)


@pytest.mark.gpu
def test_backward_is_deterministic_on_gpu(seed, device):
    x, dy = torch.randn(4096, 3072, device=device), torch.randn(4096, 3072, device=device)
    bias = torch.randn(3072, device=device)
    first, again = run(bias_gelu, torch.float32, x, bias, dy), run(bias_gelu, torch.float32, x, bias, dy)
    for name, a, b in zip(NAMES, first, again):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
