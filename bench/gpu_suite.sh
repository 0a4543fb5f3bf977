#!/usr/bin/env bash
# The GPU suite: one command on a bare GPU machine with no network, run from the repository root.
#
#   bash bench/gpu_suite.sh OUT_DIR [--dry-run]
#
# Installs the wheels carried in .whl/ (bench/prepare_wheels.sh fills it), installs the project (editable, no deps),
# records nvidia-smi and versions, then runs: `pytest -m gpu`, the kernel tests compiled
# (on a GPU conftest does not set the interpreter), the kernels, ops and model benchmarks, and a short pretraining
# run (train/ds.json: bf16, Triton backend) for its samples/s. Every step has its own
# timeout, capped so that the whole suite ends inside TOTAL_S seconds (default 470: inside 8 minutes); a failing
# step never stops the later ones. Logs, JSON, markdown and plots go under OUT_DIR; OUT_DIR/summary.txt has one line
# per step with its exit code (124 = timed out) and seconds. --dry-run writes the summary with the commands it would
# run, running none of them (what CI checks on a machine without a GPU).
set -uo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: bash bench/gpu_suite.sh OUT_DIR [--dry-run]" >&2
    exit 2
fi
OUT_DIR=$1
DRY_RUN=0
[[ "${2:-}" == "--dry-run" ]] && DRY_RUN=1
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT_DIR/logs" "$OUT_DIR/bench" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
SUMMARY="$OUT_DIR/summary.txt"
PYTHON=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-470}
START=$(date +%s)
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels on the GPU
echo "gpu_suite $(date -u +%Y-%m-%dT%H:%M:%SZ) repo=$(pwd) dry_run=$DRY_RUN total_s=$TOTAL_S" >"$SUMMARY"

# run_step NAME TIMEOUT_S CMD...: runs CMD with its output in logs/NAME.log, under a timeout cut to what is left of
# TOTAL_S (minus RESERVE_S for the steps after it), and appends "NAME rc=N seconds=S" to the summary.
RESERVE_S=0
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$((TOTAL_S - ($(date +%s) - START) - RESERVE_S))
    ((limit > left)) && limit=$left
    local log="$OUT_DIR/logs/$name.log" t0 rc
    t0=$(date +%s)
    if ((DRY_RUN)); then
        echo "DRY RUN (timeout ${limit}s): $*" >"$log"
        rc=0
    elif ((limit < 5)); then
        echo "not run: the suite's TOTAL_S=$TOTAL_S is used up" >"$log"
        rc=125
    else
        echo "\$ $* (timeout ${limit}s)" >"$log"
        timeout -k 10 "$limit" "$@" >>"$log" 2>&1
        rc=$?
    fi
    echo "$name rc=$rc seconds=$(($(date +%s) - t0)) timeout=$limit" >>"$SUMMARY"
    echo "== $name: rc=$rc ($(($(date +%s) - t0)) s)"
    return 0
}

# 1. Wheels the image lacks (deepspeed, pydantic, hjson, lmdb, ...) into /tmp/site, put first on PYTHONPATH.
if compgen -G ".whl/*.whl" >/dev/null; then
    run_step install_wheels 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "install_wheels skipped: no .whl/ (bench/prepare_wheels.sh; carry it with the run)" >>"$SUMMARY"
fi

# 2. The project, editable and offline (setuptools from the image: no build isolation). If that fails, the two
#    packages are made importable by path: vilbert from the repo root, vilbert_kernels through a link to kernels/.
run_step install_project 60 "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e .
if ((!DRY_RUN)) && ! "$PYTHON" -c "import vilbert, vilbert_kernels" >>"$OUT_DIR/logs/install_project.log" 2>&1; then
    mkdir -p /tmp/shim && ln -sfn "$(pwd)/kernels" /tmp/shim/vilbert_kernels
    export PYTHONPATH="$(pwd):/tmp/shim${PYTHONPATH:+:$PYTHONPATH}"
    echo "install_project: fell back to PYTHONPATH=$PYTHONPATH" >>"$SUMMARY"
fi

# 3. What this ran on.
if ((!DRY_RUN)); then
    {
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    } >"$OUT_DIR/nvidia-smi.txt" 2>&1
    {
        "$PYTHON" - <<'PY'
import sys, torch, triton
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
PY
        git rev-parse HEAD 2>/dev/null || echo "commit ${BENCH_GIT_COMMIT:-unknown}"
        "$PYTHON" -m pip list 2>/dev/null
    } >"$OUT_DIR/versions.txt" 2>&1
fi

