#!/usr/bin/env bash
# What fastbert checks on a GPU, in ONE call of at most 540 s on a bare machine (device time is lent by the quarter
# hour, start-up included). Stages run in order of value, each under its own time budget (timeout), each writing
# $OUT/<stage>.log and $OUT/<stage>.json; $OUT/summary.json (+ summary.txt) sums them up. The extension build starts
# in the background first and is waited for only by the stages that use the cuda backend.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh            # the session (default OUT=/tmp/fastbert-gpu)
#   bash benchmarks/gpu_session.sh --plan                    # stages, budgets and total
#   OUT=/tmp/x bash benchmarks/gpu_session.sh --dry-run      # no GPU: every stage's CPU part (CI: test_gpu_session)
#
# Runs from the repository root with the machine's torch / triton / transformers (no install, no network, no MiniLM
# weights: random bert-base weights). Commit $OUT under benchmarks/results/<device>/.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=run
case "${1:-}" in
  "") ;;
  --plan) MODE=plan ;;
  --dry-run) MODE=dry ;;
  *) echo "gpu_session.sh: unknown argument '$1' (use --plan or --dry-run)" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/fastbert-gpu}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ "$MODE" = dry ] || unset TRITON_INTERPRET

# name budget_s what: in order. The background build (BUILD_BUDGET) overlaps them and is not added to the total.
STAGES=(
  "env 20 versions, GPU, backends"
  "graphs 50 CUDA-graph capture and replay tests (tests/test_cuda_graphs.py)"
  "correctness 110 attention at bert-base size: triton and cuda vs float64 and SDPA, fwd+bwd, bf16/fp16, padded/varlen"
  "sanitize 120 compute-sanitizer memcheck + racecheck: attention (triton, cuda) and layer_norm (cuda)"
  "bench 150 bert-base bf16 vs transformers sdpa: fwd 32x512, train step, varlen, batch-1 latency with CUDA graphs"
  "optests 80 the CUDA-marked op tests (tests/ops -m cuda), what time is left for"
)
BUILD_BUDGET=300
SUMMARY_BUDGET=10

total=$SUMMARY_BUDGET
for s in "${STAGES[@]}"; do set -- $s; total=$((total + $2)); done
if [ "$MODE" = plan ]; then
  printf '%-12s %6s  %s\n' stage budget what
  printf '%-12s %6s  %s\n' build "(${BUILD_BUDGET})" "cpp + cuda extension for this GPU's arch, in the background"
  for s in "${STAGES[@]}"; do
    set -- $s; name=$1 budget=$2; shift 2
    printf '%-12s %5ss  %s\n' "$name" "$budget" "$*"
  done
  printf '%-12s %5ss  %s\n' summary "$SUMMARY_BUDGET" "summary.json / summary.txt"
  printf '%-12s %5ss  (limit 540 s)\n' total "$total"
  [ "$total" -le 540 ] || { echo "gpu_session.sh: the budgets add up to more than 540 s" >&2; exit 1; }
  exit 0
fi

mkdir -p "$OUT"
T0=$(date +%s)
DRY=()
[ "$MODE" = dry ] && DRY=(--dry-run)

# stage_json NAME STATUS RC SECONDS BUDGET: the stage's JSON, unless the stage wrote its own (Python stages do; the
# shell adds rc, seconds and budget to it).
stage_json() {
  "$PY" - "$OUT/$1.json" "$1" "$2" "$3" "$4" "$5" "$OUT/$1.log" <<'EOF'
import json, os, sys
path, name, status, rc, seconds, budget, log = sys.argv[1:]
record = {}
if os.path.exists(path):
    try:
        record = json.load(open(path))
    except ValueError:
        record = {}
tail = open(log, errors="replace").read()[-1500:] if os.path.exists(log) else ""
# The shell's verdict wins when the command failed or timed out; a passing command keeps the stage's own status.
if status != "pass" or "status" not in record:
    record["status"] = status
record.update(stage=name, rc=int(rc), seconds=float(seconds), budget_s=int(budget), log_tail=tail)
json.dump(record, open(path, "w"), indent=1)
EOF
}

# run_stage NAME BUDGET COMMAND...: run under `timeout`, log to $OUT/NAME.log, then write $OUT/NAME.json.
run_stage() {
  local name=$1 budget=$2 start rc status
  shift 2
  start=$(date +%s)
  echo "=== $name (budget ${budget}s, t=$((start - T0))s)"
  timeout --kill-after=5 "$budget" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=pass ;;
    124|137) status=timeout ;;
    *) status=fail ;;
  esac
  [ "$MODE" = dry ] && [ $rc -eq 0 ] && status=dry-run
  stage_json "$name" "$status" "$rc" "$(($(date +%s) - start))" "$budget"
  echo "    $status (rc $rc, $(($(date +%s) - start)) s)"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /'
}

# build_ok: whether the background build has finished and succeeded (its file says "rc 0 ...").
build_ok() { grep -q '^rc 0 ' "$OUT/build.done" 2>/dev/null; }

PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
if [ "$MODE" = dry ]; then
  PYTEST+=(--collect-only)  # test selection and imports only
