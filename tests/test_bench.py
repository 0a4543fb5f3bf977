"""The benchmark harness (bench/) on the CPU: the CLI's quick mode writes valid outputs, GPU-only providers are
reported skipped (never timed), a wrong provider is reported wrong and not timed, the byte/FLOP counting matches
floors worked out by hand, and the GPU suite script parses and dry-runs.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# bench/ is a directory of the checkout, not an installed package: importable from the repository root only.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common, kernels, ops, targets  # noqa: E402
from bench import model as bench_model  # noqa: E402
GPU_ONLY = {"flex", "flash_attn", "xformers", "ours", "apex"}
# The suites run real shapes for minutes on a GPU; these tests check the CPU quick mode (the GPU run is gpu_suite.sh).
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU quick mode; on a GPU run "
                              "bench/gpu_suite.sh")


def run_cli(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_valid_rows(doc: dict):
    assert doc["device"] == "cpu" and doc["complete"] is True
    for key in ("driver", "torch", "triton", "cuda", "date", "git_commit", "ceilings", "rows"):
        assert key in doc
    assert doc["rows"]
    for row in doc["rows"]:
        assert set(common.ROW_FIELDS) <= set(row)
        assert row["mode"] in common.MODES + ("step",)
        timed = row["ms_p50"] is not None
        assert timed != bool(row["skipped"]), row  # a row is either timed or says why not
        if timed:
            assert row["correct"] is True
            assert 0 < row["ms_p20"] <= row["ms_p50"] <= row["ms_p80"]
        if row["provider"] in GPU_ONLY:  # no GPU here: never a number for them
            assert not timed and row["skipped"], row
        if row["provider"] == "ours":
            assert "speedup_vs_reference" in row and "speedup_vs_" + ("torch" if row["op"] in
                                                                      ("layer_norm", "bias_gelu") else "sdpa") in row


@cpu_only
def test_cli_kernels_quick_writes_json_markdown_and_plot(tmp_path):
    run_cli("kernels", "--quick", "--out", str(tmp_path), "--providers", "sdpa,sdpa_efficient,flex,flash_attn,ours")
    doc = json.loads((tmp_path / "kernels.json").read_text())
    assert_valid_rows(doc)
    rows = doc["rows"]
    providers = {r["provider"] for r in rows}
    assert providers == {"reference", "sdpa", "sdpa_efficient", "flex", "flash_attn", "ours"}
    assert {r["op"] for r in rows} == {"attention", "co_attention"}
    assert {r["dropout_p"] for r in rows} == {0.0, 0.1}
    assert any(r["provider"] == "reference" and r["ms_p50"] for r in rows)
    assert all("GPU" in r["skipped"] for r in rows if r["provider"] in ("flash_attn", "ours"))
    md = (tmp_path / "kernels.md").read_text()
    assert "| co_attention | fwd+bwd |" in md and "| ours |" in md
    assert (tmp_path / "kernels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The targets are GPU targets: on CPU results each one says it was not measured, and the table says why.
    assert targets.main([str(tmp_path)]) == 0
    table = (tmp_path / "targets.md").read_text()
    assert "0 met, 0 short" in table and "device cpu" in table and "no ours row in this run" in table


class WrongAttention(kernels.Reference):
    """The reference with the keys and values swapped: a plausible-looking, wrong result."""
    name = "wrong"

    def attention(self, q, k, v, q_lens, kv_lens, dropout_p):
        return super().attention(q, v, k, q_lens, kv_lens, dropout_p)

    def co_attention(self, t, metas, dropout_p):
        return kernels.Provider.co_attention(self, t, metas, dropout_p)


class WrongGradient(kernels.Reference):
    """The reference's output with twice its gradient: right forward, wrong backward."""
    name = "wrong_grad"

    def attention(self, q, k, v, q_lens, kv_lens, dropout_p):
        out = super().attention(q, k, v, q_lens, kv_lens, dropout_p)
        return 2 * out - out.detach()

    def co_attention(self, t, metas, dropout_p):
        return kernels.Provider.co_attention(self, t, metas, dropout_p)


class IgnoresDropout(kernels.Reference):
    """Right at dropout 0, and the same output at any dropout_p."""
    name = "no_dropout"

    def attention(self, q, k, v, q_lens, kv_lens, dropout_p):
        return super().attention(q, k, v, q_lens, kv_lens, 0.0)

    def co_attention(self, t, metas, dropout_p):
        return super().co_attention(t, metas, 0.0)


