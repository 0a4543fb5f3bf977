"""`KernelSpec`: one launch configuration of one Triton kernel, as its op's launcher really uses it.

Each op module lists its specs in `sm90_specs()`; `compile_check` compiles them for Hopper and `aot` compiles them
into a C library. A module of its own so that op modules can import it at the top without importing compile_check.
"""
import dataclasses
from typing import Dict


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    name: str                      # readable id, e.g. "attention_fwd[D=128,bf16,BLOCK=64x64]"
    fn: object                     # the @triton.jit function
    signature: Dict[str, str]      # every argument -> "*fp16", "*fp32", "i32", "i64", "fp32" or "constexpr"
    constexprs: Dict[str, object]  # values of the constexpr arguments
    num_warps: int = 4
    num_stages: int = 3
