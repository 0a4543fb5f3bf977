"""Suite `ops`: the fused element-wise ops, forward / backward / forward+backward, against PyTorch and apex.

  layer_norm  LayerNorm(dropout(x) + residual), dropout 0 and 0.1 (BERT's output block after the dense bias);
  bias_gelu   exact-erf GELU(x + bias).
Shapes: rows = 256*36 (pretraining tokens) and 128*101 (downstream regions), C = 768, 1024, 3072; weights in x's dtype.

Bytes (the minimum; no FLOP count: these ops are memory-bound by a wide margin):
  layer_norm  fwd reads x and residual, writes y and fp32 mean/rstd; bwd reads dy, one saved (N, C) input and the
              stats, writes dx and dresidual (the dropout mask regenerated, never stored);
  bias_gelu   fwd reads x, writes y; bwd reads dy and x, writes dx; (C,) vectors not counted.
Correctness as in the kernels suite: dropout 0, the benchmark dtype, against the reference in fp32; tolerance 2x (3x
for gradients) the reference's own error in that dtype plus a floor; dropout rows also need an output that differs.
"""
import importlib
import traceback
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import common
from .common import OURS, Skip

EPS = 1e-12


@dataclass(frozen=True)
class Case:
    op: str  # "layer_norm" | "bias_gelu"
    family: str
    rows: int
    C: int
    dropout_p: float

    def shape(self) -> dict:
        return {"family": self.family, "rows": self.rows, "C": self.C}

    def without_dropout(self) -> "Case":
        return Case(self.op, self.family, self.rows, self.C, 0.0)


def cases(on_gpu: bool, quick: bool) -> List[Case]:
    rows = [("pretraining", 256 * 36), ("downstream", 128 * 101)] if on_gpu else [("tiny", 37)]
    widths = (768, 1024, 3072) if on_gpu else (32, 96)
    out = [Case("layer_norm", fam, n, C, p) for p in (0.1, 0.0) for fam, n in rows for C in widths]
    out += [Case("bias_gelu", fam, n, C, 0.0) for fam, n in rows for C in widths]
    if quick and on_gpu:  # the widths where each op runs in ViLBERT: LayerNorm at 768/1024, GELU at 3072/1024
        out = [c for c in out if c.C in ((768, 1024) if c.op == "layer_norm" else (3072, 1024))]
    return out


def make_inputs(case: Case, dtype, device, seed: int) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device, dtype)

    if case.op == "layer_norm":
        tensors = {"x": randn(case.rows, case.C), "residual": randn(case.rows, case.C),
                   "weight": randn(case.C, scale=0.1, shift=1.0), "bias": randn(case.C, scale=0.1)}
    else:
        tensors = {"x": randn(case.rows, case.C), "bias": randn(case.C, scale=0.1)}
    return tensors, randn(case.rows, case.C)


# ----------------------------------------------------------------------------------------------------------------------
# Providers: name -> (ops it covers, builder(op) -> fn(tensors, dropout_p)); builders raise Skip when unavailable


def _reference(op):
    from vilbert_kernels import reference
    if op == "layer_norm":
        return lambda t, p: reference.layer_norm(t["x"], t["weight"], t["bias"], EPS, t["residual"], p)
    return lambda t, p: reference.bias_gelu(t["x"], t["bias"])


def _torch(op):
    # What a PyTorch user writes: the native layer_norm kernel in the input dtype (the reference upcasts first).
    return lambda t, p: F.layer_norm(F.dropout(t["x"], p) + t["residual"], (t["x"].shape[-1],), t["weight"],
                                     t["bias"], EPS)


def _compiled(op):
    return torch.compile(_reference(op), dynamic=False)


def _apex(op):
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    except ImportError as e:
        raise Skip(f"apex not importable ({e}); NVIDIA's apex is built from source (github.com/NVIDIA/apex), "
                   "PyPI's 'apex' is another project") from None
    # apex fuses the normalization only; dropout and the residual add stay in eager PyTorch.
    return lambda t, p: fused_layer_norm_affine(F.dropout(t["x"], p) + t["residual"], t["weight"], t["bias"],
                                                (t["x"].shape[-1],), EPS)


