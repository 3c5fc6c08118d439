#!/usr/bin/env bash
# Everything fastbert checks on a GPU, in one call (device time is scarce): the CUDA tests of every backend, the
# raw CUDA launchers against NumPy, compute-sanitizer on the kernels at small sizes, and the benchmarks.
# Logs and results go to $OUT (default /tmp/fastbert-gpu): 8 files, at most two folders deep (the device tool's
# limit), to be committed under benchmarks/results/<device>/.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh [quick]
#
# Runs from the repository root with the machine's own torch/triton/transformers (no install, no network):
# the MiniLM weights package is usually absent there, so model checks use random bert-base/bert-large weights.
set -uo pipefail
OUT=${OUT:-/tmp/fastbert-gpu}
mkdir -p "$OUT/bench"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
log() { echo "=== $* ($(date +%T))" | tee -a "$OUT/session.log"; }

log "device"
{ nvidia-smi; python3 -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, \
triton.__version__, transformers.__version__, torch.cuda.get_device_name())"; python3 -m fastbert backends; } \
  >>"$OUT/session.log" 2>&1

log "CUDA tests (every backend: torch, triton, cuda when bound)"
python3 -m pytest tests -q -x -m cuda -p no:cacheprovider 2>&1 | tee "$OUT/tests-cuda.log" | tail -5
log "op suites on CUDA-capable backends + raw launchers vs NumPy"
python3 -m pytest tests/ops tests/cuda -q -p no:cacheprovider 2>&1 | tee "$OUT/tests-ops.log" | tail -5

log "compute-sanitizer memcheck + racecheck, every GPU kernel (scripts/sanitize.sh; full logs stay on the machine)"
OUT=/tmp/fastbert-sanitizer bash scripts/sanitize.sh 2>&1 | tee "$OUT/sanitizer.log" | tail -1 | tee -a "$OUT/session.log"

[ "${1:-}" = quick ] && exit 0
log "per-op benchmarks"
python3 -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider --benchmark-json="$OUT/bench/ops.json" \
  >>"$OUT/session.log" 2>&1
log "model benchmarks"
python3 -m fastbert bench --model bert-base --batch-sizes 32 --seq-lens 128,512 --out "$OUT/bench" \
  >>"$OUT/session.log" 2>&1
log "padding-free: bert-base batch 32, lengths uniform in [32, 512]"
python3 -m fastbert bench --model bert-base --batch-sizes 32 --seq-lens 512 --varlen --out "$OUT/bench" \
  >>"$OUT/session.log" 2>&1
log "latency: batch 1 x 128 (CUDA graphs)"
python3 -m fastbert bench --model bert-base --batch-sizes 1 --seq-lens 128 --out "$OUT/bench" \
  --providers fastbert,fastbert-cudagraphs,transformers-eager,transformers-sdpa >>"$OUT/session.log" 2>&1
log "training step: BertModel bert-base 32 x 128"
python3 -m fastbert bench --model bert-base --batch-sizes 32 --seq-lens 128 --train --out "$OUT/bench" \
  >>"$OUT/session.log" 2>&1
log "done"
