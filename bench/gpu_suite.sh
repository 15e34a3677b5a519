#!/usr/bin/env bash
# Every GPU check and benchmark of docs/BENCHMARKS.md in one script, for one short session on a lent GPU.
# Run from the repository root on a CUDA machine whose python3 has torch (and, for the flash-attn rows,
# flash-attn-4); logs and JSON land in $OUT (default ./gpu-results).
#
#   bash bench/gpu_suite.sh [STEP...]      STEP: kernels engine decode latency throughput service hf unfused
#                                          (default: all but hf; hf runs the engine and then
#                                          transformers' continuous batching (~4 minutes) in one process)
set -uo pipefail
OUT=${OUT:-gpu-results}
PY=${PY:-python3}
MODEL=${MODEL:-/tmp/qwen3-0.6b-random}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(kernels engine decode latency throughput service)
backends=$($PY -c "
import torch
from qwen3.attention.backend import backend_unavailable_reason
print(' '.join(b for b in ('flash-attn', 'triton') if not backend_unavailable_reason(b, torch.device('cuda'))))")
echo "# $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader); backends: $backends"

step() {  # step NAME TIMEOUT_S COMMAND...: run one step, log it, never stop the suite
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "## $name: rc=$rc in $((SECONDS - t0)) s"
  tail -n "${TAIL:-25}" "$OUT/$name.log"
}

[ -f qwen3serve/__init__.py ] || make proto-gen PY=$PY > "$OUT/proto.log" 2>&1
[ -f "$MODEL/config.json" ] || $PY -m qwen3.testing.make_checkpoint --preset qwen3-0.6b --out "$MODEL" > "$OUT/model.log" 2>&1

for s in "${steps[@]}"; do
  case $s in
    kernels) step kernels 300 $PY -m pytest -q -p no:cacheprovider tests/gpu/test_attention_kernels.py ;;
    engine) TAIL=40 step engine 300 $PY -m pytest -q -s -p no:cacheprovider tests/gpu/test_engine_gpu.py tests/gpu/test_fused_kernels.py ;;
    decode) TAIL=40 step decode 240 $PY bench/attention_decode.py --graphs --json "$OUT/decode.json" ;;
    latency)
      for b in $backends; do
        TAIL=4 step "latency-$b" 180 $PY bench/latency.py --model "$MODEL" --attention-backend "$b" --json "$OUT/results.jsonl"
      done
      # A/B: the same run waiting for every step (no async scheduling)
      TAIL=4 step latency-sync 180 $PY bench/latency.py --model "$MODEL" --no-async-scheduling --json "$OUT/results.jsonl"
      TAIL=40 step latency-profile 180 $PY bench/latency.py --model "$MODEL" --repeats 1 --output-len 64 --profile 32 ;;
    throughput)
      for b in $backends; do
        TAIL=4 step "throughput-$b" 300 $PY bench/throughput.py --model "$MODEL" --attention-backend "$b" --json "$OUT/results.jsonl"
      done
      TAIL=4 step throughput-sync 300 $PY bench/throughput.py --model "$MODEL" --no-async-scheduling --json "$OUT/results.jsonl"
      # where a full-batch decode step's time goes (the first backend, 10 steps from step 300)
      TAIL=32 step throughput-profile 300 $PY bench/throughput.py --model "$MODEL" --profile 300:10 ;;
    unfused)  # A/B: the PyTorch element-wise path instead of the fused Triton kernels
      QWEN3_TORCH_ELEMENTWISE=1 TAIL=4 step latency-unfused 180 $PY bench/latency.py --model "$MODEL" --json "$OUT/results.jsonl" ;;
    service) TAIL=8 step service 400 $PY bench/service_throughput.py --model "$MODEL" ;;
    hf) TAIL=6 step hf 480 $PY bench/throughput.py --model "$MODEL" --hf --json "$OUT/results.jsonl" ;;  # same run
    *) echo "unknown step $s" ;;
  esac
done
