"""The project's performance targets, checked against one run's results.

    python -m bench.targets DIR        # DIR holds kernels.json and/or model.json from `python -m bench`

Prints a markdown table (target, shape, measured, goal, verdict) and writes it to DIR/targets.md. A target that has
no number says why: our row or the baseline's was skipped (the reason is quoted), wrong, or absent. The targets:

- co_attention forward+backward, dropout 0.1, bf16, at the pretraining and downstream shapes: >= 3x the plain PyTorch
  reference, >= 1.5x SDPA's choice, >= 1.2x flash-attn where it is installed; forward at >= 75% of the memory-bandwidth
  floor, backward at >= 65% (% of the copy bandwidth measured in the same run, for the minimal bytes).
- attention at square 1024 and 2048 without dropout: >= 0.8x SDPA's flash backend (each mode).
- the vilbert-base training step, bf16: >= 1.5x the eager reference's samples/s, >= 1.2x the compiled reference's,
  with lower peak memory than both.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Iterator, List, Optional

OURS = "ours"  # bench.common.OURS; not imported from there, so that reading results needs no torch


def _rows(doc: Optional[dict], **match) -> List[dict]:
    """Rows of a suite's document whose fields (or shape fields) equal `match`."""
    if doc is None:
        return []

    def value(row, key):
        return row["shape"].get(key) if key not in row and isinstance(row["shape"], dict) else row.get(key)
    return [r for r in doc["rows"] if all(value(r, k) == v for k, v in match.items())]


def _why_not(row: Optional[dict], who: str) -> Optional[str]:
    """None when the row has a time; else why not, in a few words."""
    if row is None:
        return f"no {who} row in this run"
    if row["correct"] is False:
        return f"{who} WRONG ({row['check']})"
    if row["ms_p50"] is None:
        return f"{who} skipped: {row['skipped']}"
    return None


def _result(target: str, shape: str, measured: Optional[float], goal: float, unit: str, at_most: bool = False,
            missing: Optional[str] = None) -> dict:
    if measured is None:
        verdict = f"not measured: {missing}"
    else:
        met = measured <= goal if at_most else measured >= goal
        verdict = "met" if met else "SHORT"
    return {"target": target, "shape": shape, "measured": measured, "goal": f"{'<=' if at_most else '>='} {goal:g}",
            "unit": unit, "verdict": verdict}


def _speedup(ours: Optional[dict], group: List[dict], baseline: str, target: str, shape: str, goal: float) -> dict:
    other = next((r for r in group if r["provider"] == baseline), None)
    missing = _why_not(ours, OURS) or _why_not(other, baseline)
    # From the times when the run ended before it wrote its speedup columns (a suite killed past its timeout).
    measured = None if missing else ours.get(f"speedup_vs_{baseline}") or other["ms_p50"] / ours["ms_p50"]
    return _result(target, shape, measured, goal, "x", missing=missing)


def kernel_targets(doc: Optional[dict]) -> Iterator[dict]:
    for family in ("pretraining", "downstream"):
        shape = f"co_attention {family}"
        for mode, floor_goal in (("fwd+bwd", None), ("fwd", 75.0), ("bwd", 65.0)):
            group = _rows(doc, op="co_attention", family=family, mode=mode, dropout_p=0.1, dtype="bf16")
            ours = next((r for r in group if r["provider"] == OURS), None)
            if floor_goal is None:
                for baseline, goal in (("reference", 3.0), ("sdpa", 1.5), ("flash_attn", 1.2)):
                    yield _speedup(ours, group, baseline, f"fwd+bwd p=0.1 vs {baseline}", shape, goal)
            else:
                missing = _why_not(ours, OURS)
                measured = None if missing else ours.get("pct_of_copy_bw")
                missing = missing or (None if measured is not None else "no copy-bandwidth ceiling in this run")
                yield _result(f"{mode} p=0.1 share of the bandwidth floor", shape, measured, floor_goal, "%",
                              missing=missing)
    for length in (1024, 2048):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            group = _rows(doc, op="attention", family="square", Lq=length, mode=mode, dropout_p=0.0, dtype="bf16")
            ours = next((r for r in group if r["provider"] == OURS), None)
            yield _speedup(ours, group, "sdpa_flash", f"{mode} p=0 vs sdpa_flash", f"attention square L={length}",
                           0.8)


def model_targets(doc: Optional[dict]) -> Iterator[dict]:
    group = _rows(doc, op="train_step:vilbert-base", dtype="bf16")
    ours = next((r for r in group if r["provider"] == OURS), None)
    shape = "vilbert-base training step"
    for baseline, goal in (("reference", 1.5), ("reference_compiled", 1.2)):
        other = next((r for r in group if r["provider"] == baseline), None)
        missing = _why_not(ours, OURS) or _why_not(other, baseline)
        # samples/s, not step time: a backend that ran out of memory at B=256 records the halved batch it ran
        measured = None if missing else round(ours["samples_per_s"] / other["samples_per_s"], 3)
        yield _result(f"samples/s vs {baseline}", shape, measured, goal, "x", missing=missing)
        missing = missing or (None if ours["peak_mem_mb"] and other["peak_mem_mb"] else "no peak memory recorded")
        measured = None if missing else round(ours["peak_mem_mb"] / other["peak_mem_mb"], 3)
        yield _result(f"peak memory vs {baseline}", shape, measured, 1.0, "x", at_most=True, missing=missing)


def evaluate(kernels_doc: Optional[dict], model_doc: Optional[dict]) -> List[dict]:
    return list(kernel_targets(kernels_doc)) + list(model_targets(model_doc))


def markdown(results: List[dict], docs: List[dict]) -> str:
    met = sum(r["verdict"] == "met" for r in results)
    short = sum(r["verdict"] == "SHORT" for r in results)
    lines = ["# Performance targets", ""]
    for doc in docs:
        lines.append(f"- {doc['suite']}: {doc['device']}, {doc['date']}, commit {doc['git_commit']}, "
                     f"ceilings {doc.get('ceilings')}{'' if doc.get('complete') else ' (INCOMPLETE run)'}")
    if any(doc["device"] == "cpu" for doc in docs):
        lines.append("- device cpu: the targets are GPU targets; CPU numbers say nothing about them")
    lines += ["", f"{met} met, {short} short, {len(results) - met - short} not measured.", "",
              "| shape | target | measured | goal | verdict |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        measured = "" if r["measured"] is None else f"{r['measured']:.3g}{r['unit']}"
        verdict = r["verdict"].replace("|", "/").replace("\n", " ")[:300]
        lines.append(f"| {r['shape']} | {r['target']} | {measured} | {r['goal']}{r['unit']} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.targets", description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", type=Path, help="folder with kernels.json and/or model.json")
    args = parser.parse_args(argv)
    docs = {}
    for suite in ("kernels", "model"):
        path = args.results_dir / f"{suite}.json"
        if path.exists():
            docs[suite] = json.loads(path.read_text())
    if not docs:
        print(f"bench.targets: neither kernels.json nor model.json in {args.results_dir}", file=sys.stderr)
        return 2
    text = markdown(evaluate(docs.get("kernels"), docs.get("model")), list(docs.values()))
    (args.results_dir / "targets.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