@cpu_only
def test_wrong_provider_is_reported_wrong_and_not_timed(tmp_path):
    results = common.Results("kernels", tmp_path, {"device": "cpu"}, {})
    options = common.Options(quick=True, providers=["wrong", "wrong_grad", "no_dropout"],
                             extra_providers=[WrongAttention(), WrongGradient(), IgnoresDropout()])
    kernels.run(results, options, common.Budget(None), {})
    rows = {name: [r for r in results.rows if r["provider"] == name] for name in ("wrong", "wrong_grad")}
    rows["no_dropout"] = [r for r in results.rows if r["provider"] == "no_dropout" and r["dropout_p"] > 0]
    for name, wrong in rows.items():
        assert wrong and all(r["correct"] is False and r["ms_p50"] is None and "not timed" in r["skipped"]
                             for r in wrong), name
    assert all("rel err" in r["check"] for r in rows["wrong"] + rows["wrong_grad"])
    assert all("equals the no-dropout output" in r["check"] for r in rows["no_dropout"])
    assert all(r["correct"] is True and r["ms_p50"] > 0
               for r in results.rows if r["provider"] == "no_dropout" and r["dropout_p"] == 0)
    reference = [r for r in results.rows if r["provider"] == "reference"]
    assert reference and all(r["correct"] is True and r["ms_p50"] > 0 for r in reference)


class ReadsUninitialized(kernels.Reference):
    """The reference plus 0 x torch.empty(...): right wherever fresh memory holds numbers, which a kernel that skips
    some outputs could rely on by luck (the caching allocator hands back another provider's freed output)."""
    name = "uninitialized"

    def attention(self, q, k, v, q_lens, kv_lens, dropout_p):
        out = super().attention(q, k, v, q_lens, kv_lens, dropout_p)
        return out + 0 * torch.empty(out.shape, dtype=out.dtype, device=out.device)


@cpu_only
def test_check_poisons_fresh_memory(tmp_path):
    empty = torch.empty
    results = common.Results("kernels", tmp_path, {"device": "cpu"}, {})
    options = common.Options(quick=True, providers=["uninitialized"], extra_providers=[ReadsUninitialized()])
    kernels.run(results, options, common.Budget(None), {})
    rows = [r for r in results.rows if r["provider"] == "uninitialized" and r["op"] == "attention"]
    assert rows and all(r["correct"] is False for r in rows)
    assert torch.empty is empty  # restored after the checks


class PackedReference(kernels.Provider):
    """The reference behind the packed (total_tokens, H, D) layout that flash_attn and xformers take."""
    name = "packed"
    packed = True

    def stream_meta(self, lens, length, batch, device):
        lens = torch.full((batch,), length) if lens is None else lens
        return torch.arange(length)[None, :] < lens[:, None]  # (B, L) valid positions

    def attention(self, q, k, v, q_valid, kv_valid, dropout_p):
        from vilbert_kernels import reference
        q, k, v = kernels.unpack(q, q_valid), kernels.unpack(k, kv_valid), kernels.unpack(v, kv_valid)
        out = reference.attention(q, k, v, q_valid.sum(1), kv_valid.sum(1), dropout_p)
        return kernels.pack(out, q_valid)


class GarbageAtPadding(kernels.Provider):
    """The reference with 7.0 in its padded query rows: what a provider puts there is its own (SDPA's masks give
    those rows real attention outputs); the cotangents there are zero."""
    name = "garbage_at_padding"

    def attention(self, q, k, v, q_lens, kv_lens, dropout_p):
        from vilbert_kernels import reference
        out = reference.attention(q, k, v, q_lens, kv_lens, dropout_p)
        if q_lens is None:
            return out
        padded = torch.arange(out.shape[1])[None, :] >= q_lens[:, None]  # (B, Lq)
        return torch.where(padded[:, :, None, None], torch.full_like(out, 7.0), out)


@cpu_only
def test_packed_layout_and_padding_rows_are_the_providers_own(tmp_path):
    results = common.Results("kernels", tmp_path, {"device": "cpu"}, {})
    options = common.Options(quick=True, providers=["packed", "garbage_at_padding"],
                             extra_providers=[PackedReference(), GarbageAtPadding()])
    kernels.run(results, options, common.Budget(None), {})
    for name in ("packed", "garbage_at_padding"):
        rows = [r for r in results.rows if r["provider"] == name]
        assert rows and all(r["correct"] is True and r["ms_p50"] > 0 for r in rows), rows


