"""The ahead-of-time C library (kernels/aot, CMakeLists.txt, examples/c).

On the CPU: the generator compiles the forward kernels for sm_90 and sm_80 and CMake builds the static and shared
libraries and the example from them; then the C launchers run against a fake CUDA driver (a libcuda.so.1 built here
that records every launch), which checks what reaches cuLaunchKernel: the kernel's parameters in order with triton's
two scratch pointers, the grid, the block, the variant chosen per architecture, dtype and sizes, and the error codes.
On a GPU: the example program's outputs are compared with the Python kernels on the same inputs.

Every compile runs in a subprocess without TRITON_INTERPRET (conftest sets it for this process on a CPU machine).
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AOT = os.path.join(REPO, "kernels", "aot")
CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")

# The build needs cmake, a C/C++ compiler and a CUDA toolkit's headers (no GPU). Where they are missing these tests
# skip with the reason, unless VK_REQUIRE_C_BUILD=1 (CI, which installs them) makes that a failure.
MISSING_TOOLS = [tool for tool in ("cmake", "cc", "c++") if shutil.which(tool) is None] + (
    [] if os.path.isfile(os.path.join(CUDA_INCLUDE, "cuda.h")) else [f"cuda.h in {CUDA_INCLUDE} (set CUDA_HOME)"])
if MISSING_TOOLS and os.environ.get("VK_REQUIRE_C_BUILD") == "1":
    raise RuntimeError(f"VK_REQUIRE_C_BUILD=1 but the C library's build lacks {', '.join(MISSING_TOOLS)}")
pytestmark = pytest.mark.skipif(bool(MISSING_TOOLS),
                                reason=f"the C library's build needs {', '.join(MISSING_TOOLS)}")

# vk_status values of include/vilbert_kernels.h
VK_SUCCESS, VK_ERROR_INVALID_VALUE, VK_ERROR_MISALIGNED, VK_ERROR_UNSUPPORTED, VK_ERROR_NO_DRIVER = 0, 1, 2, 3, 4


def _run(cmd, env=None, timeout=600):
    env = dict(os.environ if env is None else env)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    """`cmake -S . -B build && cmake --build build`, the generator run by CMake for sm_90 and sm_80."""
    build = tmp_path_factory.mktemp("aot") / "build"
    _run(["cmake", "-S", REPO, "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}",
          "-DVILBERT_KERNELS_TARGETS=sm_90;sm_80"])
    _run(["cmake", "--build", str(build), "-j", "2"])
    return build


# ----------------------------------------------------------------------------------------------------------------------
# A fake CUDA driver: records what the library asks of it, one line per call, on stdout.
# ----------------------------------------------------------------------------------------------------------------------

FAKE_DRIVER = r"""
#include <cuda.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int env_int(const char *name, int fallback) { const char *v = getenv(name); return v ? atoi(v) : fallback; }

/* The current context: none with FAKE_NO_CONTEXT=1, else context number FAKE_CTX (default 1; a harness may switch). */
CUresult cuCtxGetCurrent(CUcontext *ctx) {
  *ctx = env_int("FAKE_NO_CONTEXT", 0) ? NULL : (CUcontext)(uintptr_t)(0x100 * env_int("FAKE_CTX", 1));
  return 0;
}
CUresult cuCtxGetDevice(CUdevice *device) { *device = 0; return 0; }
CUresult cuDeviceGetAttribute(int *value, CUdevice_attribute attr, CUdevice device) {
  int arch = env_int("FAKE_ARCH", 90);
  *value = attr == CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR ? arch / 10 : arch % 10;
  return 0;
}

/* A cubin is an ELF file: its size is the end of its last header table or section. */
static uint64_t elf_size(const unsigned char *elf) {
  uint64_t phoff, shoff, end;
  uint16_t phentsize, phnum, shentsize, shnum;
  memcpy(&phoff, elf + 32, 8); memcpy(&shoff, elf + 40, 8);
  memcpy(&phentsize, elf + 54, 2); memcpy(&phnum, elf + 56, 2);
  memcpy(&shentsize, elf + 58, 2); memcpy(&shnum, elf + 60, 2);
  end = phoff + (uint64_t)phentsize * phnum;
  if (shoff + (uint64_t)shentsize * shnum > end) end = shoff + (uint64_t)shentsize * shnum;
  for (int i = 0; i < shnum; ++i) {
    const unsigned char *sh = elf + shoff + (uint64_t)i * shentsize;
    uint32_t type; uint64_t offset, size;
    memcpy(&type, sh + 4, 4); memcpy(&offset, sh + 24, 8); memcpy(&size, sh + 32, 8);
    if (type != 8 /* SHT_NOBITS */ && offset + size > end) end = offset + size;
  }
  return end;
}

CUresult cuModuleLoadData(CUmodule *module, const void *image) {
  const unsigned char *elf = (const unsigned char *)image;
  if (memcmp(elf, "\x7f" "ELF", 4) != 0) return CUDA_ERROR_INVALID_IMAGE;
  uint64_t hash = 1469598103934665603ull, size = elf_size(elf);  /* FNV-1a: names the cubin */
  for (uint64_t i = 0; i < size; ++i) hash = (hash ^ elf[i]) * 1099511628211ull;
  printf("load %016llx\n", (unsigned long long)hash);
  *module = (CUmodule)image;
  return 0;
}

CUresult cuModuleUnload(CUmodule module) { printf("unload\n"); return 0; }

CUresult cuModuleGetFunction(CUfunction *function, CUmodule module, const char *name) {
  printf("function %s\n", name);
  if (env_int("FAKE_NO_FUNCTION", 0)) return CUDA_ERROR_NOT_FOUND;
  *function = (CUfunction)module;
  return 0;
}