# 4. Checks, then 5. benchmarks. RESERVE_S keeps time for the benchmarks while the checks run. (The sm_90 compile
#    check is not here: CI runs it with the same Triton and needs no GPU.)
RESERVE_S=350
# The kernel tests launch ~220 distinct Triton specializations (counted in the interpreter), each compiled on first
# use at ~0.4 s of one core: pytest-xdist (in the GPU image) spreads the compiling over 8 of the 16 cores. Inductor
# (the torch.compile tests) then compiles in each worker's own process instead of starting a pool per worker.
# A test module that cannot be imported (say deepspeed's) costs its own tests only; -rfE names what failed.
PYTEST=("$PYTHON" -m pytest -q -rfE -p no:cacheprovider --continue-on-collection-errors)
"$PYTHON" -c "import xdist" 2>/dev/null && PYTEST=(env TORCHINDUCTOR_COMPILE_THREADS=1 "${PYTEST[@]}" -n 8)
run_step pytest_gpu 75 "${PYTEST[@]}" -m gpu tests
KERNEL_TESTS=()
for t in tests/test_attention.py tests/test_layer_norm.py tests/test_bias_gelu.py; do
    [[ -f $t ]] && KERNEL_TESTS+=("$t")
done
if ((${#KERNEL_TESTS[@]})); then
    run_step pytest_kernels 75 "${PYTEST[@]}" "${KERNEL_TESTS[@]}"
fi
# The benchmarks stop starting new cases at --budget-s and write what they have; the timeout is the backstop.
RESERVE_S=225
run_step bench_kernels 125 "$PYTHON" -m bench kernels --quick --out "$OUT_DIR/bench" --budget-s 95
RESERVE_S=180
run_step bench_ops 45 "$PYTHON" -m bench ops --quick --out "$OUT_DIR/bench" --budget-s 30
# The model suite's last backend is torch.compile of the whole vilbert-base step (a minute or more of compiling): it
# gets its 100 s plus whatever the earlier steps left unused (run_step caps the 200 at what remains).
RESERVE_S=80
run_step bench_model 200 "$PYTHON" -m bench model --quick --out "$OUT_DIR/bench" --budget-s 60
# 6. The main job on the GPU, for its samples/s (one GPU, bf16, the Triton backend):
#    the small model, train/ds.json, a world of one without the launcher, the default loader workers; metrics.jsonl
#    has samples_per_s, and data_wait tells whether the loader or the GPU set it.
#    80 s: DeepSpeed's start, the loader workers' fork and the first steps' Triton compiles come before the 30 steps.
RESERVE_S=0
run_step pretrain_gpu 80 "$PYTHON" train/pretrain.py --deepspeed_config train/ds.json --max_steps 30 --log_interval 5 \
    --output_dir "$OUT_DIR/pretrain" --save_interval 1000000
rm -rf "$OUT_DIR"/pretrain/global_step* "$OUT_DIR"/pretrain/final  # a 30-step run's weights: not worth bringing back

echo "total seconds=$(($(date +%s) - START))" >>"$SUMMARY"
# For a reader of the console tail: our rows (and the tile candidates') in one line each, then the summary, last.
"$PYTHON" - "$OUT_DIR/bench" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/*.json")):
    doc = json.load(open(path))
    print(f"--- {doc['suite']} on {doc['device']}: ceilings {doc.get('ceilings')}, complete {doc.get('complete')}")
    # ours, and the tile candidates where they ran (they skip ViLBERT's shapes)
    for r in (r for r in doc["rows"] if r["provider"] == "ours"
              or r["provider"].startswith("ours_") and (r["ms_p50"] or r["correct"] is False)):
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items() if k not in ("ragged", "family"))
        head = f"{r['op']} {r['mode']} {r['shape'].get('family', '')} {shape} p={r['dropout_p']}"
        head += "" if r["provider"] == "ours" else f" [{r['provider']}]"
        if r["ms_p50"] is None:
            print(f"{head}: {'WRONG ' + str(r['check']) if r['correct'] is False else r['skipped']}"[:300])
            continue
        speedups = " ".join(f"{k[11:]}={v:.2f}" for k, v in r.items()
                            if k.startswith("speedup_vs_") and v is not None)
        bw = f" {r['pct_of_copy_bw']:.0f}%BW" if r.get("pct_of_copy_bw") else ""
        print(f"{head}: {r['ms_p50']:.4f} ms{bw} x[{speedups}]")
PY
"$PYTHON" -m bench.targets "$OUT_DIR/bench"  # the targets against these results (also into targets.md there)
echo "--- pretraining on the GPU, the last metrics lines:"
tail -n 2 "$OUT_DIR/pretrain/metrics.jsonl" 2>/dev/null
echo
cat "$SUMMARY"
exit 0