@cpu_only
def test_tile_candidates_run_beside_ours_at_the_square_shapes(tmp_path):
    """Ours with each candidate's tiles (in Triton's interpreter here): checked and timed at the square shapes only,
    and our default rows say how they compare."""
    names = [f"ours_tiles_{label}" for label in kernels.LONG_TILE_CANDIDATES]
    run_cli("kernels", "--quick", "--interpret", "--out", str(tmp_path), "--providers", ",".join(["ours", *names]))
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    for name in names:
        square = [r for r in rows if r["provider"] == name and r["shape"]["family"] == "square"]
        assert square and all(r["correct"] is True and r["ms_p50"] > 0 for r in square), square
        assert all("square shapes only" in r["skipped"] for r in rows
                   if r["provider"] == name and r["shape"]["family"] != "square")
        ours_square = [r for r in rows if r["provider"] == "ours" and r["shape"]["family"] == "square"]
        assert ours_square and all(r[f"speedup_vs_{name}"] for r in ours_square)


TILE_COMPILE_SCRIPT = """
import json, sys
from bench.kernels import LONG_TILE_CANDIDATES
from vilbert_kernels import compile_check
from vilbert_kernels.kernel_spec import KernelSpec
attention = sys.modules["vilbert_kernels.attention"]
kernels = {"fwd": attention._attention_fwd_kernel, "bwd_dkdv": attention._attention_bwd_dkdv_kernel,
           "bwd_dq": attention._attention_bwd_dq_kernel}
specs = []
for label, configs in LONG_TILE_CANDIDATES.items():
    for short, config in configs.items():
        constexprs = dict(DROPOUT=False, HEAD_DIM=64, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
                          DOT_PRECISION="tf32")
        if short == "bwd_dkdv":
            constexprs["FUSED_DQ"] = False  # the square shapes have more keys than a dK/dV block
        fn = kernels[short]
        specs.append(KernelSpec(f"{label}:{short}", fn, attention._signature(fn, "bf16", constexprs), constexprs,
                                num_warps=config["num_warps"], num_stages=config["num_stages"]))
print(json.dumps(compile_check.check(specs)))
"""