CUresult cuFuncSetAttribute(CUfunction function, CUfunction_attribute attr, int value) {
  printf("set_attribute %d %d\n", (int)attr, value);
  return 0;
}

/* FAKE_PARAM_SIZES: the byte size of each kernel parameter, comma-separated; each is printed as hex bytes. */
CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, CUstream stream, void **params, void **extra) {
  printf("launch grid %u %u %u block %u %u %u shared %u stream %p params", gx, gy, gz, bx, by, bz, shared,
         (void *)stream);
  char sizes[4096];
  strncpy(sizes, getenv("FAKE_PARAM_SIZES"), sizeof sizes - 1);
  int i = 0;
  for (char *tok = strtok(sizes, ","); tok; tok = strtok(NULL, ","), ++i) {
    printf(" ");
    for (int b = 0; b < atoi(tok); ++b) printf("%02x", ((unsigned char *)params[i])[b]);
  }
  printf("\n");
  return 0;
}
"""


def _param_sizes(params):
    """Bytes of each kernel parameter (name, triton type), then triton's two scratch pointers."""
    sizes = {"i32": 4, "fp32": 4, "i64": 8}
    return [8 if ty.startswith("*") else sizes[ty] for _, ty in params] + [8, 8]


def _fnv1a(data: bytes) -> str:
    h = 1469598103934665603
    for byte in data:
        h = ((h ^ byte) * 1099511628211) % 2**64
    return f"{h:016x}"


def _decode(hex_value: str, ty: str):
    raw = bytes.fromhex(hex_value)
    if ty == "fp32":
        return struct.unpack("<f", raw)[0]
    return int.from_bytes(raw, "little", signed=ty in ("i32", "i64"))


def _launches(stdout: str, params):
    """One dict per launch in the fake driver's log: grid, block, shared, stream, args {param name: value}, and the
    cubins loaded (hashes) and function attributes set so far."""
    launches, loads, attributes = [], [], []
    names = [name for name, _ in params] + ["global_scratch", "profile_scratch"]
    types = [ty for _, ty in params] + ["*i8", "*i8"]
    for line in stdout.splitlines():
        words = line.split()
        if words[0] == "load":
            loads.append(words[1])
        elif words[0] == "set_attribute":
            attributes.append((int(words[1]), int(words[2])))
        elif words[0] == "launch":
            values = words[words.index("params") + 1:]
            assert len(values) == len(names)
            args = {n: _decode(v, t) for n, v, t in zip(names, values, types)}
            launches.append(dict(grid=tuple(map(int, words[2:5])), block=tuple(map(int, words[6:9])),
                                 shared=int(words[10]), stream=int(words[12], 16), args=args,
                                 loads=list(loads), attributes=list(attributes)))
    return launches


def _build_fake_driver(tmp_path):
    lib_dir = tmp_path / "fake_driver"
    lib_dir.mkdir()
    src = lib_dir / "fake_cuda.c"
    src.write_text(FAKE_DRIVER)
    _run(["cc", "-shared", "-fPIC", "-O1", f"-I{CUDA_INCLUDE}", str(src), "-o", str(lib_dir / "libcuda.so.1")])
    return lib_dir


def _run_harness(tmp_path, harness_src, link, lib_dir, params, arch=90, extra_env=None):
    exe = tmp_path / "harness"
    src = tmp_path / "harness.c"
    src.write_text(harness_src)
    _run(["cc", "-std=c11", f"-I{AOT}/include", f"-I{AOT}/runtime", f"-I{CUDA_INCLUDE}", str(src), *link,
          "-lpthread", "-ldl", "-o", str(exe)])
    env = dict(os.environ, LD_LIBRARY_PATH=str(lib_dir), FAKE_ARCH=str(arch),
               FAKE_PARAM_SIZES=",".join(map(str, _param_sizes(params))), **(extra_env or {}))
    return _run([str(exe)], env=env)


# ----------------------------------------------------------------------------------------------------------------------
# The generator's machinery, on a small kernel of this test's own
# ----------------------------------------------------------------------------------------------------------------------

SCALE_ROWS = textwrap.dedent('''
    """y[r, :n] = alpha * x[r, :n] for n = min(lens[r], n_cols), zeros after; a kernel to test the generator with."""
    import sys

    import triton
    import triton.language as tl

    from vilbert_kernels.aot.generate import CLauncher, generate
    from vilbert_kernels.kernel_spec import KernelSpec


    @triton.jit
    def scale_rows_kernel(X, Y, LENS, stride_xr, stride_yr, n_cols, alpha, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        n = tl.minimum(tl.load(LENS + row), n_cols)
        cols = tl.arange(0, BLOCK)
        x = tl.load(X + row.to(tl.int64) * stride_xr + cols, mask=cols < n, other=0.0)
        y = (x.to(tl.float32) * alpha).to(Y.dtype.element_ty)
        tl.store(Y + row * stride_yr + cols, y, mask=cols < n_cols)


    def specs():
        return [KernelSpec(f"scale_rows[{dtype},BLOCK={block}]", scale_rows_kernel,
                           {"X": f"*{dtype}", "Y": f"*{dtype}", "LENS": "*i32", "stride_xr": "i64", "stride_yr": "i32",
                            "n_cols": "i32", "alpha": "fp32", "BLOCK": "constexpr"},
                           {"BLOCK": block}, num_warps=num_warps, num_stages=1)
                for dtype in ("fp16", "fp32") for block, num_warps in ((64, 2), (256, 4))]


    LAUNCHER = CLauncher(
        name="vk_scale_rows",
        params="int fp32, CUdeviceptr x, CUdeviceptr y, CUdeviceptr lens, int64_t rows, int64_t cols, "
               "int64_t stride_x, int64_t stride_y, float alpha, CUstream stream",
        specs=specs,
        dispatch=lambda s: [f"fp32 == {int(s.signature['X'] == '*fp32')}", f"cols <= {s.constexprs['BLOCK']}"],
        args={"X": "x", "Y": "y", "LENS": "lens", "stride_xr": "stride_x", "stride_yr": "stride_y", "n_cols": "cols",
              "alpha": "alpha"},
        grid=("rows", "1", "1"),
        checks=("  if (rows < 0 || cols < 0)\\n"
                "    return vk_fail(VK_ERROR_INVALID_VALUE, \\"rows and cols must be >= 0\\");\\n"))

    if __name__ == "__main__":
        generate(sys.argv[1], ["sm_90", "sm_80"], [LAUNCHER])
''')

