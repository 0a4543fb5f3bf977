"""Every Triton kernel in vilbert_kernels compiles for sm_90 (Hopper) without a GPU, with no register spills.

The interpreter (where the numerical tests run on the CPU) accepts code the real compiler rejects; this closes the gap.
"""
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import vilbert_kernels
from vilbert_kernels.compile_check import OP_MODULES

KERNELS_DIR = Path(vilbert_kernels.__file__).parent


def test_every_module_with_kernels_is_checked():
    # Kernels are the @triton.jit functions named *_kernel; device helpers (philox.py) are compiled inside them.
    with_kernels = {p.stem for p in KERNELS_DIR.glob("*.py")
                    if re.search(r"^@triton\.jit.*\ndef \w+_kernel\(", p.read_text(), re.M)}
    assert with_kernels <= set(OP_MODULES), f"add {sorted(with_kernels - set(OP_MODULES))} to OP_MODULES"


def test_all_kernels_compile_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "sm90.json"
    proc = subprocess.run([sys.executable, "-m", "vilbert_kernels.compile_check", "--json", str(report)],
                          env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(report.read_text())
    assert rows, "no kernel was compiled"
    assert all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]


# Every (queries, keys) tile pair the launch configurations can ask for: 16, 32, 64, over 64 (a 128-key dK/dV block at
# head dim 64 in half precision, else the two-launch backward) and over 128.
EVERY_TILE = list(itertools.product((16, 32, 64, 101, 1024), repeat=2))


def _check_attention(jobs=None, **sm90_specs_args):
    """compile_check's rows for attention.sm90_specs(**sm90_specs_args), compiled without the interpreter in `jobs`
    processes (default: one per CPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rows.json"
        proc = subprocess.run([sys.executable, "-m", "vilbert_kernels.compile_check", "--modules", "attention",
                               "--specs-args", json.dumps(sm90_specs_args), "--json", str(report),
                               *(["--jobs", str(jobs)] if jobs else [])],
                              env=env, capture_output=True, text=True, timeout=600)
        assert report.exists(), proc.stderr[-3000:]
        rows = json.loads(report.read_text())
    assert all(row.get("shared_bytes") is not None for row in rows), [row for row in rows if "shared_bytes" not in row]
    return rows


def test_rows_come_back_in_the_specs_order_from_several_processes():
    args = dict(head_dims=[64], dtypes=["fp16", "fp32"], dropouts=[False], lengths=[[37, 37]])
    attention = sys.modules["vilbert_kernels.attention"]
    rows = _check_attention(jobs=3, **args)  # 4 kernels over 3 processes: 2, 1 and 1 of them
    assert [row["kernel"] for row in rows] == [spec.name for spec in attention.sm90_specs(**args)]


@pytest.mark.parametrize("dtypes", [("fp32", "tf32"), pytest.param(("fp16", "bf16"), marks=pytest.mark.slow)])
def test_attention_compiles_without_spills_at_every_tile(dtypes):
    """At head dims 64 and 128, with and without dropout, every kernel at every (queries, keys) tile pair compiles with
    no spill and fits in a Hopper program's 227 KB of shared memory, not only at the square lengths compile_check lists.
    fp32 (exact and TF32) runs by default: each has tiles of its own, and they spilled most; half precision's 168
    kernels take minutes on a cold Triton cache."""
    rows = _check_attention(dtypes=dtypes, lengths=EVERY_TILE)
    assert len(rows) >= 30 * len(dtypes) and all(any(d in row["kernel"] for d in dtypes) for row in rows)
    assert all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]
    too_big = {row["kernel"]: row["shared_bytes"] for row in rows if row["shared_bytes"] > 227 * 1024}
    assert not too_big, too_big


@pytest.mark.parametrize("arch, shared_memory", [(80, 163 * 1024), (89, 99 * 1024)], ids=["A100", "Ada"])
def test_attention_configs_fit_smaller_gpus_shared_memory(arch, shared_memory):
    """On a GPU with less shared memory than Hopper's, the launcher picks tiles that fit it: TF32's one-launch
    backward (a 128-key block, 224 KB at D=128) would not launch on an A100 or an Ada card. Compiled for that GPU's
    arch (spills are not checked: Hopper is the target)."""
    script = f"""
import json, sys
import vilbert_kernels
from vilbert_kernels.compile_check import compile_spec
attention = sys.modules["vilbert_kernels.attention"]
specs = attention.sm90_specs(dtypes=("tf32", "bf16"), dropouts=(True,), lengths=((101, 101), (37, 37)),
                             shared_memory={shared_memory})
print(json.dumps({{spec.name: compile_spec(spec, arch={arch}).metadata.shared for spec in specs}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = json.loads(proc.stdout.splitlines()[-1])
    assert any("tf32" in name and "bwd_dkdv" in name for name in shared)
    too_big = {name: size for name, size in shared.items() if size > shared_memory}
    assert not too_big, too_big


def test_largest_attention_rows_fit_in_shared_memory():
    """Head dim 256 (the largest accepted) in fp32 and bf16: each kernel's tiles fit in the 227 KB of shared memory a
    Hopper program may have, or its launch fails on the GPU (the interpreter has no such limit). The square lengths
    reach each kernel's largest tiles: its blocks grow with the lengths, except fp32's dK/dV query step, which is
    largest at 16 keys. Spills are allowed here: these are not ViLBERT's shapes. (TF32 stays exact fp32 there.)"""
    squares = [(n, n) for n in (16, 32, 64, 101, 1024)]
    rows = _check_attention(head_dims=(256,), dtypes=("fp32", "bf16"), lengths=squares)
    assert any("fp32" in row["kernel"] and "bwd_dkdv" in row["kernel"] for row in rows)
    too_big = {row["kernel"]: row["shared_bytes"] for row in rows if row["shared_bytes"] > 227 * 1024}
    assert not too_big, too_big
