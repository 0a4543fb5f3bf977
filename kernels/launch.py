"""Small helpers shared by the ops' launchers."""
import contextlib
import functools
import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HOPPER_SHARED_MEMORY = 227 * 1024  # bytes one program may use on an H100/H200 (opt-in)


def check_device(t: torch.Tensor, what: str) -> None:
    """ValueError unless t is where a Triton kernel can read it: on a CUDA device, or anywhere under
    TRITON_INTERPRET=1 (the interpreter runs the kernels on the CPU). Meta tensors pass (shape inference). `what`
    names t in the message."""
    if t.device.type not in ("cuda", "meta") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{what} is on {t.device}; the Triton kernels need a CUDA device "
                         "(or TRITON_INTERPRET=1 to run them on the CPU; triton 3.6's interpreter needs numpy < 2.4)")


def as_rows(t: torch.Tensor, C: int) -> torch.Tensor:
    """(..., C) -> (N, C) with a unit column stride and any row stride; copies only when no such view exists."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, C)  # (N, C)


def device_of(t: torch.Tensor):
    """Context for a kernel launch on t's tensors: Triton launches on the current CUDA device, which need not be t's
    (a model on cuda:1 in a process whose current device is cuda:0). Nothing to do off CUDA (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def shared_memory_per_program(device: torch.device) -> int:
    """The shared memory one program may use on `device` (the opt-in maximum per block). Hopper's in the interpreter,
    whose tests then check the tiles an H100/H200 launches."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return HOPPER_SHARED_MEMORY


@functools.lru_cache(maxsize=None)
def max_partial_sum_programs(device: torch.device) -> int:
    """How many programs a backward that reduces over rows starts at most (each writes one row of partial sums)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs still exercise the partial-sum reduction


def draw_seed(dropout_p: float) -> torch.Tensor:
    """The Philox seed of one dropout op: a CPU int64 tensor (1,) from torch's default CPU generator, so
    torch.manual_seed reproduces it and reading it is no device sync; zero without dropout (no draw)."""
    if dropout_p > 0.0:
        return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    return torch.zeros(1, dtype=torch.int64)
