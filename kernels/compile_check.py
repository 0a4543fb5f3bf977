"""Compile every Triton kernel of `vilbert_kernels` for Hopper (sm_90) without a GPU, and report its resources.

The CPU tests run the kernels in Triton's interpreter, which accepts code the real compiler rejects (and the reverse);
this check closes that gap. Each op module exposes `sm90_specs()`: the launch configurations it really uses, as
`KernelSpec`s (kernel_spec.py). For each one we compile to a cubin and read registers, stack, shared memory and
local memory (spills) with the cuobjdump that ships with Triton, and whether the matrix instructions are wgmma
(HGMMA) or the older HMMA.

    python -m vilbert_kernels.compile_check            # table; exit 1 on a compile error or a register spill
    python -m vilbert_kernels.compile_check --json out.json

Must run without TRITON_INTERPRET (the interpreter replaces @triton.jit functions).
"""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List

from .kernel_spec import KernelSpec

# Modules whose kernels are checked; each defines `sm90_specs() -> list[KernelSpec]`.
OP_MODULES = ["attention", "layer_norm", "bias_gelu"]


def _triton_bin(tool: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def compile_spec(spec: KernelSpec, arch: int = 90):
    """Compile one spec for sm_<arch>; returns triton's CompiledKernel (asm['cubin'], asm['ptx'], metadata).

    Pointer arguments are promised 16-byte aligned, as the JIT specializes them when a launch passes aligned tensors
    (torch's allocations always are), so the report shows the vector loads that really run."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(spec.fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, ty in spec.signature.items() if ty.startswith("*")}
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def resource_usage(cubin: bytes) -> Dict[str, object]:
    """REG / STACK / SHARED / LOCAL from cuobjdump, and which MMA instructions the SASS uses."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_triton_bin("cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_triton_bin("cuobjdump"), "--dump-sass", path],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    report = {key: int(fields.get(key, 0)) for key in ("REG", "STACK", "SHARED", "LOCAL")}
    report["mma"] = "HGMMA" if "HGMMA" in sass else ("HMMA" if "HMMA" in sass else "-")
    return report


def collect_specs(modules: List[str] = OP_MODULES) -> List[KernelSpec]:
    specs = []
    for name in modules:
        module = importlib.import_module(f"{__package__ or 'vilbert_kernels'}.{name}")
        specs.extend(module.sm90_specs())
    return specs


def check(specs: List[KernelSpec]) -> List[Dict[str, object]]:
    rows = []
    for spec in specs:
        row = {"kernel": spec.name, "num_warps": spec.num_warps, "num_stages": spec.num_stages}
        try:
            compiled = compile_spec(spec)
            row.update(resource_usage(compiled.asm["cubin"]))
            row["shared_bytes"] = int(compiled.metadata.shared)
            row["ok"] = row["LOCAL"] == 0 and row["STACK"] == 0
            row["error"] = None if row["ok"] else "register spill (LOCAL/STACK > 0)"
        except Exception as exc:  # report every failing kernel, not just the first
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        rows.append(row)
    return rows


def format_table(rows: List[Dict[str, object]]) -> str:
    lines = ["| kernel | warps | stages | REG | shared B | LOCAL | STACK | MMA | ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['num_warps']} | {r['num_stages']} | {r.get('REG', '-')} | "
                     f"{r.get('shared_bytes', '-')} | {r.get('LOCAL', '-')} | {r.get('STACK', '-')} | "
                     f"{r.get('mma', '-')} | {'yes' if r['ok'] else 'NO: ' + str(r['error'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--modules", nargs="*", default=OP_MODULES, help="op modules to check")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET; the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    rows = check(collect_specs(args.modules))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
