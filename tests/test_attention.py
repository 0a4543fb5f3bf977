"""Tests of `vilbert_kernels.attention` and `co_attention` against the float64 reference in `kernels/reference.py`.

On the CPU the kernels run in Triton's interpreter, mostly in fp32 and at small shapes; the low-precision tests run fp16
there too, bf16 on a GPU only (see LOW_PRECISION). Every buffer the kernels write starts as NaN (`poisoned_empty`), so a
row the kernel forgets to write shows up. Seeds come from the `seed` fixture (fresh each run, printed on failure).
"""
import contextlib
import sys

import numpy as np
import pytest
import torch

import vilbert_kernels
from vilbert_kernels import attention, co_attention, reference
from vilbert_kernels.launch import draw_seed

from numerics import philox_keep_reference, poisoned_empty

# The module (the package attribute `attention` is the function).
attention_impl = sys.modules["vilbert_kernels.attention"]


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------

def lens_tensor(values, device):
    return None if values is None else torch.tensor(values, dtype=torch.int64, device=device)


def reference_attention(q, k, v, q_lens, kv_lens, dropout_p=0.0, softmax_scale=None):
    """reference.attention in the inputs' dtype. A sample with kv_lens 0 is zero by the spec; in float64,
    reference.py's masked softmax goes through float32 (finfo(float64).min -> -inf) and gives NaN there, so such
    samples get one fake key and are zeroed afterwards."""
    if kv_lens is None:
        return reference.attention(q, k, v, q_lens, None, dropout_p, softmax_scale)
    has_keys = (kv_lens > 0).to(q.dtype)[:, None, None, None]
    return reference.attention(q, k, v, q_lens, kv_lens.clamp(min=1), dropout_p, softmax_scale) * has_keys


def masked_reference(q, k, v, q_lens, kv_lens, keep, dropout_p, softmax_scale=None):
    """float64 attention with a given dropout keep mask (B, H, Lq, Lk): the spec of the dropped function."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale  # (B, H, Lq, Lk)
    kv_lens = torch.full((B,), Lk, device=q.device) if kv_lens is None else kv_lens
    key_valid = torch.arange(Lk, device=q.device)[None, :] < kv_lens[:, None]  # (B, Lk)
    scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0) * keep / (1.0 - dropout_p)
    out = torch.einsum("bhij,bjhd->bihd", probs, v)  # (B, Lq, H, D)
    if q_lens is not None:
        out = out * (torch.arange(Lq, device=q.device)[None, :] < q_lens[:, None])[:, :, None, None]
    return out


def dropout_keep_mask(device, batch, lq, lk, heads, dropout_p, seed, co=False):
    """The kernel's keep mask (B, H, Lq, Lk) for the call made right after torch.manual_seed(seed): run that call with
    q = k = 0 (uniform probabilities, all > 0) and v = one-hot key index, so out[b, i, h, j] != 0 iff (i, j) is kept.
    The mask depends on the seed, the shapes and the direction, not on the values or the head dim."""
    longest = max(lk, lq) if co else lk
    width = max(32, 1 << (longest - 1).bit_length())  # one-hot width: any head dim >= the keys works
    assert width <= 256, "head dims stop at 256"

    def one_hot(length):  # (B, L, H, width)
        eye = torch.eye(width, device=device)
        return eye[:length][None, :, None, :].expand(batch, length, heads, width).contiguous()

    torch.manual_seed(seed)
    if co:
        zeros_t = torch.zeros(batch, lq, heads, width, device=device)
        zeros_i = torch.zeros(batch, lk, heads, width, device=device)
        text_out, image_out = co_attention(zeros_t, zeros_t, one_hot(lq), zeros_i, zeros_i, one_hot(lk),
                                           dropout_p=dropout_p)
        return (text_out[..., :lk] != 0).permute(0, 2, 1, 3), (image_out[..., :lq] != 0).permute(0, 2, 1, 3)
    out = attention(torch.zeros(batch, lq, heads, width, device=device),
                    torch.zeros(batch, lk, heads, width, device=device), one_hot(lk), dropout_p=dropout_p)
    return (out[..., :lk] != 0).permute(0, 2, 1, 3)  # (B, H, Lq, Lk)


def assert_rel_close(actual, expected, rtol, name, floor=1e-2):
    """Max abs error relative to the largest reference magnitude (one number per tensor, reported on failure).
    The floor of the scale covers values that are zero only in exact arithmetic (dq, dk with a single key)."""
    assert not torch.isnan(actual).any(), f"{name}: NaN in the kernel output"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), floor)
    assert err <= rtol * scale, f"{name}: max abs error {err:.3e} > {rtol} * {scale:.3e}"


@contextlib.contextmanager
def fp32_matmul_precision(precision):
    """torch.set_float32_matmul_precision(precision) inside the block ("high": TF32 products for fp32 inputs)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.fixture(params=["ieee", "tf32", "half"], ids=["fp32-tiles", "tf32-tiles", "half-tiles"])
def tiles(request, device, monkeypatch):
    """The fp32 tests run with each launch configuration fp32 inputs can get: exact fp32's (the default) and TF32's
    (torch.set_float32_matmul_precision("high")), then with half precision's: the tiles of the fp16/bf16 training path.
    The interpreter's products are exact whatever the precision, so TF32's and half precision's tiles are checked there
    in fp32 against float64 (its bf16 products are unusable, see LOW_PRECISION). On a GPU those two passes are skipped:
    TF32's rounding has its own test (test_gpu_tf32_is_as_accurate_as_torchs), and the fp16/bf16 tests run half
    precision's tiles."""
    if request.param != "ieee" and device.type == "cuda":
        pytest.skip("on a GPU, test_gpu_tf32_is_as_accurate_as_torchs and the fp16/bf16 tests cover these tiles")
    if request.param == "half":
        config = attention_impl.attention_launch_config
        monkeypatch.setattr(attention_impl, "attention_launch_config",
                            lambda lq, lk, head_dim, precision, *rest: config(lq, lk, head_dim, "half", *rest))
    with fp32_matmul_precision("high" if request.param == "tf32" else "highest"):
        yield request.param