def _ours(op):
    try:
        fn = getattr(importlib.import_module(f"vilbert_kernels.{op}"), op)
    except (ImportError, AttributeError) as e:
        raise Skip(f"vilbert_kernels.{op} not importable: {e}") from None
    if op == "layer_norm":
        return lambda t, p: fn(t["x"], t["weight"], t["bias"], EPS, t["residual"], p)
    return lambda t, p: fn(t["x"], t["bias"])


@dataclass
class Provider:
    name: str
    ops: Tuple[str, ...]
    build: Callable[[str], Callable]
    compiled: bool = False
    needs_gpu: bool = False


def providers() -> List[Provider]:
    both = ("layer_norm", "bias_gelu")
    return [Provider("reference", both, _reference), Provider("torch", ("layer_norm",), _torch),
            Provider("reference_compiled", both, _compiled, compiled=True),
            Provider("apex", ("layer_norm",), _apex, needs_gpu=True), Provider(OURS, both, _ours, needs_gpu=True)]


# ----------------------------------------------------------------------------------------------------------------------
# The suite


def results_of(fn, tensors, dout, dropout_p, dtype):
    """(output, grads) of fn on fresh leaves cast to dtype."""
    leaves = {n: t.detach().to(dtype).requires_grad_() for n, t in tensors.items()}
    out = fn(leaves, dropout_p)
    out.backward(dout.to(dtype))
    return out.detach().float(), {n: t.grad.float() for n, t in leaves.items()}


def check(fn, tensors, dout, truth, low_precision, dtype) -> Tuple[bool, str]:
    out, grads = results_of(fn, tensors, dout, 0.0, dtype)
    worst, verdict = [], True
    for name, got, ref, lp, factor in [("out", out, truth[0], low_precision[0], 2.0)] + [
            (f"d{n}", grads[n], truth[1][n], low_precision[1][n], 3.0) for n in grads]:
        err = common.rel_error(got, ref)
        tol = common.tolerance(dtype, common.rel_error(lp, ref), factor)
        verdict &= err <= tol
        worst.append((err / tol, f"{name} rel err {err:.2e} (tol {tol:.1e})"))
    return bool(verdict), "vs fp32 reference at dropout 0: worst " + max(worst)[1]


def min_bytes(case: Case, mode: str, elem: int) -> float:
    tensor = case.rows * case.C * elem
    if case.op == "layer_norm":
        stats = 2 * case.rows * 4
        fwd, bwd = 3 * tensor + stats, 4 * tensor + stats
    else:
        fwd, bwd = 2 * tensor, 3 * tensor
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def run(results: common.Results, options: common.Options, budget: common.Budget, ceilings: dict) -> None:
    # The bwd rows time backward(retain_graph=True), which a torch.compile backward that donates its saved buffers
    # refuses (LayerNorm's does): donation off for this suite only, not for the model suite's compiled step.
    import torch._functorch.config
    with torch._functorch.config.patch(donated_buffer=False):
        _run(results, options, budget, ceilings)


def _run(results: common.Results, options: common.Options, budget: common.Budget, ceilings: dict) -> None:
    dev = common.device()
    on_gpu = dev.type == "cuda"
    dtype = options.dtype if on_gpu else torch.float32
    common.raise_recompile_limit()
    everyone = [p for p in providers() if not options.providers or p.name in options.providers
                or p.name == "reference"] + list(options.extra_providers)
    verdicts: Dict[tuple, Tuple[bool, str]] = {}
    all_cases = cases(on_gpu, options.quick)
    # As in the kernels suite: the torch.compile providers in a second pass, so a time budget cuts them first.
    for group in ([p for p in everyone if not p.compiled], [p for p in everyone if p.compiled]):
        for case in all_cases:
            base = dict(op=case.op, shape=case.shape(), dtype=common.DTYPE_NAMES[dtype], dropout_p=case.dropout_p)
            tensors = truth = None
            for provider in (p for p in group if case.op in p.ops):
                reason = common.skip_reason(provider.name, provider.compiled, provider.needs_gpu, on_gpu, options,
                                            budget)
                if reason:
                    for mode in common.MODES:
                        results.add(common.skipped_row(reason, mode=mode, provider=provider.name, **base))
                    continue
                if tensors is None:
                    seed = zlib.crc32(repr(case.without_dropout()).encode())
                    tensors, dout = make_inputs(case, dtype, dev, seed)
                    truth = [results_of(_reference(case.op), tensors, dout, 0.0, dt) for dt in (torch.float32, dtype)]
                for row in run_provider(provider, case, tensors, dout, truth, verdicts, ceilings, options.quick,
                                        dtype):
                    results.add({**row, **base})
    names = [p.name for p in everyone]
    results.rows.sort(key=lambda r: (all_cases.index(Case(r["op"], r["shape"]["family"], r["shape"]["rows"],
                                                          r["shape"]["C"], r["dropout_p"])),
                                     names.index(r["provider"]), common.MODES.index(r["mode"])))
    common.add_speedups(results.rows, SPEEDUP_BASELINES)



