#!/usr/bin/env bash
# The fair benchmarks on a CUDA machine, in one prepared run (docs/performance.md):
#   1. bench/pipeline_vs_torch.py on the larger presets (bf16), vs the single-card loop at 3 batch sizes
#   2. bench/job_vs_torch.py: the whole partition job vs a tuned DataLoader, on real image files
#   4. python -m ray_jobs tune (skipped, saying so, where the subcommand is absent)
# Each step has a hard timeout; with the defaults the steps fit in 8 minutes together (the venv
# set-up before them is separate: GPU_CHECK_SETUP_TIMEOUT_S). Output goes to stdout and, when
# $OUT is set, to $OUT/gpu_check.log. Settings (environment):
#   GPU_CHECK_VENV (.venv-gpu)        venv made here if absent: python3 -m venv + requirements.txt/constraints.txt,
#                                     then torch (the pin in requirements.txt) from the default index, which is a
#                                     CUDA build on Linux x86-64; fails clearly if torch then sees no GPU
#   GPU_CHECK_STEADY_S (6)            steady-state seconds per side and repetition in step 1
#   GPU_CHECK_REPS (2)                alternating repetitions in step 1
#   GPU_CHECK_STEP_TIMEOUT_S (140)    hard limit of steps 1a, 1b and 2; step 4 gets GPU_CHECK_TUNE_TIMEOUT_S (40)
#   GPU_CHECK_JOB_ROWS (2400)         rows (image files) in step 2
#   GPU_CHECK_BATCH (32)              batch size of steps 1, 2 and 4
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-}
LOG=${OUT_DIR:+$OUT_DIR/gpu_check.log}
LOG=${LOG:-/dev/null}
VENV=${GPU_CHECK_VENV:-.venv-gpu}
STEADY_S=${GPU_CHECK_STEADY_S:-6}
REPS=${GPU_CHECK_REPS:-2}
STEP_T=${GPU_CHECK_STEP_TIMEOUT_S:-140}
TUNE_T=${GPU_CHECK_TUNE_TIMEOUT_S:-40}
SETUP_T=${GPU_CHECK_SETUP_TIMEOUT_S:-900}
JOB_ROWS=${GPU_CHECK_JOB_ROWS:-2400}
BATCH=${GPU_CHECK_BATCH:-32}
PY_BOOT=${PYTHON_BOOT:-$(command -v python3.11 || command -v python3)}
export RAY_ADDRESS=local PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d -t gpu-check-XXXXXX)
trap 'rm -rf "$WORK"' EXIT

say() { echo "gpu_check: $*" | tee -a "$LOG"; }

setup() {
    [ -x "$VENV/bin/python" ] || "$PY_BOOT" -m venv "$VENV" || return 1
    grep -v '^torch==' requirements.txt > "$WORK/requirements-no-torch.txt"
    "$VENV/bin/python" -m pip install -q --upgrade "pip>=24" || return 1
    "$VENV/bin/python" -m pip install -q -r "$WORK/requirements-no-torch.txt" -c constraints.txt || return 1
    if ! "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
        local spec
        spec=$(grep -o '^torch==[^ ]*' requirements.txt)
        "$VENV/bin/python" -m pip uninstall -q -y torch 2>/dev/null
        # The default index only (no local wheel folders or extra indexes a machine's pip config adds):
        # its Linux x86-64 torch wheels are CUDA builds that pull the CUDA runtime as packages.
        env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null \
            "$VENV/bin/python" -m pip install -q "$spec" -c constraints.txt || return 1
    fi
    "$VENV/bin/python" -c 'import sys, torch
print(f"torch {torch.__version__} cuda {torch.version.cuda} gpus {torch.cuda.device_count()}")
sys.exit(0 if torch.cuda.is_available() else 1)' 2>&1 | tee -a "$LOG"
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

say "setting up $VENV (limit ${SETUP_T}s) ..."
export -f setup say
export VENV WORK LOG PY_BOOT
if ! timeout "$SETUP_T" bash -c setup; then
    say "set-up failed: no venv with a CUDA torch (see above); nothing measured"
    exit 1
fi
PY="$VENV/bin/python"
START=$SECONDS
step 1a "$STEP_T" "$PY" bench/pipeline_vs_torch.py --preset albert-base-vit-s16 --dtype bfloat16 \
    --batch-size "$BATCH" --steady-s "$STEADY_S" --reps "$REPS"
step 1b "$STEP_T" "$PY" bench/pipeline_vs_torch.py --preset clip-vit-b-16 --dtype bfloat16 \
    --batch-size "$BATCH" --steady-s "$STEADY_S" --reps "$REPS"
step 2 "$STEP_T" "$PY" bench/job_vs_torch.py --preset albert-base-vit-s16 --dtype bfloat16 --batch-size "$BATCH" \
    --rows "$JOB_ROWS" --max-side 960 --loader-workers 8,15 --loader-threads 4 \
    ${OUT_DIR:+--stats-out "$OUT_DIR/job_stats.txt"}
if "$PY" -m ray_jobs tune --help > /dev/null 2>&1; then
    MODEL=$("$PY" -c 'import sys; sys.path.insert(0, "."); from bench.rows import build_preset
print(build_preset("albert-base-vit-s16", sys.argv[1]))' "$WORK" 2>/dev/null | tail -1)
    step 4 "$TUNE_T" "$PY" -m ray_jobs tune --model "$MODEL" --dtype bfloat16 --batch-size "$BATCH" --stages 2
else
    say "step 4 skipped: this checkout has no 'python -m ray_jobs tune' subcommand"
fi
say "steps took $((SECONDS - START))s in all"