def run_with_grads(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn(...), grad_out> for every input, with NaN-poisoned kernel buffers."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    with poisoned_empty():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        grads = torch.autograd.grad(outs, inputs, grad_out if isinstance(grad_out, tuple) else (grad_out,))
    return out, grads


# ----------------------------------------------------------------------------------------------------------------------
# Forward and backward against the float64 reference
# ----------------------------------------------------------------------------------------------------------------------

# (B, Lq, Lk, H, D, q_lens, kv_lens): edges of every kind, not the full cross product. Lengths above L are clamped.
SHAPES = [
    (1, 1, 1, 1, 16, None, None),
    (2, 5, 37, 2, 32, [5, 2], [0, 37]),  # an empty sample, an odd partial query tile
    (2, 36, 37, 1, 64, [36, 0], [37, 1]),  # pretraining text x image; zero queries; a single key
    (2, 37, 36, 1, 128, None, None),  # the other direction, full
    (1, 64, 101, 1, 64, [50], [101]),  # exact query tile; two key blocks, the second partial
    (2, 130, 5, 1, 32, [130, 64], [5, 3]),  # three query tiles, one fully padded in sample 1
    (1, 101, 130, 1, 16, [200], [129]),  # q_lens above Lq is clamped; last key block holds one real key
    (1, 20, 40, 1, 256, [19], [33]),  # the largest head dim (in fp32 its dK/dV loop takes 16 queries: shared memory)
    (2, 80, 101, 1, 128, [80, 17], [101, 66]),  # downstream: one 128-key block in half precision's tiles
]
SLOW_SHAPES = [
    (2, 130, 130, 2, 128, [130, 7], [1, 130]),
    (3, 64, 36, 2, 64, [0, 64, 33], [36, 36, 0]),
    (2, 101, 64, 3, 32, [101, 100], [64, 63]),
]


def _check_against_reference(device, shape):
    B, Lq, Lk, H, D, q_lens, kv_lens = shape
    q, grad_out = torch.randn(B, Lq, H, D, device=device), torch.randn(B, Lq, H, D, device=device)
    k, v = torch.randn(B, Lk, H, D, device=device), torch.randn(B, Lk, H, D, device=device)
    q_lens, kv_lens = lens_tensor(q_lens, device), lens_tensor(kv_lens, device)

    out, grads = run_with_grads(lambda q, k, v: attention(q, k, v, q_lens, kv_lens), (q, k, v), grad_out)
    ref_out, ref_grads = run_with_grads_reference(q, k, v, q_lens, kv_lens, grad_out)
    assert_rel_close(out, ref_out, 1e-4, "out")
    # A gradient that is zero in exact arithmetic (dq, dk with one key) is fp32 rounding of terms the size of the
    # others: up to 8e-7 of the largest gradient over 1500 seeds at B=Lq=Lk=1, D=16.
    floor = 0.1 * max(rg.abs().max().item() for rg in ref_grads)
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_rel_close(g, rg, 1e-4, name, floor)
    if q_lens is not None:  # padded query rows are exactly zero, and so is their gradient
        padded = torch.arange(Lq, device=device)[None, :] >= q_lens[:, None]  # (B, Lq)
        assert (out[padded] == 0).all() and (grads[0][padded] == 0).all()
    if kv_lens is not None:
        padded = torch.arange(Lk, device=device)[None, :] >= kv_lens[:, None]  # (B, Lk)
        assert (grads[1][padded] == 0).all() and (grads[2][padded] == 0).all()


def run_with_grads_reference(q, k, v, q_lens, kv_lens, grad_out):
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = reference_attention(*inputs, q_lens, kv_lens)
    return out, torch.autograd.grad(out, inputs, grad_out.double())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Lq{}-Lk{}-H{}-D{}-q{}-kv{}".format(*s))
def test_attention_matches_reference(device, tiles, seed, shape):
    _check_against_reference(device, shape)


@pytest.mark.slow
@pytest.mark.parametrize("shape", SLOW_SHAPES, ids=lambda s: "B{}-Lq{}-Lk{}-H{}-D{}-q{}-kv{}".format(*s))
def test_attention_matches_reference_larger(device, tiles, seed, shape):
    _check_against_reference(device, shape)


def test_softmax_scale_and_lengths_above_seqlen(device, tiles, seed):
    B, Lq, Lk, H, D = 2, 5, 7, 2, 16
    q, k, v = (torch.randn(B, L, H, D, device=device) for L in (Lq, Lk, Lk))
    out = attention(q, k, v, softmax_scale=0.3)
    assert_rel_close(out, reference.attention(q.double(), k.double(), v.double(), softmax_scale=0.3), 1e-5, "out")
    clamped = attention(q, k, v, lens_tensor([Lq + 3, 99], device), lens_tensor([Lk, Lk + 1], device),
                        softmax_scale=0.3)
    torch.testing.assert_close(clamped, out, rtol=0, atol=0)
    # int64 lengths beyond int32 are clamped as lengths, not wrapped by a cast (2**31 -> negative, 2**32 + 3 -> 3).
    huge = torch.tensor([2**31, 2**32 + 3], device=device)
    torch.testing.assert_close(attention(q, k, v, huge, huge, softmax_scale=0.3), out, rtol=0, atol=0)
    # int32 lengths run the int64 kernels (the launcher converts them): the same result.
    q_lens, kv_lens = torch.tensor([4, 2], device=device), torch.tensor([7, 3], device=device)
    torch.testing.assert_close(attention(q, k, v, q_lens.int(), kv_lens.int(), softmax_scale=0.3),
                               attention(q, k, v, q_lens, kv_lens, softmax_scale=0.3), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["heads-first", "expanded"])
def test_backward_reads_any_layout_of_the_output_gradient(device, seed, layout):
    """dO comes in whatever layout the consumer's backward makes: heads-first for out.transpose(1, 2), stride 0 for
    out.sum(1). The kernels read it as out's layout, so it must be made so."""
    B, Lq, Lk, H, D = 2, 5, 7, 2, 16
    q, k, v = (torch.randn(B, L, H, D, device=device) for L in (Lq, Lk, Lk))
    q_lens, kv_lens = lens_tensor([5, 3], device), lens_tensor([7, 2], device)
    grad_out = (torch.randn(B, H, Lq, D, device=device).transpose(1, 2) if layout == "heads-first"
                else torch.randn(B, 1, H, D, device=device).expand(B, Lq, H, D))
    _, grads = run_with_grads(lambda q, k, v: attention(q, k, v, q_lens, kv_lens), (q, k, v), grad_out)
    _, ref_grads = run_with_grads_reference(q, k, v, q_lens, kv_lens, grad_out)
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_rel_close(g, rg, 1e-4, name)


def test_rows_beyond_32_bit_offsets_are_copied_or_refused(device, seed, monkeypatch):
    """Row offsets inside a (sample, head) are 32-bit: a view whose rows lie further apart (a sequence-first layout
    of a large batch) is copied, and a sample too large even when dense is refused. Shown with the limit lowered."""
    monkeypatch.setattr(attention_impl, "_MAX_ROW_OFFSET", 5000)
    B, L, H, D = 3, 9, 2, 16
    # row stride B*H*D = 96: (9 + 128 rows) * 96 > 5000
    seq_first = torch.randn(L, B, H, D, device=device).transpose(0, 1)
    assert attention_impl._aligned(seq_first) is not seq_first
    dense = torch.randn(B, L, H, D, device=device)  # row stride 32: 137 * 32 < 5000
    assert attention_impl._aligned(dense) is dense
    out = attention(seq_first, seq_first, seq_first)
    assert_rel_close(out, reference.attention(*(seq_first.double(),) * 3), 1e-4, "out")
    with pytest.raises(ValueError, match="32-bit offsets"):
        attention(*(torch.randn(B, 120, H, D, device=device),) * 3)


def test_tf32_backward_on_a_gpu_with_less_shared_memory(device, seed, monkeypatch):
    """With less shared memory than Hopper's (an A100's 163 KB), TF32's backward at 65..128 keys runs two launches
    with 32-key dK/dV blocks instead of one 128-key block; the gradients are the same."""
    if device.type == "cuda":
        pytest.skip("the GPU's own shared memory decides there")
    monkeypatch.setattr(attention_impl, "shared_memory_per_program", lambda device: 163 * 1024)
    config, dkdv_blocks = attention_impl.attention_launch_config, []
    monkeypatch.setattr(attention_impl, "attention_launch_config",
                        lambda *args: dkdv_blocks.append(config(*args)["bwd_dkdv"]["BLOCK_N"]) or config(*args))
    B, Lq, Lk, H, D = 1, 80, 101, 1, 128
    q, k, v = (torch.randn(B, L, H, D, device=device) for L in (Lq, Lk, Lk))
    q_lens, kv_lens = lens_tensor([70], device), lens_tensor([90], device)
    grad_out = torch.randn(B, Lq, H, D, device=device)
    with fp32_matmul_precision("high"):
        out, grads = run_with_grads(lambda q, k, v: attention(q, k, v, q_lens, kv_lens), (q, k, v), grad_out)
    assert dkdv_blocks and set(dkdv_blocks) == {32}
    ref_out, ref_grads = run_with_grads_reference(q, k, v, q_lens, kv_lens, grad_out)
    assert_rel_close(out, ref_out, 1e-4, "out")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_rel_close(g, rg, 1e-4, name)


def test_kernels_need_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="need a CUDA device"):
        attention(**_inputs())