def run_provider(provider, case, tensors, dout, truth, verdicts, ceilings, quick, dtype) -> List[dict]:
    try:
        fn = provider.build(case.op)
        key = (case.without_dropout(), provider.name)
        if key not in verdicts:
            with common.poisoned_empty(not provider.compiled):
                verdicts[key] = check(fn, tensors, dout, *truth, dtype)
        correct, summary = verdicts[key]
        note = None
        leaves = {n: t.detach().requires_grad_() for n, t in tensors.items()}
        if correct and case.dropout_p > 0:
            diff = common.rel_error(fn(leaves, case.dropout_p), fn(leaves, 0.0))
            if not 1e-3 < diff < float("inf"):
                correct, summary = False, f"dropout_p={case.dropout_p} output: rel diff {diff:.1e} from dropout 0"
            else:
                note = "checked at dropout 0 on the same inputs; the dropout output differs from that one"
        if not correct:
            return [common.make_row(mode=m, provider=provider.name, correct=False, check=summary,
                                    skipped="wrong result: not timed") for m in common.MODES]
        rows = []
        for mode in common.MODES:
            if mode == "fwd":
                def call():
                    return fn(leaves, case.dropout_p)
            elif mode == "bwd":
                out = fn(leaves, case.dropout_p)

                def call():
                    out.backward(dout, retain_graph=True)
            else:
                def call():
                    fn(leaves, case.dropout_p).backward(dout)
            mem = common.peak_mem_mb(call)
            p50, p20, p80 = common.time_ms(call, grad_to_none=list(leaves.values()), quick=quick)
            gbps = min_bytes(case, mode, dout.element_size()) / p50 / 1e6
            copy = ceilings.get("copy_gbps")
            rows.append(common.make_row(
                mode=mode, provider=provider.name, ms_p50=p50, ms_p20=p20, ms_p80=p80, gbps=gbps,
                pct_of_copy_bw=100 * gbps / copy if copy else None, peak_mem_mb=mem, correct=True, check=summary,
                note=note))
        return rows
    except Skip as e:
        return [common.skipped_row(str(e), mode=m, provider=provider.name) for m in common.MODES]
    except Exception as e:  # one broken provider must not end the suite
        traceback.print_exc()  # the row keeps one line; the log keeps the whole story
        msg = f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:400]
        return [common.skipped_row(msg, mode=m, provider=provider.name) for m in common.MODES]


def plot_x(row: dict) -> Optional[float]:
    return row["shape"]["C"]


SPEEDUP_BASELINES = ("reference", "torch")  # speedup_vs_<these> always present on our rows
X_LABEL = "C (hidden size)"

METHOD = {
    "timing": "GPU: triton.testing.do_bench (CUDA events, warm-up, L2 flushed before each call, grads reset), "
              "median and p20/p80; CPU: perf_counter, proves the harness only",
    "gbps": "minimal bytes / time: layer_norm fwd reads x, residual, writes y + fp32 mean/rstd; bwd reads dy, one "
            "saved input, stats, writes dx, dresidual; bias_gelu fwd reads x writes y, bwd reads dy, x writes dx",
    "correct": "dropout 0, benchmark dtype vs the reference in fp32 (output and every grad); tolerance 2x (3x grads) "
               "the reference's own error in that dtype + floor; dropout rows also need an output that differs",
    "providers": "reference = vilbert_kernels.reference (upcasts to fp32); torch = native F.layer_norm in the input "
                 "dtype; apex = dropout + add in PyTorch, then apex's fused LayerNorm",
}
