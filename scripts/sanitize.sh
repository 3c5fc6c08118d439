#!/usr/bin/env bash
# compute-sanitizer over every GPU kernel fastbert launches: memcheck (out-of-bounds and misaligned accesses, invalid
# frees) and racecheck (shared-memory hazards), for each op on each GPU backend (triton, cuda), forward and
# backward, at small awkward sizes (scripts/sanitize_case.py). Prints one line per tool x backend x op:
#
#   memcheck   triton  attention              clean: ERROR SUMMARY: 0 errors
#
# and keeps each full log in $OUT (default /tmp/fastbert-sanitizer). Exit status: 0 when every run is clean, 1 when
# one is not, 2 when it cannot run here (no compute-sanitizer, no GPU).
#
#   OUT=/some/dir bash scripts/sanitize.sh [--raw] [--list] [TOOL ...]   # TOOL: memcheck racecheck (default both)
#
# SANITIZE_CASES="triton:attention cuda:add_layer_norm" narrows the runs to those backend:op pairs (default: every
# op on every available GPU backend); SANITIZE_DTYPES=bf16 (comma-separated: fp16,bf16,fp32) narrows the dtypes.
# --list prints the runs it would make and checks that sanitize_case.py knows every op (no GPU needed).
#
# --raw adds the raw CUDA launcher harness (tests/cuda, no torch binding involved) under each tool, one line per
# kernel family. PyTorch's caching allocator is turned off (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so that every tensor
# is its own allocation and memcheck sees an access one element past a tensor, not a hit inside a cached block.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastbert-sanitizer}
RAW=0
LIST=0
TOOLS=()
for arg in "$@"; do
  case "$arg" in
    --raw) RAW=1 ;;
    --list) LIST=1 ;;
    memcheck|racecheck) TOOLS+=("$arg") ;;
    *) echo "sanitize.sh: unknown argument '$arg' (use --raw, --list, memcheck, racecheck)" >&2; exit 2 ;;
  esac
done
[ ${#TOOLS[@]} -eq 0 ] && TOOLS=(memcheck racecheck)
OPS="attention varlen_attention add_layer_norm bias_gelu bias_gelu_layer_norm softmax"
if [ $LIST -eq 1 ]; then
  cases=${SANITIZE_CASES:-$(for b in triton cuda; do for op in $OPS; do printf '%s:%s ' "$b" "$op"; done; done)}
  # shellcheck disable=SC2086
  python3 scripts/sanitize_case.py --check $cases || exit 1
  echo "sanitize.sh: tools ${TOOLS[*]}"
  exit 0
fi

[ -x /usr/local/cuda/bin/compute-sanitizer ] && PATH=$PATH:/usr/local/cuda/bin
if ! command -v compute-sanitizer >/dev/null; then
  echo "sanitize.sh: compute-sanitizer is not on PATH (it ships with the CUDA toolkit, e.g. /usr/local/cuda/bin)" >&2
  exit 2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1
unset TRITON_INTERPRET
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "sanitize.sh: no CUDA GPU is visible to torch; compute-sanitizer needs one (nothing was checked)" >&2
  exit 2
fi
# Probe only the backends the selected cases use (the cuda probe builds the extension if it is not built yet).
WANTED="triton cuda"
[ -n "${SANITIZE_CASES:-}" ] && WANTED=$(for c in $SANITIZE_CASES; do echo "${c%%:*}"; done | sort -u | tr '\n' ' ')
BACKENDS=$(python3 -c "import sys; from fastbert.ops import _backend
print(' '.join(n for n in sys.argv[1:] if _backend._probe(n, 'cuda')[0]))" $WANTED)
if [ -z "$BACKENDS" ]; then
  echo "sanitize.sh: neither the triton nor the cuda backend is available on this GPU (fastbert backends says why)" >&2
  exit 2
fi
RAW_GROUPS="add_layer_norm bias_gelu_layer_norm bias_gelu softmax attention"
mkdir -p "$OUT"
SUMMARY="$OUT/sanitizer.txt"
: >"$SUMMARY"
status=0

# run TOOL BACKEND NAME LOG COMMAND...: one line of result for one sanitized command.
run() {
  local tool=$1 backend=$2 name=$3 log=$4
  shift 4
  local extra=()
  [ "$tool" = racecheck ] && extra=(--racecheck-report analysis)
  compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 "${extra[@]}" "$@" >"$log" 2>&1
  local rc=$?
  local verdict summary
  summary=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$log" | tail -1 | sed 's/^=* *//')
  if [ $rc -eq 0 ]; then
    verdict=clean
  elif [ $rc -eq 9 ]; then
    verdict=ERRORS
    status=1
  else
    verdict="FAILED (exit $rc; see $log)"
    status=1
  fi
  printf '%-10s %-7s %-22s %s: %s\n' "$tool" "$backend" "$name" "$verdict" "${summary:-no summary}" | tee -a "$SUMMARY"
  if [ $rc -ne 0 ]; then  # the first findings (or the error), indented under the line
    { grep -m 20 -E "^=+ +(Invalid|Race|Error|Program hit|ERROR)|Error|error" "$log" || tail -n 20 "$log"; } |
      sed 's/^/    /'
  fi
}

for tool in "${TOOLS[@]}"; do
  for backend in $BACKENDS; do
    for op in $OPS; do
      if [ -n "${SANITIZE_CASES:-}" ] && [[ " $SANITIZE_CASES " != *" $backend:$op "* ]]; then
        continue
      fi
      run "$tool" "$backend" "$op" "$OUT/$tool-$backend-$op.log" python3 scripts/sanitize_case.py "$backend" "$op"
    done
  done
  if [ $RAW -eq 1 ]; then
    for group in $RAW_GROUPS; do
      # -k "test_bias_gelu and not layer_norm": the bias_gelu group would otherwise take bias_gelu_layer_norm too.
      select="test_$group"
      [ "$group" = bias_gelu ] && select="test_bias_gelu and not layer_norm"
      run "$tool" raw "$group" "$OUT/$tool-raw-$group.log" \
        python3 -m pytest tests/cuda/test_cuda_kernels.py -q -x -p no:cacheprovider -k "$select"
    done
  fi
done
echo "sanitize.sh: $(grep -c . "$SUMMARY") runs, $(grep -vc ' clean: ' "$SUMMARY") not clean; logs in $OUT"
exit $status