def test_fused_qkv_slices_are_read_in_place(device, seed):
    B, L, H, D = 2, 37, 2, 32
    qkv = torch.randn(B, L, 3, H, D, device=device, requires_grad=True)  # one fused projection
    q, k, v = qkv.unbind(2)  # (B, L, H, D) views with stride 3*H*D along L
    assert attention_impl._aligned(q) is q, "a fused-projection slice must not be copied"
    lens = torch.tensor([37, 20], device=device)
    out = attention(q, k, v, lens, lens)
    grad_out = torch.randn_like(out)
    (grad_fused,) = torch.autograd.grad(out, qkv, grad_out)
    dense = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    out_dense = attention(*dense, lens, lens)
    grads_dense = torch.autograd.grad(out_dense, dense, grad_out)
    torch.testing.assert_close(out, out_dense, rtol=0, atol=0)
    torch.testing.assert_close(grad_fused, torch.stack(grads_dense, dim=2), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Co-attention
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T, V, D, text_lens, image_lens", [
    (36, 37, 64, [36, 3, 0], [37, 0, 10]),
    (5, 20, 32, None, [20, 1, 7]),
])
def test_co_attention_equals_two_attention_calls(device, tiles, seed, T, V, D, text_lens, image_lens):
    B, H = 3, 1
    text = [torch.randn(B, T, H, D, device=device) for _ in range(3)]
    image = [torch.randn(B, V, H, D, device=device) for _ in range(3)]
    text_lens, image_lens = lens_tensor(text_lens, device), lens_tensor(image_lens, device)
    grad_out = (torch.randn(B, T, H, D, device=device), torch.randn(B, V, H, D, device=device))

    (text_out, image_out), grads = run_with_grads(
        lambda *x: co_attention(*x, text_lens, image_lens), text + image, grad_out)

    def two_calls(tq, tk, tv, iq, ik, iv):
        return (attention(tq, ik, iv, text_lens, image_lens), attention(iq, tk, tv, image_lens, text_lens))

    (text_ref, image_ref), ref_grads = run_with_grads(two_calls, text + image, grad_out)
    torch.testing.assert_close(text_out, text_ref, rtol=0, atol=0)
    torch.testing.assert_close(image_out, image_ref, rtol=0, atol=0)
    # Tiles follow the longest sequence, which co-attention's one launch shares between its directions: a dK/dV program
    # may step over the queries in other chunks than a lone call does, so gradients agree up to fp32 rounding.
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-6)
    tq, tk, tv, iq, ik, iv = (t.double() for t in text + image)
    assert_rel_close(text_out, reference_attention(tq, ik, iv, text_lens, image_lens), 1e-4, "text_out")
    assert_rel_close(image_out, reference_attention(iq, tk, tv, image_lens, text_lens), 1e-4, "image_out")