SCALE_ROWS_PARAMS = [("X", "*fp16"), ("Y", "*fp16"), ("LENS", "*i32"), ("stride_xr", "i64"), ("stride_yr", "i32"),
                     ("n_cols", "i32"), ("alpha", "fp32")]

SCALE_ROWS_HARNESS = r"""
#include <stdio.h>
#include "vilbert_kernels.h"
vk_status vk_scale_rows(int fp32, CUdeviceptr x, CUdeviceptr y, CUdeviceptr lens, int64_t rows, int64_t cols,
                        int64_t stride_x, int64_t stride_y, float alpha, CUstream stream);
static void report(vk_status status) { printf("status %d %s\n", (int)status, vk_last_error_message()); }
int main(void) {
  CUstream s = (CUstream)0x5000;
  report(vk_scale_rows(0, 0x1000, 0x2000, 0x3000, 5, 100, 1ll << 33, 96, 0.5f, s));  /* BLOCK 256 */
  report(vk_scale_rows(0, 0x1000, 0x2000, 0x3000, 7, 64, 64, 64, 2.0f, s));          /* BLOCK 64 */
  report(vk_scale_rows(0, 0x1000, 0x2000, 0x3000, 9, 50, 64, 64, 2.0f, s));          /* cached */
  report(vk_scale_rows(0, 0x1000, 0x2000, 0x3000, 0, 50, 64, 64, 2.0f, s));          /* no rows */
  report(vk_scale_rows(0, 0x1008, 0x2000, 0x3000, 5, 50, 64, 64, 2.0f, s));
  report(vk_scale_rows(0, 0x1000, 0x2000, 0x3000, 5, 50, 64, 1ll << 40, 2.0f, s));
  report(vk_scale_rows(0, 0x1000, 0x2000, 0x3000, 5, 300, 64, 64, 2.0f, s));
  report(vk_scale_rows(0, 0x1000, 0x2000, 0x3000, -1, 50, 64, 64, 2.0f, s));
  printf("last_cuda_result %d\n", (int)vk_last_cuda_result());
  return 0;
}
"""


@pytest.fixture(scope="module")
def scale_rows_build(tmp_path_factory):
    """The test kernel generated for sm_90 and sm_80 and compiled with the runtime into one object file each."""
    tmp = tmp_path_factory.mktemp("scale_rows")
    (tmp / "scale_rows.py").write_text(SCALE_ROWS)
    out = tmp / "generated"
    _run([sys.executable, str(tmp / "scale_rows.py"), str(out)])
    objects = []
    for src in (out / "vk_kernels.c", os.path.join(AOT, "runtime", "vk_runtime.c")):
        obj = tmp / (os.path.basename(str(src)) + ".o")
        _run(["cc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-c", f"-I{AOT}/include", f"-I{AOT}/runtime",
              f"-I{CUDA_INCLUDE}", str(src), "-o", str(obj)])
        objects.append(str(obj))
    return out, objects


def test_generated_sources_for_each_target(scale_rows_build):
    out, _ = scale_rows_build
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted((m["spec"], m["arch"]) for m in manifest) == sorted(
        (f"scale_rows[{d},BLOCK={b}]", a) for d in ("fp16", "fp32") for b in (64, 256) for a in (90, 80))
    for m in manifest:
        cubin = (out / m["cubin"]).read_bytes()
        assert cubin[:4] == b"\x7fELF"
        # e_flags holds the SM the cubin is for: in its low byte (ptxas of CUDA 12), in bits 8-15 (CUDA 13).
        flags = struct.unpack_from("<I", cubin, 48)[0]
        assert m["arch"] in (flags & 0xFF, (flags >> 8) & 0xFF), hex(flags)
        assert m["num_warps"] == (2 if "BLOCK=64" in m["spec"] else 4)
    source = (out / "vk_kernels.c").read_text()
    assert "vk_status vk_scale_rows(int fp32," in source


