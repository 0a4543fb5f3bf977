"""Compile every Triton kernel of `vilbert_kernels` for Hopper (sm_90) without a GPU, and report its resources.

The CPU tests run the kernels in Triton's interpreter, which accepts code the real compiler rejects (and the reverse);
this check closes that gap. Each op module exposes `sm90_specs()`: the launch configurations it really uses, as
`KernelSpec`s (kernel_spec.py). For each one we compile to a cubin and read registers, stack, shared memory and
local memory (spills) with the cuobjdump that ships with Triton, and whether the matrix instructions are wgmma
(HGMMA) or the older HMMA.

    python -m vilbert_kernels.compile_check            # table; exit 1 on a compile error or a register spill
    python -m vilbert_kernels.compile_check --json out.json
    python -m vilbert_kernels.compile_check --modules attention --specs-args '{"head_dims": [256]}'

Compiling is single-threaded, so the specs are spread over `--jobs` processes (default: every CPU this one may use).
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
from typing import Dict, List, Optional

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


def collect_specs(modules: List[str] = OP_MODULES, specs_args: Optional[dict] = None) -> List[KernelSpec]:
    """Every module's sm90_specs(**specs_args)."""
    specs = []
    for name in modules:
        module = importlib.import_module(f"{__package__ or 'vilbert_kernels'}.{name}")
        specs.extend(module.sm90_specs(**(specs_args or {})))
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


def check_in_processes(modules: List[str], specs_args: Optional[dict], jobs: int) -> List[Dict[str, object]]:
    """check(collect_specs(modules, specs_args)) in `jobs` processes, rows in the specs' order. Specs hold kernels,
    which do not pickle: each process collects the same specs and checks every jobs-th one (`--shard`)."""
    count = len(collect_specs(modules, specs_args))
    jobs = max(1, min(jobs, count))
    rows: List[Dict[str, object]] = [{}] * count
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(jobs):
            with open(os.path.join(tmp, f"shard{i}.err"), "w") as stderr:  # a file: a full pipe would block
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", f"{__package__ or 'vilbert_kernels'}.compile_check", "--modules", *modules,
                     "--specs-args", json.dumps(specs_args or {}), "--shard", f"{i}/{jobs}",
                     "--json", os.path.join(tmp, f"shard{i}.json")], stdout=subprocess.DEVNULL, stderr=stderr))
        for i, proc in enumerate(procs):
            proc.wait()
            path = os.path.join(tmp, f"shard{i}.json")
            if not os.path.exists(path):
                with open(os.path.join(tmp, f"shard{i}.err")) as f:
                    raise RuntimeError(f"compile_check shard {i}/{jobs} wrote no rows:\n{f.read()[-3000:]}")
            with open(path) as f:
                rows[i::jobs] = json.load(f)
    return rows


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of keyword arguments, got {text!r}")
    return value


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
    parser.add_argument("--specs-args", type=_json_object, default={},
                        help="JSON object of keyword arguments for each module's sm90_specs")
    parser.add_argument("--jobs", type=int, default=_usable_cpus(),
                        help="compiling processes (default: the CPUs this process may use)")
    parser.add_argument("--shard", help=argparse.SUPPRESS)  # "i/n": check specs i, i+n, ... (a --jobs worker)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET; the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    if args.shard:
        index, count = map(int, args.shard.split("/"))
        rows = check(collect_specs(args.modules, args.specs_args)[index::count])
    elif args.jobs > 1:
        rows = check_in_processes(args.modules, args.specs_args, args.jobs)
    else:
        rows = check(collect_specs(args.modules, args.specs_args))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