else
  PYTEST+=(-o "timeout=60")
fi

# 0. background build of the extension for this GPU only (TORCH_CUDA_ARCH_LIST from the device's capability)
if [ "$MODE" = run ]; then
  # The visible GPU's arch only (fastbert._ext's default); TORCH_CUDA_ARCH_LIST stays unset, as in the later stages,
  # so that they load this build from the cache instead of compiling another.
  (
    start=$(date +%s)
    timeout "$BUILD_BUDGET" "$PY" -m fastbert build --backend cuda
    echo "rc $? after $(($(date +%s) - start)) s" >"$OUT/build.done"
  ) >"$OUT/build.log" 2>&1 &
  BUILD_PID=$!
else
  "$PY" -m fastbert build --help >"$OUT/build.log" 2>&1 && echo "dry-run: build command parsed" >"$OUT/build.done"
fi

# B NAME: the stage's budget in seconds.
B() {
  local want=$1 s
  for s in "${STAGES[@]}"; do
    set -- $s
    if [ "$1" = "$want" ]; then echo "$2"; return; fi
  done
}

# 1. environment
run_stage env "$(B env)" "$PY" benchmarks/gpu_session.py env --out "$OUT" "${DRY[@]}"
[ "$MODE" = run ] && { nvidia-smi >>"$OUT/env.log" 2>&1; command -v compute-sanitizer >>"$OUT/env.log" 2>&1 ||
  ls /usr/local/cuda/bin/compute-sanitizer >>"$OUT/env.log" 2>&1; }

# 2. CUDA graphs: the capture must find every kernel loaded by the warm-up
run_stage graphs "$(B graphs)" "${PYTEST[@]}" tests/test_cuda_graphs.py

# 3. correctness at BERT size: triton first; the cuda cases wait for the build inside the stage's budget
run_stage correctness "$(B correctness)" "$PY" benchmarks/gpu_session.py correctness --out "$OUT" \
  --build-done "$OUT/build.done" --budget "$(B correctness)" "${DRY[@]}"

# 4. compute-sanitizer on the attention kernels of both backends and one row kernel (bf16 and fp32: the tensor-core
# and the SIMT / FMA paths)
SANITIZE_CASES="triton:attention cuda:attention cuda:add_layer_norm"
if [ "$MODE" = run ]; then
  build_ok || SANITIZE_CASES="triton:attention triton:add_layer_norm"  # no cuda library: the triton row kernel
  build_ok || export FASTBERT_BUILD_TIMEOUT=5  # a probe must not start a second build of a failed one
  run_stage sanitize "$(B sanitize)" env OUT="$OUT/sanitizer" SANITIZE_CASES="$SANITIZE_CASES" \
    SANITIZE_DTYPES=bf16,fp32 bash scripts/sanitize.sh memcheck racecheck
else
  run_stage sanitize "$(B sanitize)" env SANITIZE_CASES="$SANITIZE_CASES" SANITIZE_DTYPES=bf16,fp32 \
    bash scripts/sanitize.sh --list memcheck racecheck
fi

# 5. headline benchmarks (same-run ratios)
run_stage bench "$(B bench)" "$PY" benchmarks/gpu_session.py bench --out "$OUT" "${DRY[@]}"

# 6. the CUDA op tests, with what is left of the 540 s
left=$((540 - SUMMARY_BUDGET - ($(date +%s) - T0)))
optests=$(B optests)
[ "$MODE" = run ] && [ "$left" -lt "$optests" ] && optests=$((left > 10 ? left : 10))
run_stage optests "$optests" "${PYTEST[@]}" -x -m cuda tests/ops/test_attention_triton.py \
  tests/ops/test_varlen_attention.py tests/ops/test_native_cuda.py

# summary
[ -n "${BUILD_PID:-}" ] && kill "$BUILD_PID" 2>/dev/null
"$PY" - "$OUT" "$T0" <<'EOF'
import json, os, sys, time
out, t0 = sys.argv[1], int(sys.argv[2])
stages = {}
for name in ("env", "graphs", "correctness", "sanitize", "bench", "optests"):
    path = os.path.join(out, f"{name}.json")
    stages[name] = json.load(open(path)) if os.path.exists(path) else {"status": "missing"}
build = open(os.path.join(out, "build.done")).read().strip() if os.path.exists(os.path.join(out, "build.done")) \
    else "did not finish"
summary = {"total_s": int(time.time()) - t0, "build": build,
           "status": {name: s.get("status") for name, s in stages.items()}, "stages": stages}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1, default=str)
lines = [f"total {summary['total_s']} s; build: {build}"]
lines += [f"{name:12s} {s.get('status')!s:8s} {s.get('seconds', '?')} s / {s.get('budget_s', '?')} s"
          for name, s in stages.items()]
bench = stages["bench"].get("rows") or {}
lines += [f"  {case}: fastbert {r['fastbert_ms']:.3f} ms, transformers sdpa {r['transformers_sdpa_ms']:.3f} ms, "
          f"{r['speedup']:.2f}x" for case, r in bench.items()]
open(os.path.join(out, "summary.txt"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "gpu_session.sh: results in $OUT"
