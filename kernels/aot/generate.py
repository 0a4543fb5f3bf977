"""Compile the forward kernels of `vilbert_kernels` ahead of time into the sources of a C library.

    python -m vilbert_kernels.aot.generate --out DIR --target sm_90 [--target sm_80]

Writes into DIR:
- vk_kernels.c: every cubin as a byte array, and the C API functions of include/vilbert_kernels.h, each choosing the
  cubin for the device's architecture, the dtype and the head dim and launching it through runtime/vk_runtime.c;
- cubins/<variant>.cubin: the same cubins as files (for cuobjdump);
- manifest.json: one row per cubin: the C function, its dispatch key, the kernel's parameters, launch settings.

The kernels and their launch settings are the op modules' `sm90_specs()` (the `KernelSpec`s that compile_check checks);
a `CLauncher` says how one C function turns its arguments into those kernels' arguments and grid, mirroring the
op's Python launcher. Must run with TRITON_INTERPRET unset (the interpreter cannot compile). CMakeLists.txt runs it.
"""
import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Callable, Dict, List, Sequence, Tuple

from ..compile_check import compile_spec
from ..kernel_spec import KernelSpec

# --target name -> compute capability (major * 10 + minor). Triton compiles 90 as sm_90a (wgmma).
TARGETS = {"sm_80": 80, "sm_90": 90}
# Largest dynamic shared memory per block a kernel may opt into, per architecture (CUDA programming guide).
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}
# Scalar kernel argument types -> the C type of the value cuLaunchKernel reads; pointers ("*fp16", ...) are CUdeviceptr.
SCALAR_C_TYPES = {"i32": "int32_t", "i64": "int64_t", "fp32": "float"}
# Triton appends two pointer parameters to every kernel (global and profile scratch); ours need neither, so both are 0.
HIDDEN_PARAMS = ("global_scratch", "profile_scratch")


@dataclasses.dataclass(frozen=True)
class CLauncher:
    """How one C API function launches the compiled variants of one @triton.jit kernel.

    `args`, `grid` and `dispatch` are C expressions over the function's parameters (and the locals that `checks`
    defines); `grid` may also name the variant's constexprs in braces, e.g. "(seqlen_q + {BLOCK_M} - 1) / {BLOCK_M}".
    The function launches the first variant, in the order of `specs`, whose conditions hold on the device.
    """
    name: str                                         # the C function, declared in include/vilbert_kernels.h
    params: str                                       # its C parameter list, as in the header
    specs: Callable[[], List[KernelSpec]]             # the variants it chooses from, all of one kernel, preferred first
    dispatch: Callable[[KernelSpec], List[str]]       # C conditions under which this variant may run
    args: Dict[str, str]                              # every non-constexpr kernel argument -> its C expression
    grid: Tuple[str, str, str]
    checks: str = ""                                  # C statements run first: argument validation


@dataclasses.dataclass
class CompiledVariant:
    spec: KernelSpec
    arch: int
    cubin: bytes
    num_warps: int
    shared_bytes: int

    @property
    def symbol(self) -> str:
        """A C identifier unique to this variant: the spec's name and the architecture."""
        return re.sub(r"\W+", "_", f"{self.spec.name}_sm{self.arch}").strip("_")


def kernel_params(spec: KernelSpec) -> List[Tuple[str, str]]:
    """(name, triton type) of the kernel's runtime parameters, in order: its non-constexpr arguments."""
    return [(name, spec.signature[name]) for name in spec.fn.arg_names if spec.signature[name] != "constexpr"]


