"""python -m bench {kernels,ops,model,all} [--quick] [--out DIR] [--budget-s S] [--providers a,b] [--dtype bf16|fp16]
                 [--batch-size N] [--interpret] [--cpu-compile]

Run from the repository root. Writes <suite>.json (rewritten after every row, so a run cut short keeps what it
measured), <suite>.md and <suite>.png into --out (default bench/results/<date>-<device>/). On a machine without a GPU
the suites run their CPU-capable providers at tiny shapes and report every GPU-only provider as skipped; those rows
are labelled device "cpu" and prove the harness, not any speed.
"""
import argparse
import importlib
import os
import signal
import sys
from pathlib import Path

SUITES = ("kernels", "ops", "model")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("suite", choices=SUITES + ("all",))
    parser.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results/<date>-<device>/)")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="GPU dtype (the CPU runs fp32)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="per-suite wall-clock budget; once spent, the remaining cases are reported skipped")
    parser.add_argument("--providers", help="comma-separated provider names to run (the reference always runs)")
    parser.add_argument("--batch-size", type=int, help="model suite: batch size to try first (halved on OOM)")
    parser.add_argument("--interpret", action="store_true",
                        help="no GPU: run our Triton kernels in Triton's interpreter (slow; correctness only)")
    parser.add_argument("--cpu-compile", action="store_true",
                        help="no GPU: run the torch.compile providers on the CPU too (minutes of compilation)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret:
        # Must happen before triton is first imported; torch alone does not import it.
        os.environ["TRITON_INTERPRET"] = "1"
    from . import common

    if args.interpret and common.device().type == "cuda":
        raise SystemExit("--interpret is for machines without a GPU; on a GPU the compiled kernels run")
    options = common.Options(
        quick=args.quick, dtype=common.DTYPES[args.dtype], interpret=args.interpret, cpu_compile=args.cpu_compile,
        providers=args.providers.split(",") if args.providers else None, batch_size=args.batch_size)
    return run(args.suite, options, args.out, args.budget_s)


class Stopped(BaseException):
    """Raised in the main thread by SIGTERM (the GPU suite's per-step timeout), so the outputs still get written."""


def _stop(signum, frame):
    raise Stopped(f"stopped by signal {signum} (a timeout) before the suite's end")


def run(suite: str, options, out_dir=None, budget_s=None) -> int:
    """Runs one suite or all; returns 0 when every suite ran to its end (its rows say what was skipped or wrong)."""
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return _run(suite, options, out_dir, budget_s)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(suite, options, out_dir, budget_s) -> int:
    from . import common

    info = common.env_info()
    out_dir = Path(out_dir) if out_dir else common.default_out_dir(info)
    info["ceilings"] = common.measure_ceilings(options.quick)
    print(f"device {info['device']}, torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
          f"ceilings {info['ceilings']}; writing to {out_dir}", flush=True)
    failed = []
    for name in SUITES if suite == "all" else (suite,):
        module = importlib.import_module(f"bench.{name}")
        results = common.Results(name, out_dir, info, module.METHOD)
        try:
            module.run(results, options, common.Budget(budget_s), info["ceilings"])
        except Stopped as e:  # a timeout's SIGTERM: write the outputs of what was measured, then stop
            results.doc["error"] = str(e)
            common.add_speedups(results.rows, module.SPEEDUP_BASELINES)
            results.finish(module.plot_x, module.X_LABEL, False, getattr(module, "plot_panel", None))
            print(f"[{name}] {e}; partial results in {out_dir}", file=sys.stderr, flush=True)
            return 124
        except Exception as e:  # keep what was measured; the next suite still runs
            print(f"[{name}] suite failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            failed.append(name)
            results.doc["error"] = f"{type(e).__name__}: {e}"
        results.finish(module.plot_x, module.X_LABEL, name not in failed, getattr(module, "plot_panel", None))
        rows = results.rows
        timed = sum(r["ms_p50"] is not None for r in rows)
        wrong = sum(r["correct"] is False for r in rows)
        errors = sum(bool(r["skipped"]) and r["skipped"].startswith("error") for r in rows)
        print(f"[{name}] {len(rows)} rows: {timed} timed, {wrong} wrong, {errors} errors, "
              f"{len(rows) - timed - wrong - errors} skipped -> {out_dir / (name + '.json')}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
