"""Numerical checks shared by the kernel tests."""
import contextlib

import numpy as np
import torch


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty returns NaN-filled floating tensors (the kernels' outputs, LSE and gradients are torch.empty), so a
    value a kernel fails to write shows up."""
    original = torch.empty

    def empty(*args, **kwargs):
        t = original(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = original


def assert_close(name, actual, expected, baseline, factor, floor=1e-6):
    """actual's worst error against the float64 `expected` is at most `factor` times the worst error of `baseline`
    (PyTorch, same maths, actual's dtype) plus `floor` (relative to expected's scale); reports the worst element."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    err = (actual.double() - expected).abs()
    allowed = factor * (baseline.double() - expected).abs().max().item() + floor * (1 + expected.abs().max().item())
    worst = int(torch.nan_to_num(err, nan=float("inf")).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
    assert err.flatten()[worst] <= allowed, (
        f"{name}: worst error {err.flatten()[worst]:.3e} at {index} (got {actual.flatten()[worst].item():.6g}, "
        f"expected {expected.flatten()[worst].item():.6g}); allowed {allowed:.3e}")


def philox_keep_reference(seed: int, c0: np.ndarray, c1: np.ndarray, dropout_p: float) -> np.ndarray:
    """The keep decisions the kernels document, computed here with numpy: Philox-4x32-10 as Triton runs it (key = the
    seed's low and high 32 bits, counter (c0, c1, 0, 0)), each output turned into a uniform float32 in [0, 1) as
    tl.uint_to_uniform_float does, kept iff >= dropout_p. c0, c1: uint32 arrays of one shape S; returns bool
    (*S, 4), output k of each call in the last axis."""
    mask32 = np.uint64(0xFFFFFFFF)
    x = [c0.astype(np.uint64), c1.astype(np.uint64), np.zeros(c0.shape, np.uint64), np.zeros(c0.shape, np.uint64)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    a, b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        prod_b, prod_a = b * x[2], a * x[0]  # < 2**64: exact in uint64
        x = [(prod_b >> np.uint64(32)) ^ x[1] ^ k0, prod_b & mask32, (prod_a >> np.uint64(32)) ^ x[3] ^ k1,
             prod_a & mask32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask32, (k1 + np.uint64(0xBB67AE85)) & mask32
    signed = np.stack(x, axis=-1).astype(np.uint32).view(np.int32).astype(np.int64)
    uniform = np.where(signed < 0, -signed - 1, signed).astype(np.float32) * np.float32(4.6566127342e-10)
    return uniform >= np.float32(dropout_p)
