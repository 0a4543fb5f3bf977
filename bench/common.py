"""What every suite shares: the environment record, timing, the two ceilings, correctness checks, rows and outputs.

Timing (GPU): `triton.testing.do_bench` -- CUDA events around each call, warm-up first, the L2 cache flushed before
every call, gradients reset to None between calls, median and 20th/80th percentiles of many calls. On the CPU the
harness times with `time.perf_counter` only to prove it runs: CPU rows are labelled device "cpu" and say nothing about
GPU speed.

Ceilings, measured in the same run: the copy bandwidth of a 1 GiB device-to-device copy (bytes read + written) and the
bf16 matmul rate of an 8192^3 product on random data. Kernel rows give GB/s against the minimal bytes moved and the
percentage of that copy bandwidth; model rows give MFU against that matmul rate.
"""
import contextlib
import datetime
import json
import math
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

# Every row carries these keys (None where they do not apply); `speedup_vs_<provider>` keys are added on our rows.
ROW_FIELDS = ("op", "mode", "shape", "dtype", "dropout_p", "provider", "ms_p50", "ms_p20", "ms_p80", "tflops", "gbps",
              "pct_of_copy_bw", "peak_mem_mb", "correct", "check", "skipped")
MODES = ("fwd", "bwd", "fwd+bwd")
OURS = "ours"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class Options:
    """What the CLI passes to every suite."""
    quick: bool = False
    dtype: torch.dtype = torch.bfloat16  # GPU rows; the CPU always runs fp32
    interpret: bool = False  # CPU only: run our Triton kernels in Triton's interpreter (correctness, not speed)
    cpu_compile: bool = False  # CPU only: run the torch.compile providers too (minutes of compilation)
    providers: Optional[Sequence[str]] = None  # provider names to run (the reference always runs); None = all
    batch_size: Optional[int] = None  # model suite: the batch size to try first
    extra_providers: Sequence = field(default_factory=tuple)  # tests inject providers here


class Skip(Exception):
    """A provider or case that cannot run here; the message is the reason written into the row."""


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------------------------------
# Environment record


def git_commit() -> Optional[str]:
    """HEAD of the checkout (with '-dirty' when it has changes), or $BENCH_GIT_COMMIT where there is no .git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("BENCH_GIT_COMMIT") or None


def _package_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _driver_version() -> Optional[str]:
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info() -> dict:
    """The top-level record of a run: what it ran on and with which software."""
    dev = device()
    info = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "device_type": dev.type,
        "driver": _driver_version() if dev.type == "cuda" else None,
        "torch": torch.__version__,
        # The version from the package metadata, so that recording it never imports triton (TRITON_INTERPRET must be
        # decided before the first import).
        "triton": _package_version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["sm_count"] = props.multi_processor_count
        info["gpu_mem_gb"] = round(props.total_memory / 2**30, 1)
    return info


def default_out_dir(info: dict) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")
    return Path(__file__).resolve().parent / "results" / f"{info['date'][:10]}-{slug}"


# ----------------------------------------------------------------------------------------------------------------------
# Timing and memory

QUANTILES = (0.5, 0.2, 0.8)


def time_ms(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = (), quick: bool = False):
    """(median, p20, p80) milliseconds of fn(). GPU: do_bench (events, warm-up, L2 flush). CPU: perf_counter."""
    if device().type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (10, 30) if quick else (25, 100)
        p50, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(grad_to_none) or None,
                                 quantiles=list(QUANTILES))
        return float(p50), float(p20), float(p80)
    fn()  # warm-up
    times = []
    for _ in range(3 if quick else 10):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return quantiles_ms(times)


def quantiles_ms(times: Sequence[float]):
    """(median, p20, p80) of a list of times, interpolated like torch.quantile."""
    ordered = sorted(times)

    def q(p):
        pos = p * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return tuple(float(q(p)) for p in QUANTILES)


def peak_mem_mb(fn: Callable[[], object]) -> Optional[float]:
    """Peak allocated memory during one fn() above what was allocated before it (None on the CPU)."""
    if device().type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return round(peak / 2**20, 1)


def raise_recompile_limit(limit: int = 256) -> None:
    """torch.compile recompiles a function once per benchmark shape; past its default limit (8) it would silently run
    eager code under the compiled provider's name."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True  # an error row rather than eager under a false name


def measure_ceilings(quick: bool = False) -> dict:
    """The copy bandwidth (GB/s, read + written) and bf16 matmul rate (TFLOP/s) of this card, on random data."""
    if device().type != "cuda":
        return {"copy_gbps": None, "bf16_matmul_tflops": None,
                "note": "no GPU: ceilings are measured only on a GPU"}
    ceilings = {"copy_gbps": round(_copy_gbps(quick), 1), "bf16_matmul_tflops": round(_matmul_tflops(quick), 1),
                "note": "1 GiB device-to-device copy (read + write); 8192^3 bf16 matmul on random data"}
    torch.cuda.empty_cache()
    return ceilings