@pytest.mark.parametrize("arch", [90, 86, 100])
def test_launcher_passes_what_the_kernel_takes(tmp_path, scale_rows_build, arch):
    out, objects = scale_rows_build
    manifest = json.loads((out / "manifest.json").read_text())
    cubin_of = {_fnv1a((out / m["cubin"]).read_bytes()): (m["spec"], m["arch"]) for m in manifest}
    stdout = _run_harness(tmp_path, SCALE_ROWS_HARNESS, objects, _build_fake_driver(tmp_path), SCALE_ROWS_PARAMS,
                          arch=arch)
    statuses = [int(line.split()[1]) for line in stdout.splitlines() if line.startswith("status")]
    if arch == 100:  # no cubin runs on 10.0: sm_90a is 9.0 only, SASS does not cross major versions
        assert statuses == [VK_ERROR_UNSUPPORTED] * 4 + [VK_ERROR_MISALIGNED, VK_ERROR_INVALID_VALUE,
                                                         VK_ERROR_UNSUPPORTED, VK_ERROR_INVALID_VALUE]
        return
    assert statuses == [VK_SUCCESS] * 4 + [VK_ERROR_MISALIGNED, VK_ERROR_INVALID_VALUE, VK_ERROR_UNSUPPORTED,
                                           VK_ERROR_INVALID_VALUE]
    messages = [line.split(" ", 2)[2] for line in stdout.splitlines() if line.startswith("status")]
    unsupported = "no kernel compiled for these arguments (dtype, head dim) on this GPU's architecture"
    assert messages == [""] * 4 + ["x is not 16-byte aligned", "stride_y is beyond int32", unsupported,
                                   "rows and cols must be >= 0"]  # the last from the launcher's own check
    first, second, third = _launches(stdout, SCALE_ROWS_PARAMS)  # the empty grid launches nothing
    built_for = 90 if arch == 90 else 80  # sm_80 cubins run on 8.6; sm_90a ones only on 9.0
    assert cubin_of[first["loads"][-1]] == ("scale_rows[fp16,BLOCK=256]", built_for)
    assert first["grid"] == (5, 1, 1) and first["block"] == (4 * 32, 1, 1) and first["shared"] == 0
    assert first["stream"] == 0x5000
    assert first["args"] == dict(X=0x1000, Y=0x2000, LENS=0x3000, stride_xr=1 << 33, stride_yr=96, n_cols=100,
                                 alpha=0.5, global_scratch=0, profile_scratch=0)
    assert cubin_of[second["loads"][-1]] == ("scale_rows[fp16,BLOCK=64]", built_for)
    assert second["grid"] == (7, 1, 1) and second["block"] == (2 * 32, 1, 1)
    assert len(third["loads"]) == 2, "a loaded module must be reused"