def compile_variant(spec: KernelSpec, arch: int) -> CompiledVariant:
    """Compile `spec` for `arch` and check that the C launcher can launch it the way triton's own launcher would."""
    params = kernel_params(spec)
    # Pointers are promised 16-byte aligned (the C launcher checks it), as the JIT would specialize them: vector loads.
    compiled = compile_spec(spec, arch)
    meta = compiled.metadata
    unsupported = {"global scratch memory": meta.global_scratch_size > 0,
                   "profile scratch memory": meta.profile_scratch_size > 0,
                   "thread-block clusters (num_ctas > 1)": meta.num_ctas != 1,
                   "cooperative or PDL launch": meta.launch_cooperative_grid or meta.launch_pdl,
                   "tensor descriptors": bool(meta.tensordesc_meta)}
    for what, needed in unsupported.items():
        if needed:
            raise ValueError(f"{spec.name} for sm_{arch} needs {what}; the C launcher does not provide it")
    if meta.shared > MAX_SHARED_BYTES[arch]:
        raise ValueError(f"{spec.name} needs {meta.shared} bytes of shared memory; sm_{arch} has "
                         f"{MAX_SHARED_BYTES[arch]}: give it fewer stages or smaller blocks for this target")
    entry = re.search(r"\.entry\s+(\w+)\s*\((.*?)\)", compiled.asm["ptx"], re.S)
    n_ptx_params = entry.group(2).count(".param")
    if entry.group(1) != spec.fn.__name__ or n_ptx_params != len(params) + len(HIDDEN_PARAMS):
        raise ValueError(f"{spec.name}: PTX entry {entry.group(1)} has {n_ptx_params} parameters; expected "
                         f"{len(params)} arguments + {len(HIDDEN_PARAMS)} scratch pointers")
    return CompiledVariant(spec, arch, compiled.asm["cubin"], meta.num_warps, meta.shared)


def _c_bytes(data: bytes, indent: str = "  ") -> str:
    rows = [", ".join(f"0x{b:02x}" for b in data[i:i + 16]) for i in range(0, len(data), 16)]
    return ",\n".join(indent + row for row in rows)


def _c_image(v: CompiledVariant) -> str:
    return (f"static _Alignas(16) const unsigned char {v.symbol}_cubin[{len(v.cubin)}] = {{\n{_c_bytes(v.cubin)}\n}};\n"
            f"static const vk_kernel_image {v.symbol} = {{\"{v.spec.fn.__name__}\", {v.symbol}_cubin, "
            f"sizeof {v.symbol}_cubin, {v.arch}, {v.num_warps}, {v.shared_bytes}}};\n")


def _c_argument(name: str, ty: str, expr: str) -> str:
    """C statements that make the local `arg_<name>` hold the kernel argument, checking its alignment or range."""
    local = f"arg_{name}"
    if ty.startswith("*"):
        return (f"  CUdeviceptr {local} = {expr};\n"
                f"  if ({local} % 16 != 0) return vk_fail(VK_ERROR_MISALIGNED, \"{expr} is not 16-byte aligned\");\n")
    c_type = SCALAR_C_TYPES.get(ty)
    if c_type is None:
        raise ValueError(f"kernel argument {name} has type {ty!r}; the C launcher handles pointers and "
                         f"{sorted(SCALAR_C_TYPES)}")
    if ty == "i32":  # a 64-bit size or stride beyond int32 is refused rather than wrapped
        return (f"  if (!vk_fits_int32({expr})) return vk_fail(VK_ERROR_INVALID_VALUE, \"{expr} is beyond int32\");\n"
                f"  int32_t {local} = (int32_t)({expr});\n")
    return f"  {c_type} {local} = ({c_type})({expr});\n"