def _copy_gbps(quick: bool) -> float:
    src = torch.randn(2**28, device="cuda")  # 1 GiB of fp32
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), quick=quick)[0]
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _matmul_tflops(quick: bool, n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, quick=quick)[0]
    return 2 * n**3 / ms / 1e9


# ----------------------------------------------------------------------------------------------------------------------
# Correctness


@contextlib.contextmanager
def poisoned_empty(enabled: bool = True):
    """For a provider's correctness check: every floating torch.empty comes back full of NaN, so an element a kernel
    never writes cannot pass the check by inheriting a correct value from the block the caching allocator hands back
    (another provider's freed output of the same size). Not for torch.compile providers (it would be traced)."""
    if not enabled:
        yield
        return
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real_empty


def rel_error(out: torch.Tensor, ref: torch.Tensor, row_mask: Optional[torch.Tensor] = None) -> float:
    """||out - ref|| / ||ref|| in float64 over the rows where row_mask (B, L) is True (all rows when None).

    NaN anywhere in the compared part gives inf, so it never passes.
    """
    out, ref = out.detach().double(), ref.detach().double()
    if row_mask is not None:
        out, ref = out[row_mask], ref[row_mask]
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def tolerance(dtype: torch.dtype, reference_error: float, factor: float) -> float:
    """Allowed relative error: `factor` times PyTorch's own error in this dtype, plus a floor for the dtype.

    The fp32 floor admits tf32 matrix units (about 3e-4); the 16-bit floor is about bf16's rounding of a sum.
    """
    floor = 1e-3 if dtype == torch.float32 else 5e-3
    return factor * reference_error + floor


# ----------------------------------------------------------------------------------------------------------------------
# Rows


def make_row(**fields) -> dict:
    unknown = set(fields) - set(ROW_FIELDS) - {"note", "samples_per_s", "batch_size", "mfu", "model_tflop_per_step"}
    unknown = {k for k in unknown if not k.startswith("speedup_vs_")}
    if unknown:
        raise ValueError(f"make_row got unknown fields {sorted(unknown)}")
    row = {k: None for k in ROW_FIELDS}
    row.update(fields)
    return row


def skipped_row(reason: str, **fields) -> dict:
    return make_row(skipped=reason, **fields)


def row_key(row: dict) -> tuple:
    """Rows with the same key are the same measurement by different providers."""
    return (row["op"], row["mode"], json.dumps(row["shape"], sort_keys=True), row["dtype"], row["dropout_p"])


def add_speedups(rows: List[dict], baselines: Iterable[str] = ("reference", "sdpa")) -> None:
    """On each of our timed rows: speedup_vs_<provider> = provider's median / ours, for every timed correct baseline.

    `speedup_vs_reference` and `speedup_vs_sdpa` are always present on our rows (None where that baseline has no time).
    """
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        groups.setdefault(row_key(row), []).append(row)
    for group in groups.values():
        for ours in (r for r in group if r["provider"] == OURS):
            for name in baselines:
                ours[f"speedup_vs_{name}"] = None
            if not ours["ms_p50"]:
                continue
            for other in group:
                if other["provider"] != OURS and other["ms_p50"] and other["correct"]:
                    ours[f"speedup_vs_{other['provider']}"] = round(other["ms_p50"] / ours["ms_p50"], 3)


def skip_reason(name: str, compiled: bool, needs_gpu: bool, on_gpu: bool, options: "Options",
                budget: "Budget") -> Optional[str]:
    """Why a provider is not run here (None: run it): the time budget, or a GPU-only provider on the CPU."""
    if budget.spent():
        return budget.reason
    if not on_gpu:
        ours = name == OURS or name.startswith(OURS + "_")  # our kernels, or ours with other tiles
        if ours and not options.interpret:
            return "Triton kernels need a CUDA GPU (pass --interpret to run them in Triton's interpreter on the CPU)"
        if needs_gpu and not ours:
            return "needs a CUDA GPU"
        if compiled and not options.cpu_compile:
            return "torch.compile provider: GPU only (on the CPU pass --cpu-compile; it takes minutes)"
    return None