def test_launcher_errors_from_the_driver(tmp_path, scale_rows_build):
    _, objects = scale_rows_build
    lib_dir = _build_fake_driver(tmp_path)
    stdout = _run_harness(tmp_path, SCALE_ROWS_HARNESS, objects, lib_dir, SCALE_ROWS_PARAMS,
                          extra_env={"FAKE_NO_CONTEXT": "1"})
    assert stdout.splitlines()[0] == ("status 5 no CUDA context is current on the calling thread (cudaSetDevice makes "
                                      "one)")  # VK_ERROR_NO_CONTEXT
    stdout = _run_harness(tmp_path, SCALE_ROWS_HARNESS, objects, lib_dir, SCALE_ROWS_PARAMS,
                          extra_env={"FAKE_NO_FUNCTION": "1"})
    lines = stdout.splitlines()
    assert lines[:3] == ["load " + lines[0].split()[1], "function scale_rows_kernel", "unload"]
    assert lines[3] == "status 6 a CUDA driver call failed (vk_last_cuda_result() says which error)"
    assert lines[-1] == "last_cuda_result 500"  # CUDA_ERROR_NOT_FOUND, kept by vk_last_cuda_result
    os.remove(lib_dir / "libcuda.so.1")
    if not any(os.path.exists(os.path.join(d, "libcuda.so.1")) for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64")):
        stdout = _run_harness(tmp_path, SCALE_ROWS_HARNESS, objects, lib_dir, SCALE_ROWS_PARAMS)
        no_driver = "the CUDA driver (libcuda.so.1) could not be loaded"
        assert stdout.splitlines()[0] == f"status {VK_ERROR_NO_DRIVER} {no_driver}"


PER_CONTEXT_HARNESS = r"""
#define _POSIX_C_SOURCE 200112L
#include <stdio.h>
#include <stdlib.h>
#include "vilbert_kernels.h"
vk_status vk_scale_rows(int fp32, CUdeviceptr x, CUdeviceptr y, CUdeviceptr lens, int64_t rows, int64_t cols,
                        int64_t stride_x, int64_t stride_y, float alpha, CUstream stream);
int main(void) {
  const char *contexts[] = {"1", "2", "1", "2"};
  for (int i = 0; i < 4; ++i) {
    setenv("FAKE_CTX", contexts[i], 1);
    printf("status %d\n", (int)vk_scale_rows(0, 0x1000, 0x2000, 0x3000, 5, 50, 64, 64, 2.0f, (CUstream)0));
  }
  return 0;
}
"""


def test_a_module_is_loaded_once_per_context(tmp_path, scale_rows_build):
    """A module belongs to the context it was loaded in: another context loads its own, then each is reused."""
    _, objects = scale_rows_build
    stdout = _run_harness(tmp_path, PER_CONTEXT_HARNESS, objects, _build_fake_driver(tmp_path), SCALE_ROWS_PARAMS)
    assert [line.split()[0] for line in stdout.splitlines() if line.split()[0] in ("load", "launch")] == [
        "load", "launch", "load", "launch", "launch", "launch"]
    assert stdout.count("status 0") == 4


def _fake_spec():
    """A KernelSpec of a stand-in for a @triton.jit function (the generator reads only arg_names and __name__)."""
    from vilbert_kernels.kernel_spec import KernelSpec

    def scale(X, n_cols, BLOCK):
        pass
    scale.arg_names = ["X", "n_cols", "BLOCK"]
    return KernelSpec("scale", scale, {"X": "*fp16", "n_cols": "i32", "BLOCK": "constexpr"}, {"BLOCK": 64})


@pytest.mark.parametrize("needs, message", [
    ({"global_scratch_size": 256}, "global scratch memory"), ({"profile_scratch_size": 64}, "profile scratch memory"),
    ({"num_ctas": 2}, "thread-block clusters"), ({"launch_cooperative_grid": True}, "cooperative or PDL launch"),
    ({"launch_pdl": True}, "cooperative or PDL launch"), ({"tensordesc_meta": [{}]}, "tensor descriptors"),
    ({"shared": 228 * 1024}, "needs 233472 bytes of shared memory; sm_90 has 232448")])
def test_generator_refuses_a_kernel_the_launcher_cannot_launch(monkeypatch, needs, message):
    """What cuLaunchKernel alone does not provide (triton's launcher sets it up) must fail the build, not the launch."""
    import types
    from vilbert_kernels.aot import generate
    metadata = dict(global_scratch_size=0, profile_scratch_size=0, num_ctas=1, launch_cooperative_grid=False,
                    launch_pdl=False, tensordesc_meta=None, shared=0, num_warps=4)
    compiled = types.SimpleNamespace(metadata=types.SimpleNamespace(**metadata),
                                     asm={"ptx": ".entry scale(.param .u64 a, .param .u32 b, .param .u64 c, "
                                                 ".param .u64 d)", "cubin": b""})
    monkeypatch.setattr(generate, "compile_spec", lambda spec, arch: compiled)
    assert generate.compile_variant(_fake_spec(), 90).num_warps == 4  # the stand-in alone compiles
    compiled.metadata = types.SimpleNamespace(**(metadata | needs))
    with pytest.raises(ValueError, match=message):
        generate.compile_variant(_fake_spec(), 90)


def test_generator_rejects_an_unmapped_kernel_argument():
    from vilbert_kernels.aot.generate import CLauncher, c_function, CompiledVariant

    spec = _fake_spec()
    launcher = CLauncher(name="vk_scale", params="CUdeviceptr x", specs=lambda: [spec], dispatch=lambda s: [],
                         args={"X": "x"}, grid=("1", "1", "1"))
    with pytest.raises(ValueError, match=r"no C expression for \['n_cols'\]"):
        c_function(launcher, [CompiledVariant(spec, 90, b"", 4, 0)])


# ----------------------------------------------------------------------------------------------------------------------
# The library: CMake build, exported symbols, the attention launchers
# ----------------------------------------------------------------------------------------------------------------------

API = ["vk_attention_forward", "vk_co_attention_forward", "vk_status_string", "vk_last_cuda_result",
       "vk_last_error_message"]


def test_cmake_builds_libraries_and_example(build_dir):
    for name in ("libvilbert_kernels.a", "libvilbert_kernels.so", "attention_example"):
        assert (build_dir / name).exists(), name
    exported = _run(["nm", "-D", "--defined-only", str(build_dir / "libvilbert_kernels.so")])
    assert sorted(line.split()[-1] for line in exported.splitlines() if " T " in line) == sorted(API)
    static = _run(["nm", "--defined-only", str(build_dir / "libvilbert_kernels.a")])
    assert all(f" T {name}\n" in static for name in API)
    manifest = json.loads((build_dir / "generated" / "manifest.json").read_text())
    assert {m["arch"] for m in manifest} == {90, 80}
    assert {m["function"] for m in manifest} == {"vk_attention_forward", "vk_co_attention_forward"}


def test_cmake_builds_from_pregenerated_sources_without_python(build_dir, tmp_path):
    build = tmp_path / "build"
    _run(["cmake", "-S", REPO, "-B", str(build), f"-DVILBERT_KERNELS_GENERATED_DIR={build_dir / 'generated'}",
          "-DPython3_EXECUTABLE=/nonexistent/python", "-DVILBERT_KERNELS_BUILD_EXAMPLES=OFF"])
    _run(["cmake", "--build", str(build), "-j", "2"])
    assert (build / "libvilbert_kernels.so").exists() and not (build / "attention_example").exists()


def test_installed_package_is_found_by_cmake(build_dir, tmp_path):
    prefix = tmp_path / "prefix"
    _run(["cmake", "--install", str(build_dir), "--prefix", str(prefix)])
    assert (prefix / "include" / "vilbert_kernels.h").exists()
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    (consumer / "CMakeLists.txt").write_text(textwrap.dedent("""
        cmake_minimum_required(VERSION 3.18)
        project(consumer LANGUAGES C)
        find_package(vilbert_kernels 0.1 REQUIRED)
        add_executable(consumer main.c)
        target_link_libraries(consumer PRIVATE vilbert_kernels::vilbert_kernels)
    """))
    (consumer / "main.c").write_text('#include <stdio.h>\n#include <vilbert_kernels.h>\n'
                                     'int main(void) { puts(vk_status_string(VK_ERROR_UNSUPPORTED)); return 0; }\n')
    _run(["cmake", "-S", str(consumer), "-B", str(consumer / "build"), f"-DCMAKE_PREFIX_PATH={prefix}"])
    _run(["cmake", "--build", str(consumer / "build")])
    assert "no kernel compiled" in _run([str(consumer / "build" / "consumer")])


ATTENTION_HARNESS = r"""
#include <math.h>
#include <stdio.h>
#include "vilbert_kernels.h"
static void report(vk_status status) { printf("status %d %s\n", (int)status, vk_last_error_message()); }
static vk_tensor t(CUdeviceptr data, int64_t sb, int64_t sl, int64_t sh) { vk_tensor x = {data, sb, sl, sh}; return x; }
int main(void) {
  CUstream s = (CUstream)0x5000;
  /* q as a slice of a fused (B, L, 3, H, D) projection; k, v contiguous */
  report(vk_attention_forward(VK_BFLOAT16, 2, 100, 10, 3, 128, t(0x10000, 100 * 1152, 1152, 128),
         t(0x20000, 3840, 384, 128), t(0x30000, 3840, 384, 128), 0x40000, 0x50000, 0x60000, 0x70000, 0.125f, s));
  /* 32 queries and keys: exactly one tile of the smallest variant, 32 x 32 */
  report(vk_attention_forward(VK_FLOAT16, 2, 32, 32, 3, 64, t(0x10000, 8, 16, 24),
         t(0x20000, 32, 40, 48), t(0x30000, 56, 64, 72), 0x40000, 0x50000, 0x60000, 0x70000, 0.125f, s));
  /* 20 text tokens (a 32-row tile alone), 37 regions (64): both directions take the longer's */
  report(vk_co_attention_forward(VK_FLOAT16, 4, 20, 37, 8, 64, t(0x1000, 88, 96, 104),
         t(0x2000, 112, 120, 128), t(0x3000, 136, 144, 152), t(0x4000, 168, 176, 184), t(0x5000, 192, 200, 208),
         t(0x6000, 216, 224, 232), 0x7000, 0x8000, 0x9000, 0xa000, 0xb000, 0xc000, 0.5f, s));
  report(vk_attention_forward(VK_FLOAT32, 2, 20, 32, 3, 64, t(0x10000, 8, 16, 24),
         t(0x20000, 32, 40, 48), t(0x30000, 56, 64, 72), 0x40000, 0x50000, 0x60000, 0x70000, 0.125f, s));
  report(vk_attention_forward(VK_FLOAT16, 2, 20, 32, 3, 96, t(0x10000, 8, 16, 24),
         t(0x20000, 32, 40, 48), t(0x30000, 56, 64, 72), 0x40000, 0x50000, 0x60000, 0x70000, 0.125f, s));
  report(vk_attention_forward(VK_FLOAT16, 2, 20, 32, 3, 64, t(0x10000, 8, 16, 24),
         t(0x20000, 32, 40, 48), t(0x30000, 56, 64, 72), 0x40000, 0x50000, 0, 0x70000, 0.125f, s));
  report(vk_attention_forward(VK_FLOAT16, 2, 20, 32, 3, 64, t(0x10000, 8, 16, 24),
         t(0x20000, 32, 40, 48), t(0x30000, 56, 64, 72), 0x40000, 0x50000, 0x60000, 0x70000, -1.0f, s));
  /* rows not 16-byte aligned: a stride of 260 fp16 elements (520 bytes); a head stride of 68 in image_v */
  report(vk_attention_forward(VK_FLOAT16, 2, 20, 32, 3, 64, t(0x10000, 8, 260, 24),
         t(0x20000, 32, 40, 48), t(0x30000, 56, 64, 72), 0x40000, 0x50000, 0x60000, 0x70000, 0.125f, s));
  report(vk_co_attention_forward(VK_FLOAT16, 4, 36, 37, 8, 64, t(0x1000, 88, 96, 104),
         t(0x2000, 112, 120, 128), t(0x3000, 136, 144, 152), t(0x4000, 168, 176, 184), t(0x5000, 192, 200, 208),
         t(0x6000, 216, 224, 68), 0x7000, 0x8000, 0x9000, 0xa000, 0xb000, 0xc000, 0.5f, s));
  /* sequence-first (L, B, H, D) inputs, B = 256, H = 16: row 9000 lies 2.36e9 elements into its sample, beyond the
     kernels' 32-bit row offsets; then the same for co-attention's image keys alone */
  report(vk_attention_forward(VK_FLOAT16, 256, 9000, 9000, 16, 64, t(0x10000, 1024, 262144, 64),
         t(0x20000, 1024, 262144, 64), t(0x30000, 1024, 262144, 64), 0x40000, 0x50000, 0x60000, 0x70000, 0.125f, s));
  report(vk_co_attention_forward(VK_FLOAT16, 256, 36, 9000, 16, 64, t(0x1000, 36 * 1024, 1024, 64),
         t(0x2000, 36 * 1024, 1024, 64), t(0x3000, 36 * 1024, 1024, 64), t(0x4000, 9000 * 1024, 1024, 64),
         t(0x5000, 1024, 262144, 64), t(0x6000, 9000 * 1024, 1024, 64), 0x7000, 0x8000, 0x9000, 0xa000, 0xb000,
         0xc000, 0.5f, s));
  /* the batch stride: 4 fp16 elements (8 bytes) */
  report(vk_attention_forward(VK_FLOAT16, 2, 20, 32, 3, 64, t(0x10000, 4, 16, 24),
         t(0x20000, 32, 40, 48), t(0x30000, 56, 64, 72), 0x40000, 0x50000, 0x60000, 0x70000, 0.125f, s));
  report(vk_attention_forward(VK_FLOAT16, 2, 20, 32, 3, 64, t(0x10000, 8, 16, 24),
         t(0x20000, 32, 40, 48), t(0x30000, 56, 64, 72), 0x40000, 0x50000, 0x60000, 0x70000, INFINITY, s));
  /* batch * nheads = 2^32: the grid's x would wrap to 0 */
  report(vk_attention_forward(VK_FLOAT16, 1 << 20, 20, 32, 1 << 12, 64, t(0x10000, 8, 16, 24),
         t(0x20000, 32, 40, 48), t(0x30000, 56, 64, 72), 0x40000, 0x50000, 0x60000, 0x70000, 0.125f, s));
  /* 5e6 queries: 78125 tiles of 64, over CUDA's 65535 for grid y */
  report(vk_attention_forward(VK_FLOAT16, 1, 5000000, 32, 1, 64, t(0x10000, 0, 64, 0),
         t(0x20000, 32, 40, 48), t(0x30000, 56, 64, 72), 0x40000, 0x50000, 0x60000, 0x70000, 0.125f, s));
  /* row stride 1024: (2097100 + 128) * 1024 + 64 passes 2^31 (without the tile's 128 rows it would not); one
     tile fewer fits */
  report(vk_attention_forward(VK_FLOAT16, 1, 2097100, 32, 1, 64, t(0x10000, 0, 1024, 0),
         t(0x20000, 32, 40, 48), t(0x30000, 56, 64, 72), 0x40000, 0x50000, 0x60000, 0x70000, 0.125f, s));
  report(vk_attention_forward(VK_FLOAT16, 1, 2096900, 32, 1, 64, t(0x10000, 0, 1024, 0),
         t(0x20000, 32, 40, 48), t(0x30000, 56, 64, 72), 0x40000, 0x50000, 0x60000, 0x70000, 0.125f, s));
  return 0;
}
"""


def _expected_variant(manifest, function, arch, dtype, head_dim, seqlen_m, seqlen_n):
    """The spec the launcher must take: for the dtype and head dim, the one with the smallest tiles that are at least
    those the Python launcher picks for the sequence lengths."""
    from vilbert_kernels.attention import _block

    def tiles(m):
        return int(m["constexprs"]["BLOCK_M"]), int(m["constexprs"]["BLOCK_N"])

    def kind(m):
        return m["function"], m["arch"], dict(m["params"])["Q0"], int(m["constexprs"]["HEAD_DIM"])
    fits = [m for m in manifest if kind(m) == (function, arch, f"*{dtype}", head_dim)
            and tiles(m)[0] >= _block(seqlen_m) and tiles(m)[1] >= _block(seqlen_n)]
    assert fits, f"no {function} variant for {dtype}, D={head_dim}, {seqlen_m}x{seqlen_n} on sm_{arch}"
    return min(fits, key=tiles)


@pytest.mark.parametrize("arch", [90, 80])
def test_attention_launchers_against_fake_driver(tmp_path, build_dir, arch):
    from vilbert_kernels.attention import _attention_fwd_kernel
    manifest = json.loads((build_dir / "generated" / "manifest.json").read_text())
    params = [tuple(p) for p in manifest[0]["params"]]
    # The kernel's arguments in order, constexprs left out.
    constexprs = manifest[0]["constexprs"]
    assert [name for name, _ in params] == [n for n in _attention_fwd_kernel.arg_names if n not in constexprs]
    cubin_of = {_fnv1a((build_dir / "generated" / m["cubin"]).read_bytes()): m["spec"] for m in manifest}
    stdout = _run_harness(tmp_path, ATTENTION_HARNESS, [str(build_dir / "libvilbert_kernels.a")],
                          _build_fake_driver(tmp_path), params, arch=arch)
    reports = [line.split(" ", 2)[1:] for line in stdout.splitlines() if line.startswith("status")]
    statuses = [int(status) for status, _ in reports]
    assert statuses == ([VK_SUCCESS] * 3 + [VK_ERROR_UNSUPPORTED] * 2 + [VK_ERROR_INVALID_VALUE] * 2
                        + [VK_ERROR_MISALIGNED] * 2 + [VK_ERROR_INVALID_VALUE] * 2
                        + [VK_ERROR_MISALIGNED] + [VK_ERROR_INVALID_VALUE] * 4 + [VK_SUCCESS])
    # vk_last_error_message names what was wrong (and keeps it through later successful calls, as errno)
    messages = [message for _, message in reports]
    assert messages[:3] == [""] * 3  # no error yet
    assert messages[3:] == [
        "no kernel compiled for these arguments (dtype, head dim) on this GPU's architecture"] * 2 + [
        "q_lens is NULL", "softmax_scale must be finite and > 0",
        "q: a stride of a dim longer than 1 is not a multiple of 16 bytes",
        "image_v: a stride of a dim longer than 1 is not a multiple of 16 bytes",
        "q: (seqlen_q + 128) * stride_seq + headdim reaches 2^31: beyond the kernels' 32-bit row offsets",
        "image_k: (seqlen_image + 128) * stride_seq + headdim reaches 2^31: beyond the kernels' 32-bit row offsets",
        "q: a stride of a dim longer than 1 is not a multiple of 16 bytes",
        "softmax_scale must be finite and > 0",
        "nheads must be >= 1, and batch * nheads at most 2^31 - 1",
        "the launch grid exceeds CUDA's limits (too many query tiles)"] + [
        "q: (seqlen_q + 128) * stride_seq + headdim reaches 2^31: beyond the kernels' 32-bit row offsets"] * 2
    bf16, fp16, co, longest = _launches(stdout, params)

    variant = _expected_variant(manifest, "vk_attention_forward", arch, "bf16", 128, 100, 10)
    assert cubin_of[bf16["loads"][-1]] == variant["spec"]
    assert bf16["grid"] == (2 * 3, -(-100 // int(variant["constexprs"]["BLOCK_M"])), 1)
    assert bf16["block"] == (variant["num_warps"] * 32, 1, 1)
    assert bf16["shared"] == variant["shared_bytes"]
    # Above 48 KiB the function opts in: CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (8).
    opt_in = [(8, variant["shared_bytes"])] if variant["shared_bytes"] > 48 * 1024 else []
    assert bf16["attributes"] == opt_in
    a = bf16["args"]
    assert (a["Q0"], a["K0"], a["V0"], a["O0"], a["LSE0"]) == (0x10000, 0x20000, 0x30000, 0x40000, 0x50000)
    assert (a["Q1"], a["K1"], a["V1"], a["O1"], a["LSE1"]) == (0x10000, 0x20000, 0x30000, 0x40000, 0x50000)
    assert (a["LENS_A"], a["LENS_B"], a["L_A"], a["L_B"], a["H"]) == (0x60000, 0x70000, 100, 10, 3)
    assert (a["stride_q0b"], a["stride_q0l"], a["stride_q0h"]) == (100 * 1152, 1152, 128)
    assert (a["stride_k0b"], a["stride_v1l"], a["stride_q1h"]) == (3840, 384, 128)
    assert (a["softmax_scale"], a["dropout_p"], a["SEED"]) == (0.125, 0.0, 0)
    assert (a["global_scratch"], a["profile_scratch"]) == (0, 0)

    variant = _expected_variant(manifest, "vk_attention_forward", arch, "fp16", 64, 32, 32)
    assert cubin_of[fp16["loads"][-1]] == variant["spec"] and int(variant["constexprs"]["BLOCK_M"]) == 32
    assert fp16["grid"] == (6, 1, 1)
    assert fp16["block"] == (variant["num_warps"] * 32, 1, 1)

    # co-attention: direction 0 = text queries over image keys, direction 1 = image queries over text keys
    # both directions share the tiles of the longer sequence
    assert cubin_of[co["loads"][-1]] == _expected_variant(manifest, "vk_co_attention_forward", arch, "fp16", 64, 37,
                                                          37)["spec"]
    assert co["grid"] == (4 * 8, 1, 2)
    c = co["args"]
    assert (c["Q0"], c["K0"], c["V0"], c["O0"], c["LSE0"]) == (0x1000, 0x5000, 0x6000, 0x7000, 0x9000)
    assert (c["Q1"], c["K1"], c["V1"], c["O1"], c["LSE1"]) == (0x4000, 0x2000, 0x3000, 0x8000, 0xa000)
    assert (c["LENS_A"], c["LENS_B"], c["L_A"], c["L_B"]) == (0xb000, 0xc000, 20, 37)
    assert [c[f"stride_{n}{d}"] for n in ("q0", "k0", "v0", "q1", "k1", "v1") for d in "blh"] == [8 * s for s in (
        11, 12, 13, 24, 25, 26, 27, 28, 29, 21, 22, 23, 14, 15, 16, 17, 18, 19)]

    # the longest query sequence whose rows the 32-bit offsets reach, one tile of 64 rows short of the refused one
    assert longest["grid"] == (1, -(-2096900 // 64), 1) and longest["args"]["L_A"] == 2096900


# ----------------------------------------------------------------------------------------------------------------------
# On a GPU: the example's outputs against the Python kernels
# ----------------------------------------------------------------------------------------------------------------------

def _read(path, dtype, shape):
    return torch.frombuffer(bytearray(open(path, "rb").read()), dtype=dtype).reshape(shape)


@pytest.mark.gpu
def test_example_matches_python_kernels(build_dir, tmp_path):
    from vilbert_kernels import reference
    from vilbert_kernels.attention import attention, co_attention
    print(_run([str(build_dir / "attention_example"), str(tmp_path)]))
    B, T, V, H, D = 3, 37, 51, 8, 128  # as in attention_example.cpp
    text_qkv = _read(tmp_path / "text_qkv.bf16", torch.bfloat16, (B, T, 3, H, D)).cuda()
    image_qkv = _read(tmp_path / "image_qkv.bf16", torch.bfloat16, (B, V, 3, H, D)).cuda()
    text_lens = _read(tmp_path / "text_lens.i64", torch.int64, (B,)).cuda()
    image_lens = _read(tmp_path / "image_lens.i64", torch.int64, (B,)).cuda()
    tq, tk, tv = text_qkv.unbind(2)
    iq, ik, iv = image_qkv.unbind(2)
    outputs = {"text_out": (B, T), "image_out": (B, V), "image_self_out": (B, V)}
    c_out = {n: _read(tmp_path / f"{n}.bf16", torch.bfloat16, (*s, H, D)).cuda() for n, s in outputs.items()}
    py_text, py_image = co_attention(tq, tk, tv, iq, ik, iv, text_lens, image_lens)
    py_self = attention(iq, ik, iv, image_lens, image_lens)
    ref_text, ref_image = reference.co_attention(*(t.double() for t in (tq, tk, tv, iq, ik, iv)), text_lens, image_lens)
    ref_self = reference.attention(iq.double(), ik.double(), iv.double(), image_lens, image_lens)
    for name, py, ref in (("text_out", py_text, ref_text), ("image_out", py_image, ref_image),
                          ("image_self_out", py_self, ref_self)):
        c = c_out[name]
        # The same kernel and tiles as the Python launch (compiled apart, so not necessarily bit-equal).
        c_err = (c.double() - ref).abs().max().item()
        py_err = (py.double() - ref).abs().max().item()
        assert c_err <= 2 * py_err + 1e-3, f"{name}: max error vs float64: C {c_err}, Python {py_err}"
    # The sample without text (the example's outputs start as NaN): its text rows are padding, its image rows have
    # no keys; both are zeros.
    assert c_out["text_out"][2].abs().max() == 0 and c_out["image_out"][2].abs().max() == 0
