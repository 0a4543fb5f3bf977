"""vilbert.ops: the "sdpa" backend equals a float64 spec (padding, empty key sets, gradients) and the reference ops; the
switch rejects unknown names. (The "triton" backend's kernels are tested in test_attention.py and friends.)"""
import pytest
import torch

from vilbert import ops
from vilbert_kernels import reference


def test_get_backends():
    assert ops.get("torch") is reference
    assert ops.get("sdpa").attention is not reference.attention
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.get("cuda")


def sliced_attention(q, k, v, q_lens, kv_lens, softmax_scale):
    """The float64 spec, one sample at a time on its real slices: no masks at all."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        nq = q.shape[1] if q_lens is None else int(q_lens[b])
        nk = k.shape[1] if kv_lens is None else int(kv_lens[b])
        if nk == 0:
            continue
        qb, kb, vb = q[b, :nq].transpose(0, 1), k[b, :nk].transpose(0, 1), v[b, :nk].transpose(0, 1)  # (H, L, D)
        probs = torch.softmax(qb @ kb.transpose(-1, -2) * softmax_scale, dim=-1)  # (H, nq, nk)
        out[b, :nq] = (probs @ vb).transpose(0, 1)  # (nq, H, D)
    return out


@pytest.mark.parametrize("q_lens, kv_lens", [(None, None), ([5, 1, 3], [7, 0, 2]), (None, [0, 7, 4]),
                                             ([2, 5, 5], None)])
def test_sdpa_attention_equals_float64_spec(q_lens, kv_lens):
    torch.manual_seed(0)
    B, Lq, Lk, H, D = 3, 5, 7, 2, 16
    q, k, v = (torch.randn(B, L, H, D, dtype=torch.float64, requires_grad=True) for L in (Lq, Lk, Lk))
    q_lens = None if q_lens is None else torch.tensor(q_lens)
    kv_lens = None if kv_lens is None else torch.tensor(kv_lens)
    grad = torch.randn(B, Lq, H, D, dtype=torch.float64)
    results = []
    for attention in (sliced_attention, ops.get("sdpa").attention):
        out = attention(q, k, v, q_lens, kv_lens, softmax_scale=0.3)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected)  # also: finite where a sample has no keys


def test_sdpa_co_attention_and_fused_ops_equal_reference():
    torch.manual_seed(1)
    t = [torch.randn(2, 4, 2, 8, dtype=torch.float64) for _ in range(3)]
    i = [torch.randn(2, 6, 2, 8, dtype=torch.float64) for _ in range(3)]
    lens = dict(text_lens=torch.tensor([4, 2]), image_lens=torch.tensor([3, 6]))
    for actual, expected in zip(ops.get("sdpa").co_attention(*t, *i, **lens), reference.co_attention(*t, *i, **lens)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    x, residual = torch.randn(2, 3, 10, dtype=torch.float64), torch.randn(2, 3, 10, dtype=torch.float64)
    weight, bias = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    torch.testing.assert_close(ops.get("sdpa").layer_norm(x, weight, bias, 1e-12, residual),
                               reference.layer_norm(x, weight, bias, 1e-12, residual), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ops.get("sdpa").bias_gelu(x, bias), reference.bias_gelu(x, bias))


@pytest.mark.parametrize("backend", ["torch", "sdpa", "triton"])
def test_layer_norm_drops_x_not_the_residual(backend):
    """layer_norm(x, weight, bias, eps, residual, p) = LayerNorm(dropout(x) + residual): with x = 0 the residual passes
    whole, whatever the mask."""
    torch.manual_seed(2)
    residual, weight, bias = torch.randn(4, 32), torch.randn(32), torch.randn(32)
    out = ops.get(backend).layer_norm(torch.zeros(4, 32), weight, bias, 1e-12, residual, dropout_p=0.5)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(residual, (32,), weight, bias, 1e-12))