class Budget:
    """Wall-clock budget of a suite: once spent, the remaining cases are reported skipped, not silently dropped."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.start = time.monotonic()

    def spent(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.start > self.seconds

    @property
    def reason(self) -> str:
        return f"time budget of {self.seconds:.0f} s for this suite used up (--budget-s)"


# ----------------------------------------------------------------------------------------------------------------------
# Output: JSON (written after every row, so a run killed by a timeout keeps what it measured), markdown, plots


class Results:
    def __init__(self, suite: str, out_dir: Path, info: dict, method: dict):
        self.suite = suite
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.doc = dict(info, suite=suite, method=method, complete=False, rows=[])

    @property
    def rows(self) -> List[dict]:
        return self.doc["rows"]

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self._write_json()
        if row["correct"] is False:
            status = f"WRONG ({row['check']})"
        elif row["ms_p50"] is not None:
            status = f"{row['ms_p50']:.4f} ms"
        else:
            status = f"skipped: {row['skipped']}"
        print(f"[{self.suite}] {row['op']} {row['mode']} {format_shape(row['shape'])} {row['dtype']} "
              f"p={row['dropout_p']} {row['provider']}: {status}", flush=True)

    def _write_json(self) -> None:
        path = self.out_dir / f"{self.suite}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        tmp.replace(path)

    def finish(self, plot_x: Optional[Callable[[dict], Optional[float]]] = None, x_label: str = "",
               complete: bool = True, plot_panel: Optional[Callable[[dict], str]] = None) -> None:
        """Writes the final JSON (`complete` says whether the suite ran to its end), the markdown and the plot."""
        self.doc["complete"] = complete
        self._write_json()
        (self.out_dir / f"{self.suite}.md").write_text(markdown(self.doc))
        if plot_x is not None:
            title = f"{self.suite} on {self.doc['device']}"
            plot(self.rows, self.out_dir / f"{self.suite}.png", plot_x, x_label, title, plot_panel)


def format_shape(shape) -> str:
    if isinstance(shape, dict):
        return " ".join(f"{k}={v}" for k, v in shape.items())
    return str(shape)


def _fmt(value, digits=3) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown(doc: dict) -> str:
    rows = doc["rows"]
    speedups = sorted({k for r in rows for k in r if k.startswith("speedup_vs_")},
                      key=lambda k: (k not in ("speedup_vs_reference", "speedup_vs_sdpa"), k))
    extras = [k for k in ("samples_per_s", "mfu", "batch_size") if any(r.get(k) is not None for r in rows)]
    head = ["op", "mode", "shape", "dtype", "p", "provider", "ms p50", "p20-p80", "TFLOP/s", "GB/s", "% copy BW",
            "peak MB", "correct"] + extras + [k.replace("speedup_vs_", "x vs ") for k in speedups] + ["skipped / note"]
    lines = [
        f"# {doc['suite']}: {doc['device']}",
        "",
        f"{doc['date']}, torch {doc['torch']}, triton {doc['triton']}, CUDA {doc['cuda']}, driver {doc['driver']}, "
        f"commit {doc['git_commit']}.",
        "",
    ]
    for key, value in doc.get("method", {}).items():
        lines.append(f"- {key}: {value}")
    lines += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        spread = f"{r['ms_p20']:.4g}-{r['ms_p80']:.4g}" if r["ms_p20"] is not None else ""
        cells = [r["op"], r["mode"], format_shape(r["shape"]), r["dtype"], _fmt(r["dropout_p"]), r["provider"],
                 _fmt(r["ms_p50"], 4), spread, _fmt(r["tflops"]), _fmt(r["gbps"]), _fmt(r["pct_of_copy_bw"]),
                 _fmt(r["peak_mem_mb"]), _fmt(r["correct"])]
        cells += [_fmt(r.get(k)) for k in extras] + [_fmt(r.get(k)) for k in speedups]
        cells.append(" ".join(x for x in (r["skipped"], r.get("note")) if x).replace("|", "/").replace("\n", " "))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: List[dict], path: Path, x_of: Callable[[dict], Optional[float]], x_label: str, title: str,
         panel_of: Optional[Callable[[dict], str]] = None) -> None:
    """Median time against `x_of(row)` per provider: one panel per (op, panel_of(row), dtype, dropout, mode);
    panel_of defaults to the shape's family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["ms_p50"] and x_of(r) is not None]
    panels: Dict[tuple, Dict[str, List[tuple]]] = {}
    for r in timed:
        family = panel_of(r) if panel_of else r["shape"].get("family", "") if isinstance(r["shape"], dict) else ""
        key = (r["op"], family, r["dtype"], r["dropout_p"], r["mode"])
        panels.setdefault(key, {}).setdefault(r["provider"], []).append((x_of(r), r["ms_p50"]))
    n = max(len(panels), 1)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4 * nrows), squeeze=False)
    for ax, (key, lines) in zip(axes.flat, sorted(panels.items(), key=lambda kv: str(kv[0]))):
        for provider, points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    linewidth=2.5 if provider == OURS else 1.2, label=provider)
        op, family, dtype, p, mode = key
        ax.set_title(f"{op} {family} {mode} {dtype} p={p}", fontsize=9)
        ax.set_xlabel(x_label)
        ax.set_ylabel("ms (median)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no timed rows", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
