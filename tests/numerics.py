"""Numerical checks shared by the kernel tests."""
import contextlib

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