def c_function(launcher: CLauncher, variants: Sequence[CompiledVariant]) -> str:
    """The C API function: validate, compute the kernel arguments, choose the variant, launch."""
    kernels = {v.spec.fn.__name__ for v in variants}
    if len(kernels) != 1:
        raise ValueError(f"{launcher.name}: variants of several kernels {sorted(kernels)}; expected one kernel")
    params = kernel_params(variants[0].spec)
    missing = [name for name, _ in params if name not in launcher.args]
    unknown = [name for name in launcher.args if name not in dict(params)]
    if missing or unknown:
        raise ValueError(f"{launcher.name}: kernel {variants[0].spec.fn.__name__} takes {[n for n, _ in params]}; "
                         f"no C expression for {missing}, expressions for non-arguments {unknown}")
    body = [launcher.checks]
    body += [_c_argument(name, ty, launcher.args[name]) for name, ty in params]
    body.append("  CUdeviceptr " + " = 0, ".join(HIDDEN_PARAMS) + " = 0;\n")
    body.append("  void *params[] = {" + ", ".join(f"&arg_{name}" for name, _ in params) + ", " +
                ", ".join(f"&{name}" for name in HIDDEN_PARAMS) + "};\n")
    body.append("  int arch;\n  vk_status status = vk_current_arch(&arch);\n"
                "  if (status != VK_SUCCESS) return status;\n")
    # Within a spec, the newest architecture first: a device that runs several of its cubins gets the closest one.
    for v in variants:
        condition = " && ".join(launcher.dispatch(v.spec) + [f"vk_arch_runs({v.arch}, arch)"])
        grid = ", ".join(f"(unsigned)({g.format(**v.spec.constexprs)})" for g in launcher.grid)
        body.append(f"  if ({condition}) {{\n"
                    f"    const unsigned grid[3] = {{{grid}}};\n"
                    f"    return vk_launch(&{v.symbol}, grid, params, stream);\n  }}\n")
    body.append("  return vk_fail(VK_ERROR_UNSUPPORTED, \"no kernel compiled for these arguments (dtype, head dim) on "
                "this GPU's architecture\");\n")
    return f"vk_status {launcher.name}({launcher.params}) {{\n" + "".join(body) + "}\n"


def generate(out_dir: str, targets: Sequence[str], launchers: Sequence[CLauncher]) -> List[Dict[str, object]]:
    """Compile every launcher's variants for every target and write vk_kernels.c, cubins/ and manifest.json."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"targets {list(targets)}: expected one or more of {sorted(TARGETS)}")
    os.makedirs(os.path.join(out_dir, "cubins"), exist_ok=True)
    sources = ["/* Generated by `python -m vilbert_kernels.aot.generate`; do not edit. */\n",
               "#include <float.h>\n#include <stdint.h>\n\n#include \"vk_runtime.h\"\n\n"]
    manifest = []
    archs = sorted((TARGETS[t] for t in set(targets)), reverse=True)
    compiled: Dict[Tuple[str, int], CompiledVariant] = {}  # (spec name, arch): launchers may share kernels
    for launcher in launchers:
        variants = []
        for spec in launcher.specs():
            for arch in archs:
                if (spec.name, arch) not in compiled:
                    v = compiled[spec.name, arch] = compile_variant(spec, arch)
                    sources.append(_c_image(v) + "\n")
                    with open(os.path.join(out_dir, "cubins", f"{v.symbol}.cubin"), "wb") as f:
                        f.write(v.cubin)
                variants.append(compiled[spec.name, arch])
        if not variants:
            raise ValueError(f"{launcher.name}: no kernel variants to compile")
        for v in variants:
            manifest.append({"function": launcher.name, "kernel": v.spec.fn.__name__, "spec": v.spec.name,
                             "arch": v.arch, "dispatch": launcher.dispatch(v.spec), "params": kernel_params(v.spec),
                             "constexprs": {k: repr(x) for k, x in v.spec.constexprs.items()},
                             "num_warps": v.num_warps, "num_stages": v.spec.num_stages,
                             "shared_bytes": v.shared_bytes, "cubin": f"cubins/{v.symbol}.cubin"})
        sources.append(c_function(launcher, variants) + "\n")
    # Written last and replaced atomically: a build never sees a half-written source.
    tmp = os.path.join(out_dir, "vk_kernels.c.tmp")
    with open(tmp, "w") as f:
        f.write("".join(sources))
    os.replace(tmp, os.path.join(out_dir, "vk_kernels.c"))
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for vk_kernels.c, cubins/ and manifest.json")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="repeatable; default sm_90")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("generate: unset TRITON_INTERPRET; the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    from .launchers import LAUNCHERS
    manifest = generate(args.out, args.target or ["sm_90"], LAUNCHERS)
    functions = ", ".join(sorted({m["function"] for m in manifest}))
    print(f"generate: {len({m['cubin'] for m in manifest})} cubins for {functions} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