def test_co_attention_covers_the_longer_streams_query_tiles(device, tiles, seed):
    """10 text queries (one 64-row tile) and 100 image queries (two): the launch both directions share must run every
    query tile of the longer stream, forward and backward (NaN-poisoned outputs show a tile never run)."""
    B, T, V, H, D = 2, 10, 100, 1, 16
    inputs = [torch.randn(B, L, H, D, device=device) for L in (T, T, T, V, V, V)]
    text_lens, image_lens = lens_tensor([10, 4], device), lens_tensor([100, 65], device)
    grad_out = (torch.randn(B, T, H, D, device=device), torch.randn(B, V, H, D, device=device))
    outs, grads = run_with_grads(lambda *x: co_attention(*x, text_lens, image_lens), inputs, grad_out)

    def reference_co_attention(tq, tk, tv, iq, ik, iv):
        return (reference_attention(tq, ik, iv, text_lens, image_lens),
                reference_attention(iq, tk, tv, image_lens, text_lens))
    ref_inputs = [t.double().requires_grad_() for t in inputs]
    ref_outs = reference_co_attention(*ref_inputs)
    ref_grads = torch.autograd.grad(ref_outs, ref_inputs, tuple(g.double() for g in grad_out))
    for i, (got, want) in enumerate(zip(outs + grads, ref_outs + ref_grads)):
        assert_rel_close(got, want, 1e-4, f"output {i}")


