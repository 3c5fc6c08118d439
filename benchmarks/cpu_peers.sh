#!/usr/bin/env bash
# fastbert against transformers, ONNX Runtime and OpenVINO on CPU: the workloads of the README's peer table, fp32
# and bf16, each run writing its JSON into benchmarks/results/<device>/ (default cpu-xeon-2core), then the README
# table is regenerated with benchmarks/update_readme.py. Needs the peers extra: pip install -e ".[peers]". Usage: benchmarks/cpu_peers.sh [OUT] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/cpu-xeon-2core}
THREADS=${2:-2}
PEERS=fastbert,transformers-sdpa,onnxruntime,openvino
run() {
  echo "== fastbert bench $*"
  python -m fastbert bench --device cpu --threads "$THREADS" --out "$OUT" "$@" 2>&1 | grep -v "it/s\]" | tail -n 30 \
    || echo "(exit status $?)"
}
# Workload by workload, fp32 then bf16, so that a run cut short still has both precisions of the first ones.
for dtype in fp32 bf16; do
  extra=$([ "$dtype" = fp32 ] && echo ",onnxruntime-int8" || true)
  run --model minilm --dtype "$dtype" --providers "$PEERS$extra" --batch-sizes 1,32 --seq-lens 16,128
done
for dtype in fp32 bf16; do
  run --model minilm --dtype "$dtype" --providers "$PEERS" --batch-sizes 32 --seq-lens 120 --varlen
done
for dtype in fp32 bf16; do
  run --model bert-base --dtype "$dtype" --providers "$PEERS" --batch-sizes 1,8 --seq-lens 128
done
for dtype in fp32 bf16; do
  run --encode --dtype "$dtype" --providers "$PEERS" --repeats 5
done
echo "now: python benchmarks/update_readme.py"