def test_tile_candidates_compile_for_sm90_without_spills():
    """The candidates as the square shapes run them (bf16, head dim 64, full lengths, no dropout)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", TILE_COMPILE_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 3 * len(kernels.LONG_TILE_CANDIDATES)
    assert all(row["ok"] and row["mma"] == "HGMMA" for row in rows), rows


@cpu_only
def test_budget_reports_remaining_cases_skipped(tmp_path):
    results = common.Results("kernels", tmp_path, {"device": "cpu"}, {})
    kernels.run(results, common.Options(quick=True, providers=["reference"]), common.Budget(-1.0), {})
    assert results.rows and all(r["ms_p50"] is None and "budget" in r["skipped"] for r in results.rows)


@cpu_only
def test_ops_quick(tmp_path):
    results = common.Results("ops", tmp_path, {"device": "cpu"}, {})
    ops.run(results, common.Options(quick=True), common.Budget(None), {})
    rows = results.rows
    assert {r["op"] for r in rows} == {"layer_norm", "bias_gelu"}
    assert all(r["correct"] and r["ms_p50"] > 0 for r in rows if r["provider"] in ("reference", "torch"))
    assert all(r["skipped"] for r in rows if r["provider"] in GPU_ONLY | {"reference_compiled"})


@cpu_only
def test_ops_compiled_reference_runs_every_mode(tmp_path):
    """torch.compile's LayerNorm backward donates its saved buffers unless told not to, and then refuses the bwd rows'
    backward(retain_graph=True): the suite must time every mode of every case (~10 s of CPU compiling)."""
    import torch._functorch.config
    donation = torch._functorch.config.donated_buffer
    results = common.Results("ops", tmp_path, {"device": "cpu"}, {})
    ops.run(results, common.Options(quick=True, cpu_compile=True, providers=["reference_compiled"]),
            common.Budget(None), {})
    compiled = [r for r in results.rows if r["provider"] == "reference_compiled"]
    assert {(r["op"], r["mode"]) for r in compiled} == {(op, mode) for op in ("layer_norm", "bias_gelu")
                                                          for mode in common.MODES}
    assert all(r["correct"] and r["ms_p50"] > 0 for r in compiled), [r["skipped"] for r in compiled]
    assert torch._functorch.config.donated_buffer == donation  # the model suite's compiled step keeps its setting


def test_ops_quick_gpu_cases_are_the_widths_vilbert_runs():
    """LayerNorm at the text and image widths (768, 1024); bias + GELU at the text and image FFN widths (3072, 1024)."""
    widths = {(c.op, c.C) for c in ops.cases(on_gpu=True, quick=True)}
    assert widths == {("layer_norm", 768), ("layer_norm", 1024), ("bias_gelu", 3072), ("bias_gelu", 1024)}


@cpu_only
@pytest.mark.skipif(importlib.util.find_spec("vilbert.model") is None, reason="vilbert.model not written yet")
def test_model_quick(tmp_path):
    results = common.Results("model", tmp_path, {"device": "cpu"}, {})
    bench_model.run(results, common.Options(quick=True, providers=["reference"]), common.Budget(None), {})
    (row,) = [r for r in results.rows if r["provider"] == "reference"]
    if row["skipped"]:
        pytest.skip(f"the model does not run yet: {row['skipped']}")
    assert row["correct"] and row["ms_p50"] > 0 and row["samples_per_s"] > 0 and row["model_tflop_per_step"] > 0
    assert row["shape"]["B"] == row["batch_size"]


def test_counting_matches_floors_worked_by_hand():
    # Co-attention pretraining B=256 T=36 V=37 8x128 bf16: 154 MB forward, 307 MB backward, 2.8 GFLOP.
    case = kernels.Case("co_attention", "pretraining", 256, 8, 128, 36, 37, True, 0.1)
    assert kernels.min_bytes(case, "fwd", 2) / 1e6 == pytest.approx(154, rel=0.01)
    assert kernels.min_bytes(case, "bwd", 2) / 1e6 == pytest.approx(307, rel=0.01)
    assert kernels.flops(case, "fwd") / 1e9 == pytest.approx(2.8, rel=0.02)
    assert kernels.flops(case, "fwd+bwd") == 3.5 * kernels.flops(case, "fwd")
    # Text self-attention B=256 L=36 12x64: forward 4 sets of 14.2 MB (57 MB) + LSE.
    text = kernels.Case("attention", "pretraining", 256, 12, 64, 36, 36, True, 0.0)
    assert kernels.min_bytes(text, "fwd", 2) / 1e6 == pytest.approx(57, rel=0.02)


def test_model_flops_match_a_count_by_hand():
    vilbert = pytest.importorskip("vilbert")
    config = vilbert.ViLBERTConfig.preset("vilbert-base")
    # ~47 GFLOP per sample for forward + backward with ~5 masked tokens
    assert bench_model.model_flops_per_sample(config, 36, 37, 5) / 1e9 == pytest.approx(47, rel=0.03)


def test_make_inputs_ragged_lengths_and_masked_cotangents():
    case = kernels.Case("co_attention", "pretraining", 64, 2, 16, 36, 37, True, 0.0)
    inputs = kernels.make_inputs(case, torch.float32, torch.device("cpu"), seed=3)
    text, image = inputs.lens["text"], inputs.lens["image"]
    assert text.min() >= 2 and text.max() <= 36 and 0.45 < text.float().mean() / 36 < 0.75
    assert image.min() >= 11 and image.max() <= 37
    for dout, stream in zip(inputs.douts, inputs.out_streams):
        assert (dout[~inputs.valid(stream)] == 0).all()
    assert all(t.abs().sum() > 0 for t in inputs.tensors.values())  # never benchmark on zeros


def test_add_speedups():
    shape = {"B": 1}
    rows = [common.make_row(op="a", mode="fwd", shape=shape, dtype="bf16", dropout_p=0.0, provider=p, ms_p50=t,
                            correct=c) for p, t, c in (("reference", 3.0, True), ("sdpa", None, None),
                                                      ("flash_attn", 1.0, True), ("broken", 0.5, False),
                                                      ("ours", 1.5, True))]
    common.add_speedups(rows)
    ours = rows[-1]
    assert ours["speedup_vs_reference"] == 2.0 and ours["speedup_vs_sdpa"] is None
    assert ours["speedup_vs_flash_attn"] == pytest.approx(0.667, abs=1e-3)
    assert "speedup_vs_broken" not in ours  # a wrong provider is no baseline
    # The same case at another dropout is another measurement: no speedup across them.
    other_p = common.make_row(op="a", mode="fwd", shape=shape, dtype="bf16", dropout_p=0.1, provider="xformers",
                              ms_p50=0.1, correct=True)
    common.add_speedups(rows + [other_p])
    assert "speedup_vs_xformers" not in ours


def test_quantiles_interpolate_like_torch():
    times = [4.0, 1.0, 3.0, 2.0, 10.0]
    expected = torch.quantile(torch.tensor(times, dtype=torch.float64), torch.tensor(common.QUANTILES,
                                                                                   dtype=torch.float64))
    assert common.quantiles_ms(times) == pytest.approx(expected.tolist())
    assert common.quantiles_ms([1.0, 2.0]) == pytest.approx((1.5, 1.2, 1.8))


def test_rel_error_and_tolerance():
    ref = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = torch.tensor([[1.0, 2.0], [99.0, float("nan")]])
    assert common.rel_error(out, ref, torch.tensor([True, False])) == 0.0  # only the rows the mask keeps
    assert common.rel_error(out, ref) == float("inf")  # NaN in the compared part never passes
    assert common.rel_error(ref * 1.01, ref) == pytest.approx(0.01)
    # factor x PyTorch's own error in the dtype, plus the dtype's floor
    assert common.tolerance(torch.bfloat16, 0.01, 2.0) == pytest.approx(0.025)
    assert common.tolerance(torch.float32, 1e-6, 3.0) == pytest.approx(1.003e-3)


def test_git_commit_marks_a_dirty_checkout(monkeypatch):
    def fake_git(status, head_rc=0):
        def run(cmd, **kwargs):
            out = "abc123\n" if "rev-parse" in cmd else status
            return subprocess.CompletedProcess(cmd, head_rc if "rev-parse" in cmd else 0, stdout=out, stderr="")
        return run
    monkeypatch.setattr(common.subprocess, "run", fake_git(""))
    assert common.git_commit() == "abc123"
    monkeypatch.setattr(common.subprocess, "run", fake_git(" M kernels/attention.py\n"))
    assert common.git_commit() == "abc123-dirty"
    monkeypatch.setattr(common.subprocess, "run", fake_git("", head_rc=128))  # no .git: the suite's environment
    monkeypatch.setenv("BENCH_GIT_COMMIT", "def456")
    assert common.git_commit() == "def456"


@cpu_only
def test_time_ms_cpu_never_zero():
    p50, p20, p80 = common.time_ms(lambda: torch.randn(64, 64) @ torch.randn(64, 64), quick=True)
    assert 0 < p20 <= p50 <= p80
    # grad_to_none: every timed call starts without the gradients of the one before (no accumulation timed)
    x = torch.ones(8, requires_grad=True)
    calls = []

    def backward():
        calls.append(x.grad is None)
        x.sum().backward()
    common.time_ms(backward, grad_to_none=[x], quick=True)
    assert calls[1:] == [True] * (len(calls) - 1) and len(calls) > 2


def test_gpu_suite_parses_and_dry_runs(tmp_path):
    script = ROOT / "bench" / "gpu_suite.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "prepare_wheels.sh")], check=True)
    proc = subprocess.run(["bash", str(script), str(tmp_path / "out"), "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    for step in ("install_project", "pytest_gpu", "pytest_kernels", "bench_kernels", "bench_ops", "bench_model",
                 "pretrain_gpu"):
        assert f"{step} rc=0" in summary
    log = (tmp_path / "out" / "logs" / "bench_kernels.log").read_text()
    assert "-m bench kernels" in log and "--out" in log and "--budget-s" in log
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_targets_verdicts():
    assert targets.OURS == common.OURS  # targets.py keeps its own copy so that it needs no torch

    def row(provider, mode, ms, op="co_attention", family="pretraining", dropout_p=0.1, **fields):
        shape = {"family": family, "B": 256, "T": 36, "V": 37} if op == "co_attention" else \
            {"family": family, "B": 8, "Lq": 2048, "Lk": 2048}
        return common.make_row(op=op, mode=mode, shape=shape, dtype="bf16", dropout_p=dropout_p, provider=provider,
                               ms_p50=ms, correct=ms is not None or None, **fields)

    rows = [row("reference", "fwd+bwd", 4.0), row("sdpa", "fwd+bwd", 1.2),
            common.skipped_row("flash_attn is not installed", op="co_attention", mode="fwd+bwd", dtype="bf16",
                               shape={"family": "pretraining"}, dropout_p=0.1, provider="flash_attn"),
            row(common.OURS, "fwd+bwd", 1.0), row(common.OURS, "fwd", 0.1, pct_of_copy_bw=80.0),
            row(common.OURS, "bwd", 0.2, pct_of_copy_bw=60.0),
            row("sdpa_flash", "fwd", 1.0, op="attention", family="square", dropout_p=0.0),
            row(common.OURS, "fwd", 1.3, op="attention", family="square", dropout_p=0.0)]
    common.add_speedups(rows)
    model = [common.make_row(op="train_step:vilbert-base", mode="step", shape={"preset": "vilbert-base", "B": b},
                             dtype="bf16", dropout_p=0.1, provider=p, ms_p50=ms, correct=True, samples_per_s=sps,
                             peak_mem_mb=mem)
             for p, b, ms, sps, mem in (("reference", 128, 100.0, 1280.0, 70000.0), (common.OURS, 256, 100.0, 2560.0,
                                        50000.0), ("reference_compiled", 256, 90.0, 2800.0, 40000.0))]
    results = {(r["shape"], r["target"]): r for r in targets.evaluate({"rows": rows}, {"rows": model})}
    verdict = {key: r["verdict"] for key, r in results.items()}
    pre = "co_attention pretraining"
    assert verdict[pre, "fwd+bwd p=0.1 vs reference"] == "met"  # 4.0x >= 3
    assert verdict[pre, "fwd+bwd p=0.1 vs sdpa"] == "SHORT"  # 1.2x < 1.5
    assert verdict[pre, "fwd+bwd p=0.1 vs flash_attn"] == ("not measured: flash_attn skipped: flash_attn is not "
                                                           "installed")
    assert verdict[pre, "fwd p=0.1 share of the bandwidth floor"] == "met"
    assert verdict[pre, "bwd p=0.1 share of the bandwidth floor"] == "SHORT"
    assert verdict["co_attention downstream", "fwd+bwd p=0.1 vs reference"] == "not measured: no ours row in this run"
    square = "attention square L=2048"
    assert results[square, "fwd p=0 vs sdpa_flash"]["measured"] == pytest.approx(0.769, abs=1e-3)
    assert verdict[square, "fwd p=0 vs sdpa_flash"] == "SHORT"
    assert verdict["attention square L=1024", "fwd p=0 vs sdpa_flash"].startswith("not measured")
    step = "vilbert-base training step"
    # samples/s, not step time: the reference ran at half the batch in the same time
    assert results[step, "samples/s vs reference"]["measured"] == 2.0
    assert verdict[step, "samples/s vs reference"] == "met"
    assert verdict[step, "samples/s vs reference_compiled"] == "SHORT"
    assert verdict[step, "peak memory vs reference"] == "met" and verdict[step, "peak memory vs reference_compiled"] \
        == "SHORT"
    table = targets.markdown(list(results.values()), [])
    assert "4 met, 5 short" in table
    # The goals are the issue's, and reaching one exactly meets it.
    goals = {target: r["goal"] for (shape, target), r in results.items() if shape == pre}
    assert goals == {"fwd+bwd p=0.1 vs reference": ">= 3", "fwd+bwd p=0.1 vs sdpa": ">= 1.5",
                     "fwd+bwd p=0.1 vs flash_attn": ">= 1.2", "fwd p=0.1 share of the bandwidth floor": ">= 75",
                     "bwd p=0.1 share of the bandwidth floor": ">= 65"}
    assert results[square, "fwd p=0 vs sdpa_flash"]["goal"] == ">= 0.8"
    assert [results[step, t]["goal"] for t in ("samples/s vs reference", "samples/s vs reference_compiled",
                                                "peak memory vs reference")] == [">= 1.5", ">= 1.2", "<= 1"]
    assert targets._result("t", "s", 1.5, 1.5, "x")["verdict"] == "met"
    assert targets._result("t", "s", 1.0, 1.0, "x", at_most=True)["verdict"] == "met"
    # A run killed before it wrote its speedup columns still has its times: the ratio comes from them.
    for r in rows:
        for key in [k for k in r if k.startswith("speedup_vs_")]:
            del r[key]
    again = {(r["shape"], r["target"]): r for r in targets.evaluate({"rows": rows}, None)}
    assert again[pre, "fwd+bwd p=0.1 vs reference"]["measured"] == 4.0
    assert again[square, "fwd p=0 vs sdpa_flash"]["measured"] == pytest.approx(0.769, abs=1e-3)