def test_strided_lengths_read_as_their_values(device, tiles, seed):
    """Lengths given as an expanded (stride 0) or strided view: the kernels must read lens[b], not memory b."""
    B, T, V, H, D = 4, 7, 11, 1, 16
    text = [torch.randn(B, T, H, D, device=device) for _ in range(3)]
    image = [torch.randn(B, V, H, D, device=device) for _ in range(3)]
    text_lens = torch.tensor([3], device=device).expand(B)  # stride 0
    image_lens = torch.tensor([9, -1, 2, -1, 5, -1, 11, -1], device=device)[::2]  # stride 2
    dense = co_attention(*text, *image, text_lens.clone(), image_lens.clone())
    strided = co_attention(*text, *image, text_lens, image_lens)
    for out, expected in zip(strided, dense):
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(attention(*text, text_lens, text_lens), attention(*text, text_lens.clone(),
                                                                               text_lens.clone()), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------------------------------

def test_dropout_is_reproducible_and_fresh_per_call(device, tiles, seed):
    q, k, v = (torch.randn(2, 9, 2, 16, device=device) for _ in range(3))
    torch.manual_seed(seed)
    first = attention(q, k, v, dropout_p=0.3)
    second = attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(seed)
    again = attention(q, k, v, dropout_p=0.3)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert not torch.equal(first, second), "two calls in a row must draw different masks"


def test_dropout_keep_rate_and_scaling(device, tiles, seed):
    B, Lq, Lk, H, p = 2, 64, 32, 4, 0.3
    keep = dropout_keep_mask(device, B, Lq, Lk, H, p, seed)
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * sigma
    # Neighbouring keys, within and across the 4-key groups that share a Philox call, agree as independent draws do.
    for shift in (1, 2, 3, 4):
        agree = (keep[..., shift:] == keep[..., :-shift]).double().mean().item()
        assert abs(agree - (p * p + (1 - p) ** 2)) < 0.03, (shift, agree)
    # Every element has a Philox output of its own, also where rows meet: with 37 keys (not a multiple of 4) the last
    # key of row i and the first of row i + 1 agree as independent draws do.
    rows_keep = dropout_keep_mask(device, B, Lq, 37, H, p, seed)
    agree = (rows_keep[:, :, :-1, -1] == rows_keep[:, :, 1:, 0]).double().mean().item()
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.1, agree
    # The two directions of co-attention draw independent masks.
    text_keep, image_keep = dropout_keep_mask(device, B, 20, 24, H, p, seed, co=True)
    agree = (text_keep[:, :, :20, :20] == image_keep[:, :, :20, :20]).double().mean().item()
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.05
    # Kept probabilities are scaled by exactly 1 / (1 - p): out = (P * keep / (1 - p)) @ v with v one-hot.
    q, k = torch.randn(B, Lq, H, 32, device=device), torch.randn(B, Lk, H, 32, device=device)
    v = torch.eye(32, device=device)[:Lk][None, :, None, :].expand(B, Lk, H, 32).contiguous()
    torch.manual_seed(seed)
    out = attention(q, k, v, dropout_p=p)
    expected = masked_reference(q.double(), k.double(), v.double(), None, None, keep, p)
    assert_rel_close(out, expected, 1e-5, "dropped out")


def test_dropout_mask_is_the_documented_philox_draw(device, tiles, seed):
    """Element (i, j) of stream (direction * B + b) * H + h keeps iff output j % 4 of Philox at counter
    (i * ceil(Lk / 4) + j // 4, stream), key = the seed drawn from torch's generator, is >= p (see _keep_mask):
    recomputed with numpy for both directions of co-attention."""
    B, H, T, V, p = 2, 3, 5, 37, 0.3
    text_keep, image_keep = dropout_keep_mask(device, B, T, V, H, p, seed, co=True)
    torch.manual_seed(seed)
    philox_seed = int(draw_seed(p))  # the draw co_attention makes
    for direction, (keep, Lq, Lk) in enumerate(((text_keep, T, V), (image_keep, V, T))):
        groups = (Lk + 3) // 4
        counter = np.arange(Lq)[:, None] * groups + np.arange(groups)[None, :]  # (Lq, groups)
        stream = (direction * B + np.arange(B)[:, None]) * H + np.arange(H)[None, :]  # (B, H)
        c0, c1 = np.broadcast_arrays(counter[None, None], stream[:, :, None, None])
        expected = philox_keep_reference(philox_seed, c0.astype(np.uint32), c1.astype(np.uint32), p)
        expected = expected.reshape(B, H, Lq, groups * 4)[..., :Lk]
        assert np.array_equal(keep.cpu().numpy(), expected), f"direction {direction}"


@pytest.mark.slow  # a million probabilities in the interpreter (40 s): fewer keep too few at this rate
def test_fp16_keeps_extreme_dropout_in_range(device, seed):
    """At fp16's highest dropout_p (1 / (1 - p) = 62500, near fp16's 65504) the output and the gradients stay finite
    and match fp32 (same mask)."""
    B, Lq, Lk, H, D, p = 1, 4096, 64, 4, 16, 0.999984  # ~16 kept of 1M: none kept has probability 1e-7
    q = torch.zeros(B, Lq, H, D, device=device)  # every unnormalised probability exp(s - max) is 1
    k, v = torch.randn(B, Lk, H, D, device=device), torch.randn(B, Lk, H, D, device=device)
    grad_out = torch.randn(B, Lq, H, D, device=device)
    results = []
    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(seed)
        results.append(run_with_grads(lambda q, k, v: attention(q, k, v, dropout_p=p),
                                      [t.to(dtype) for t in (q, k, v)], grad_out.to(dtype)))
    (out32, grads32), (out16, grads16) = results
    assert out32.abs().max() > 0, "nothing kept: a test that tests nothing"
    for name, got, expected in (("out", out16, out32), *zip(("dq", "dk", "dv"), grads16, grads32)):
        assert got.isfinite().all(), f"{name} overflowed in fp16"
        assert_rel_close(got.float(), expected, 2e-2, name)


def test_dropout_is_unbiased(device, tiles, seed):
    Lk, D, p, draws = 64, 16, 0.5, 2048
    q, k, v = (torch.randn(1, L, 1, D, device=device) for L in (1, Lk, Lk))
    # One query repeated along the rows: every row draws its own mask, so the rows are `draws` samples.
    samples = attention(q.expand(1, draws, 1, D), k, v, dropout_p=p)[0, :, 0].double()  # (draws, D)
    expected = reference.attention(q.double(), k.double(), v.double())[0, 0, 0]  # (D,)
    stderr = samples.std(0) / draws ** 0.5
    z = ((samples.mean(0) - expected).abs() / stderr.clamp(min=1e-6)).max().item()
    assert z < 5.0, f"mean over {draws} dropout draws is {z:.1f} standard errors from the no-dropout output"
    # A global bias (a keep rate or scale slightly off) shows in the projection of each draw on the expected output.
    ratios = (samples * expected).sum(1) / (expected ** 2).sum()  # (draws,), 1 in expectation
    z = (ratios.mean() - 1).abs() / (ratios.std() / draws ** 0.5)
    assert z < 5.0, f"dropout output is biased: mean projection ratio {ratios.mean():.4f}, {z:.1f} standard errors"


# (B, Lq, Lk, H, D, q_lens, kv_lens): keys in one block (the dK/dV launch writes dQ too), and more keys than any
# tiles' dK/dV block holds (130 > 128), where the dQ kernel regenerates the mask on its own.
DROPOUT_BACKWARD_SHAPES = [
    (2, 13, 20, 2, 64, [13, 6], [20, 9]),
    (2, 9, 130, 1, 32, [9, 4], [130, 97]),
]


@pytest.mark.parametrize("shape", DROPOUT_BACKWARD_SHAPES, ids=["one-launch", "separate-dq"])
def test_dropout_backward_matches_reference_with_the_same_mask(device, tiles, seed, shape):
    B, Lq, Lk, H, D, q_lens, kv_lens = shape
    p = 0.25
    q_lens, kv_lens = lens_tensor(q_lens, device), lens_tensor(kv_lens, device)
    keep = dropout_keep_mask(device, B, Lq, Lk, H, p, seed)
    q, k, v, grad_out = (torch.randn(B, L, H, D, device=device) for L in (Lq, Lk, Lk, Lq))

    def dropped(q, k, v):
        torch.manual_seed(seed)
        return attention(q, k, v, q_lens, kv_lens, dropout_p=p)

    out, grads = run_with_grads(dropped, (q, k, v), grad_out)
    inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out = masked_reference(*inputs, q_lens, kv_lens, keep, p)
    ref_grads = torch.autograd.grad(ref_out, inputs, grad_out.double())
    assert_rel_close(out, ref_out, 1e-4, "out")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_rel_close(g, rg, 1e-4, name)


def test_dropout_gradient_finite_differences(device, tiles, seed):
    """Directional derivative of <out, w> with the seed fixed: central difference vs the kernels' gradients."""
    B, Lq, Lk, H, D, p, eps = 1, 6, 9, 2, 16, 0.2, 1e-2
    q, k, v, w = (torch.randn(B, L, H, D, device=device) for L in (Lq, Lk, Lk, Lq))
    directions = [torch.randn_like(t) for t in (q, k, v)]

    def f(q, k, v):
        torch.manual_seed(seed)
        return attention(q, k, v, dropout_p=p)

    _, grads = run_with_grads(f, (q, k, v), w)
    plus = (f(*(t + eps * d for t, d in zip((q, k, v), directions))) * w).sum().double()
    minus = (f(*(t - eps * d for t, d in zip((q, k, v), directions))) * w).sum().double()
    numeric = ((plus - minus) / (2 * eps)).item()
    analytic = sum((g.double() * d.double()).sum() for g, d in zip(grads, directions)).item()
    assert abs(numeric - analytic) <= 1e-2 * max(abs(analytic), 1.0), (numeric, analytic)


# ----------------------------------------------------------------------------------------------------------------------
# Input checks, autocast
# ----------------------------------------------------------------------------------------------------------------------

def _inputs(**overrides):
    args = dict(q=torch.randn(2, 5, 2, 16), k=torch.randn(2, 7, 2, 16), v=torch.randn(2, 7, 2, 16),
                q_lens=None, kv_lens=None, dropout_p=0.0, softmax_scale=None)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, error, match", [
    (dict(q=torch.randn(2, 5, 32)), ValueError, "q must be 4-D"),
    (dict(k=torch.randn(3, 7, 2, 16)), ValueError, "k has batch=3"),
    (dict(v=torch.randn(2, 7, 4, 16)), ValueError, "v has nheads=4"),
    (dict(k=torch.randn(2, 7, 2, 32)), ValueError, "k has headdim=32"),
    (dict(v=torch.randn(2, 6, 2, 16)), ValueError, "v has seqlen 6"),
    (dict(k=torch.randn(2, 7, 2, 16, dtype=torch.float64)), TypeError, "k must be float16, bfloat16 or float32"),
    (dict(q=torch.randint(0, 3, (2, 5, 2, 16))), TypeError, "q must be float16"),
    (dict(v=torch.randn(2, 7, 2, 16).half()), TypeError, "v has dtype torch.float16"),
    (dict(q=torch.randn(2, 5, 2, 24), k=torch.randn(2, 7, 2, 24), v=torch.randn(2, 7, 2, 24)), ValueError,
     "power of 2"),
    (dict(q=[[0.0]]), TypeError, "q must be a torch.Tensor"),
    (dict(k=torch.randn(2, 7, 2, 16, device="meta")), ValueError, "k is on meta but q is on cpu"),
    (dict(q_lens=torch.tensor([1.0, 2.0])), TypeError, "q_lens must have dtype int32 or int64"),
    (dict(q_lens=torch.tensor([1, 2], device="meta")), ValueError, "q_lens is on meta"),
    (dict(kv_lens=torch.tensor([1, 2, 3])), ValueError, r"kv_lens must have shape \(batch,\) = \(2,\)"),
    (dict(kv_lens=[1, 2]), TypeError, "kv_lens must be a torch.Tensor"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float"),
    (dict(q=torch.randn(2, 0, 2, 16)), ValueError, "q has seqlen 0"),
    (dict(softmax_scale="0.1"), TypeError, "softmax_scale must be a float or None"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale must be a positive float32 number"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a positive float32 number"),
    (dict(softmax_scale=1e39), ValueError, "softmax_scale must be a positive float32 number"),
    (dict(softmax_scale=3e38), ValueError, "times log2"),  # a float32, but its product with log2(e) is not
    (dict(dropout_p=1 - 2**-25), ValueError, "dropout_p must be at most"),  # 1.0 in float32
    (dict(q=torch.randn(2, 5, 2, 16).half(), k=torch.randn(2, 7, 2, 16).half(), v=torch.randn(2, 7, 2, 16).half(),
          dropout_p=0.99999), ValueError, r"1 / \(1 - dropout_p\) must fit float16"),
    (dict(q=torch.randn(2, 5, 2, 16).half(), k=torch.randn(2, 7, 2, 16).half(), v=torch.randn(2, 7, 2, 16).half(),
          dropout_p=1 - 1 / 65504), ValueError, "must fit float16"),  # in fp32 1 - p is 2^-16: a scale of 65536
])
def test_bad_inputs_name_the_argument(overrides, error, match):
    with pytest.raises(error, match=match):
        attention(**_inputs(**overrides))


