#!/usr/bin/env bash
# The fair benchmarks and the stall check on a CUDA machine, in one prepared run (docs/performance.md):
#   1. bench/pipeline_vs_sequential.py: the model split over 2 workers (one GPU shared), the project's
#      pipeline vs sequential model parallel (accelerate's device_map) and a torch micro-batch pipeline
#   2. bench/job_vs_torch.py: the whole partition job with the automatic layout vs a tuned DataLoader
#   3. tests/ray_jobs/job/test_stall*.py: a stage actor SIGKILLed mid-run (skipped, saying so, where absent)
# Each step has a hard timeout; with the defaults the steps fit in 8 minutes together (the set-up
# before them is separate and local: nothing is downloaded). Output goes to stdout and, when $OUT
# is set, to $OUT/gpu_check.log. Settings (environment):
#   GPU_CHECK_PYTHON (python3)        a Python whose torch is a CUDA build (the machine's own)
#   GPU_CHECK_WHEELS (.whl)           wheels of what that Python lacks (ray, pyiceberg, ...), installed with
#                                     pip --no-index --no-deps into GPU_CHECK_SITE and put first on PYTHONPATH;
#                                     a wheel too big to travel in one piece may come split as NAME.whl.part-aa,
#                                     NAME.whl.part-ab, ... (split -b 60M), joined here first
#   GPU_CHECK_SITE (/tmp/gpu-check-site)
#   GPU_CHECK_STEADY_S (6)            steady-state seconds per variant and repetition in step 1
#   GPU_CHECK_REPS (2)                alternating repetitions in steps 1 and 2
#   GPU_CHECK_BATCH (32)              batch size of steps 1 and 2
#   GPU_CHECK_JOB_ROWS (1600)         rows (image files) in step 2
#   GPU_CHECK_STEP1_TIMEOUT_S (150), GPU_CHECK_STEP2_TIMEOUT_S (220), GPU_CHECK_STEP3_TIMEOUT_S (100)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-}
LOG=${OUT_DIR:+$OUT_DIR/gpu_check.log}
LOG=${LOG:-/dev/null}
PY=${GPU_CHECK_PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
STEADY_S=${GPU_CHECK_STEADY_S:-6}
REPS=${GPU_CHECK_REPS:-2}
BATCH=${GPU_CHECK_BATCH:-32}
JOB_ROWS=${GPU_CHECK_JOB_ROWS:-1600}
STEP1_T=${GPU_CHECK_STEP1_TIMEOUT_S:-150}
STEP2_T=${GPU_CHECK_STEP2_TIMEOUT_S:-220}
STEP3_T=${GPU_CHECK_STEP3_TIMEOUT_S:-100}
export RAY_ADDRESS=local PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false

say() { echo "gpu_check: $*" | tee -a "$LOG"; }

setup() {
    if [ -d "$WHEELS" ]; then
        local first whole
        for first in "$WHEELS"/*.whl.part-aa; do
            [ -e "$first" ] || continue
            whole=${first%.part-aa}
            cat "$whole".part-* > "$whole" || return 1
        done
        if compgen -G "$WHEELS/*.whl" > /dev/null; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
                "$WHEELS"/*.whl || return 1
        fi
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG"
import importlib, sys
missing = []
for name in ("torch", "ray", "ray.data", "transformers", "tokenizers", "safetensors", "pyarrow", "PIL", "fsspec",
             "pytest", "ray_jobs.job.embed"):
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
if missing:
    print("cannot import: " + "; ".join(missing))
    sys.exit(1)
import ray, torch
print(f"python {sys.version.split()[0]} torch {torch.__version__} cuda {torch.version.cuda} "
      f"gpus {torch.cuda.device_count()} ray {ray.__version__}")
sys.exit(0 if torch.cuda.is_available() else 1)
PYEOF
}

step() {  # step NAME TIMEOUT COMMAND...
    local name=$1 limit=$2 rc
    shift 2
    say "step $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=15 "$limit" "$@" 2>&1 | grep -v -E 'Loading weights|Writing model shards|^\s*$' | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    say "step $name: exit $rc after $((SECONDS - t0))s$([ "$rc" = 124 ] && echo ' (timed out)')"
}

say "setting up $PY with the wheels in $WHEELS (if any) ..."
if ! setup; then
    say "set-up failed: no Python with a CUDA torch and the project's imports (see above); nothing measured"
    exit 1
fi
START=$SECONDS
step 1 "$STEP1_T" "$PY" bench/pipeline_vs_sequential.py --preset albert-base-vit-s16 --dtype bfloat16 \
    --batch-size "$BATCH" --steady-s "$STEADY_S" --reps "$REPS"
step 2 "$STEP2_T" "$PY" bench/job_vs_torch.py --preset albert-base-vit-s16 --dtype bfloat16 --batch-size "$BATCH" \
    --num-stages auto --rows "$JOB_ROWS" --max-side 960 --loader-workers 8,15 --loader-threads 4 --reps "$REPS" \
    ${OUT_DIR:+--stats-out "$OUT_DIR/job_stats.txt"}
STALL_TESTS=$(ls tests/ray_jobs/job/test_stall*.py 2> /dev/null)
if [ -n "$STALL_TESTS" ]; then
    # shellcheck disable=SC2086  # one argument per test file
    step 3 "$STEP3_T" "$PY" -m pytest -q $STALL_TESTS
else
    say "step 3 skipped: this checkout has no tests/ray_jobs/job/test_stall*.py"
fi
say "steps took $((SECONDS - START))s in all"