def test_bad_co_attention_inputs_name_the_argument():
    text, image = torch.randn(2, 5, 2, 16), torch.randn(2, 7, 2, 16)
    with pytest.raises(ValueError, match="image_k has seqlen 6"):
        co_attention(text, text, text, image, torch.randn(2, 6, 2, 16), image)
    with pytest.raises(ValueError, match="image_q has nheads=3"):
        co_attention(text, text, text, torch.randn(2, 7, 3, 16), image, image)
    with pytest.raises(ValueError, match="image_lens must have shape"):
        co_attention(text, text, text, image, image, image, image_lens=torch.tensor([7]))


def test_autocast_runs_in_the_autocast_dtype(device, seed):
    q, k, v = (torch.randn(1, 6, 1, 16, device=device) for _ in range(3))
    with torch.autocast(device.type, dtype=torch.float16):
        out = attention(q, k, v)
    assert out.dtype == torch.float16
    expected = reference.attention(*(t.half().double() for t in (q, k, v)))
    assert_rel_close(out, expected, 2e-3, "autocast out")


def test_torch_compile_fullgraph_matches_eager(device, seed):
    """No graph breaks (fullgraph=True); the same seed gives the same dropout mask compiled and eager."""
    text_lens, image_lens = lens_tensor([5, 3], device), lens_tensor([7, 0], device)
    inputs = [torch.randn(2, L, 2, 16, device=device) for L in (5, 5, 5, 7, 7, 7)]

    def step(tq, tk, tv, iq, ik, iv):
        text_out, image_out = co_attention(tq, tk, tv, iq, ik, iv, text_lens, image_lens, dropout_p=0.1)
        return text_out, image_out, attention(tq, ik, iv, text_lens, image_lens, dropout_p=0.1)

    grad_outs = tuple(torch.randn(2, L, 2, 16, device=device) for L in (5, 7, 5))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.manual_seed(seed)
    outs, grads = run_with_grads(compiled, inputs, grad_outs)
    torch.manual_seed(seed)
    ref_outs, ref_grads = run_with_grads(step, inputs, grad_outs)
    for got, expected in zip(outs + grads, ref_outs + ref_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_torch_compile_takes_softmax_scale_as_a_symbolic_float(device, seed):
    """With dynamic=True a Python float argument is symbolic: the checks must not need its value (math.isfinite)."""
    q, k, v = (torch.randn(2, L, 2, 16, device=device) for L in (5, 7, 7))
    compiled = torch.compile(lambda q, k, v, scale: attention(q, k, v, softmax_scale=scale), backend="aot_eager",
                             fullgraph=True, dynamic=True)
    for scale in (0.25, 0.3):
        torch.testing.assert_close(compiled(q, k, v, scale), attention(q, k, v, softmax_scale=scale), rtol=0, atol=0)


def test_meta_tensors_give_shapes(seed):
    """Shape inference on the meta device (as the reference allows), forward and backward."""
    q, k, v = (torch.randn(2, L, 2, 16, device="meta", requires_grad=True) for L in (5, 7, 7))
    out = attention(q, k, v, dropout_p=0.1)
    assert out.shape == q.shape and out.device.type == "meta"
    assert [g.shape for g in torch.autograd.grad(out.sum(), (q, k, v))] == [q.shape, k.shape, v.shape]


def test_registered_ops_pass_opcheck(device, seed):
    """Schema, fake tensors, autograd registration and AOT dispatch of the four registered ops."""
    q, k, v = (torch.randn(2, L, 1, 16, device=device, requires_grad=True) for L in (5, 7, 7))
    q_lens, kv_lens = lens_tensor([5, 2], device), lens_tensor([0, 7], device)
    seed_tensor = torch.tensor([seed % 2**31])
    ops = torch.ops.vilbert_kernels
    out, lse = ops.attention_forward(q, k, v, q_lens, kv_lens, 0.1, 0.25, seed_tensor)
    text_out, image_out, text_lse, image_lse = ops.co_attention_forward(q, q, q, k, k, k, q_lens, kv_lens, 0.1,
                                                                        0.25, seed_tensor)
    # The backward ops are not differentiable themselves (no double backward): check them on plain tensors.
    qd, kd, vd, out, text_out, image_out = (t.detach() for t in (q, k, v, out, text_out, image_out))
    cases = [
        (ops.attention_forward.default, (q, k, v, q_lens, kv_lens, 0.1, 0.25, seed_tensor)),
        (ops.attention_backward.default, (torch.randn_like(out), qd, kd, vd, out, lse, q_lens, kv_lens, 0.1, 0.25,
                                          seed_tensor)),
        (ops.co_attention_forward.default, (q, q, q, k, k, k, q_lens, kv_lens, 0.1, 0.25, seed_tensor)),
        (ops.co_attention_backward.default, (torch.randn_like(text_out), torch.randn_like(image_out), qd, qd, qd, kd,
                                             kd, kd, text_out, image_out, text_lse, image_lse, q_lens, kv_lens, 0.1,
                                             0.25, seed_tensor)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_fp32_products_follow_torchs_matmul_precision(device, monkeypatch):
    """fp32 inputs run exact products by default and TF32 where PyTorch allows it for its own (legacy or new API),
    read at each call, forward and backward; half precision is unaffected, head dims above 128 stay exact."""
    seen = []
    config = attention_impl.attention_launch_config
    monkeypatch.setattr(attention_impl, "attention_launch_config", lambda *args: seen.append(args[3]) or config(*args))

    def forward_backward(head_dim=16, dtype=torch.float32):
        q = torch.randn(1, 3, 1, head_dim, device=device, dtype=dtype, requires_grad=True)
        attention(q, q, q).sum().backward()

    forward_backward()
    with fp32_matmul_precision("high"):
        forward_backward()
        forward_backward(head_dim=256)
        forward_backward(dtype=torch.float16)
    with fp32_matmul_precision("medium"):
        forward_backward()
    # The API of torch >= 2.9, for CUDA's products; another backend's setting (there, PyTorch's legacy getter raises)
    # leaves them exact.
    for backend, setting in ((torch.backends.cuda.matmul, "tf32"), (torch.backends.mkldnn.matmul, "bf16")):
        previous = backend.fp32_precision
        backend.fp32_precision = setting
        try:
            forward_backward()
        finally:
            backend.fp32_precision = previous
    assert seen == [p for p in ("ieee", "tf32", "ieee", "half", "tf32", "tf32", "ieee") for _ in range(2)]


def test_public_names_are_exported():
    assert vilbert_kernels.attention is attention_impl.attention
    assert "attention" in vilbert_kernels.__all__ and "co_attention" in vilbert_kernels.__all__


# ----------------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------------

def _max_errors(fn, inputs, grad_outs, reference_fn):
    """Max abs errors of fn's outputs and input gradients (inputs in their low precision) vs reference_fn in float64,
    and the largest magnitude among those float64 values."""
    low = [t.detach().clone().requires_grad_() for t in inputs]
    high = [t.detach().double().requires_grad_() for t in inputs]
    out_low, out_high = fn(*low), reference_fn(*high)
    g_low = torch.autograd.grad(out_low, low, grad_outs)
    g_high = torch.autograd.grad(out_high, high, tuple(g.double() for g in grad_outs))
    errors = [(a.double() - b).abs().max().item() for a, b in zip(out_low + g_low, out_high + g_high)]
    return errors, max(t.abs().max().item() for t in out_high + g_high)


def _assert_as_accurate_as_torch(kernel_fn, torch_fn, inputs, grad_outs, num_outputs, eps=None):
    """Kernel error <= 2x (outputs) / 3x (gradients) PyTorch's own error in the same dtype, plus one rounding step of
    the largest value (eps: the products' machine epsilon, the inputs' by default): a gradient that is zero in exact
    arithmetic (dQ of rows with one key) comes out exactly zero from PyTorch, and as the rounding of
    delta = rowsum(dO * O) from the kernel, which reads O in the low precision."""
    kernel, scale = _max_errors(kernel_fn, inputs, grad_outs, torch_fn)
    baseline, _ = _max_errors(torch_fn, inputs, grad_outs, torch_fn)
    floor = (torch.finfo(inputs[0].dtype).eps if eps is None else eps) * max(scale, 1.0)
    for i, (got, base) in enumerate(zip(kernel, baseline)):
        factor = 2 if i < num_outputs else 3
        assert got <= factor * base + floor, (i, kernel, baseline, floor)


# Triton's interpreter multiplies bf16 operands of tl.dot as raw bits (triton-lang/triton#11584, unsupported in 3.6):
# bf16 attention is checked on a GPU only; fp16 runs everywhere, with fewer samples and heads on the CPU.
LOW_PRECISION = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("T, V", [(36, 37), (80, 101)], ids=["pretraining", "downstream"])  # 1 / 2 backward launches
def test_co_attention_low_precision_at_vilbert_shapes(device, dtype, T, V, seed):
    B, H, D = (8, 8, 128) if device.type == "cuda" else (3, 2, 128)
    text_lens = torch.randint(1, T + 1, (B,), device=device)
    image_lens = torch.randint(1, V + 1, (B,), device=device)
    text_lens[0], image_lens[1] = 0, 0
    inputs = [torch.randn(B, L, H, D, device=device, dtype=dtype) for L in (T, T, T, V, V, V)]
    grad_outs = tuple(torch.randn(B, L, H, D, device=device, dtype=dtype) for L in (T, V))

    def torch_co_attention(tq, tk, tv, iq, ik, iv):  # PyTorch's maths (kv_lens 0 as in reference_attention)
        return (reference_attention(tq, ik, iv, text_lens, image_lens),
                reference_attention(iq, tk, tv, image_lens, text_lens))

    _assert_as_accurate_as_torch(lambda *x: co_attention(*x, text_lens, image_lens), torch_co_attention, inputs,
                                 grad_outs, num_outputs=2)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_text_self_attention_low_precision(device, dtype, seed):
    B, L, H, D = (8, 36, 12, 64) if device.type == "cuda" else (3, 36, 2, 64)
    lens = torch.randint(1, L + 1, (B,), device=device)
    inputs = [torch.randn(B, L, H, D, device=device, dtype=dtype) for _ in range(3)]
    grad_outs = (torch.randn(B, L, H, D, device=device, dtype=dtype),)
    _assert_as_accurate_as_torch(lambda q, k, v: (attention(q, k, v, lens, lens),),
                                 lambda q, k, v: (reference_attention(q, k, v, lens, lens),), inputs, grad_outs,
                                 num_outputs=1)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("T, V", [(36, 37), (80, 101)], ids=["pretraining", "downstream"])
def test_co_attention_dropout_low_precision_at_vilbert_shapes(device, dtype, T, V, seed):
    """The training path: half precision with dropout 0.1, against float64 with the kernel's own keep mask."""
    B, H, D, p = (8, 8, 128, 0.1) if device.type == "cuda" else (2, 2, 128, 0.1)
    text_keep, image_keep = dropout_keep_mask(device, B, T, V, H, p, seed, co=True)
    text_lens = torch.randint(1, T + 1, (B,), device=device)
    image_lens = torch.randint(1, V + 1, (B,), device=device)
    text_lens[0] = 0
    inputs = [torch.randn(B, L, H, D, device=device, dtype=dtype) for L in (T, T, T, V, V, V)]
    grad_outs = tuple(torch.randn(B, L, H, D, device=device, dtype=dtype) for L in (T, V))

    def dropped(*x):
        torch.manual_seed(seed)
        return co_attention(*x, text_lens, image_lens, dropout_p=p)

    def torch_co_attention(tq, tk, tv, iq, ik, iv):
        return (masked_reference(tq, ik, iv, text_lens, image_lens, text_keep, p),
                masked_reference(iq, tk, tv, image_lens, text_lens, image_keep, p))

    _assert_as_accurate_as_torch(dropped, torch_co_attention, inputs, grad_outs, num_outputs=2)


@pytest.mark.gpu
def test_gpu_dropout_backward_matches_same_mask(seed):
    B, Lq, Lk, H, D, p = 4, 36, 32, 8, 128, 0.1
    keep = dropout_keep_mask("cuda", B, Lq, Lk, H, p, seed).cpu()
    inputs = [torch.randn(B, L, H, D, device="cuda") for L in (Lq, Lk, Lk)]
    grad_out = torch.randn(B, Lq, H, D, device="cuda")

    def dropped(q, k, v):
        torch.manual_seed(seed)
        return attention(q, k, v, dropout_p=p)

    out, grads = run_with_grads(dropped, inputs, grad_out)
    high = [t.detach().cpu().double().requires_grad_() for t in inputs]
    ref = masked_reference(*high, None, None, keep, p)
    ref_grads = torch.autograd.grad(ref, high, grad_out.cpu().double())
    assert_rel_close(out.cpu(), ref, 1e-4, "out")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_rel_close(g.cpu(), rg, 1e-4, name)


@pytest.mark.gpu
@pytest.mark.parametrize("T, V, D", [(36, 37, 64), (36, 37, 128), (80, 101, 128), (130, 200, 64)])
def test_gpu_tf32_is_as_accurate_as_torchs(T, V, D, seed):
    """fp32 co-attention under torch.set_float32_matmul_precision("high") is as accurate as PyTorch's own TF32
    products, and really runs TF32 (each of TF32's tile sets: 32-key and 128-key dK/dV blocks at D=128, and the
    two-launch backward beyond 128 keys)."""
    B, H = 4, 4
    text_lens = torch.randint(1, T + 1, (B,), device="cuda")
    image_lens = torch.randint(1, V + 1, (B,), device="cuda")
    inputs = [torch.randn(B, L, H, D, device="cuda") for L in (T, T, T, V, V, V)]
    grad_outs = tuple(torch.randn(B, L, H, D, device="cuda") for L in (T, V))

    def torch_co_attention(tq, tk, tv, iq, ik, iv):
        return (reference_attention(tq, ik, iv, text_lens, image_lens),
                reference_attention(iq, tk, tv, image_lens, text_lens))

    def kernel(*x):
        return co_attention(*x, text_lens, image_lens)

    with fp32_matmul_precision("high"):  # TF32 keeps 10 mantissa bits: eps 2^-10
        _assert_as_accurate_as_torch(kernel, torch_co_attention, inputs, grad_outs, num_outputs=2, eps=2 ** -10)
        errors, scale = _max_errors(kernel, inputs, grad_outs, torch_co_attention)
    exact, _ = _max_errors(kernel, inputs, grad_outs, torch_co_attention)
    assert max(errors) > 1e-5 * scale > max(exact), (errors, exact, scale)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_kernels_launch_on_their_tensors_device(seed):
    """Tensors on cuda:1 while cuda:0 is current (Triton launches on the current device unless told otherwise):
    attention, LayerNorm and bias + GELU, forward and backward, give the reference's numbers."""
    dev = torch.device("cuda:1")
    with torch.cuda.device(0):
        q, k, v = (torch.randn(3, 37, 4, 64, device=dev, requires_grad=True) for _ in range(3))
        x, residual = (torch.randn(5, 768, device=dev, requires_grad=True) for _ in range(2))
        weight, bias = (torch.randn(768, device=dev, requires_grad=True) for _ in range(2))
        lens = torch.tensor([37, 20, 1], device=dev)
        ops = [(vilbert_kernels.attention, reference.attention, (q, k, v, lens, lens)),
               (vilbert_kernels.layer_norm, reference.layer_norm, (x, weight, bias, 1e-12, residual)),
               (vilbert_kernels.bias_gelu, reference.bias_gelu, (x, bias))]
        for ours, theirs, args in ops:
            leaves = [a for a in args if torch.is_tensor(a) and a.requires_grad]
            results = []
            for op in (ours, theirs):
                out = op(*args)
                results.append((out, torch.autograd.grad(out, leaves, torch.ones_like(out))))
            (out, grads), (ref_out, ref_grads) = results
            assert out.device == dev and torch.cuda.current_device() == 0
            torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
            for g, r in zip(grads, ref_grads):
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
