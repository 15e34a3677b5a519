#!/usr/bin/env bash
# Every GPU check and benchmark of docs/BENCHMARKS.md in one script, for one short session on a lent GPU.
# Run from the repository root on a CUDA machine whose python3 has torch; logs and JSON land in $OUT
# (default ./gpu-results); the last lines printed are a summary table.
#
#   bash bench/gpu_suite.sh [STEP...]
#
# Default steps (~9 minutes on an H200): kernels decode gemv latency peer model8b latency8b prefill8b
#   kernels    GPU correctness: attention kernels, fused element-wise kernels, engine (graphs, backends) vs torch
#   decode     decode-attention KV bandwidth per backend against the d2d copy ceiling measured in the same run,
#              and whether `--attention-backend auto` picks the fastest row on this GPU
#   latency    batch-1 decode ms/token, 0.6B shape (auto backend)
#   peer       nano-vLLM vs ours on nano-vLLM's exact workload, 0.6B shape, PAIRS alternating pairs (default 3)
#   model8b    write a random-weight 8B checkpoint (on the GPU; ~16 GB) unless MODEL8B exists
#   latency8b  batch-1 decode ms/token, 8B shape
#   prefill8b  8B prefill 8 x 4,096 tokens: TFLOP/s against the bf16 matmul ceiling measured in the same run
#   gemv       the decode linear layers at M <= 8: Triton GEMV vs torch.matmul vs the weight-read floor at the copy
#              ceiling measured in the same run (bench/gemv.py; SWEEP=1 adds a tile-config sweep at M = 1)
# Optional steps: peer8b (3 more pairs on 8B, ~5 min), profile (torch profiler of batch-1 decode steps),
#   throughput, service (service/offline ratio at 256 streams), sweep (Poisson request-rate sweep through the
#   gRPC service, 1..64 req/s: TTFT / ITL p50 and p99 to $OUT/sweep.json; bench/plot_sweep.py draws it),
#   unfused, switches (batch-1 latency with QWEN3_FUSED_KV_STORE=0, QWEN3_GEMV_SILU=0, QWEN3_GEMV=0,
#   QWEN3_PDL=1),
#   hf (the older rows of docs/BENCHMARKS.md),
#   structured (tests/gpu/test_structured_gpu.py: constrained outputs on CUDA checked with fresh matchers; then 256
#   concurrent JSON-schema requests vs the same unconstrained, 0.6B shape: output tok/s ratio; needs xgrammar),
#   structured8b (the same on the 8B shape after model8b, then a torch-profiler table of 20 constrained steps;
#   not yet run on a GPU).
#   smg (256 streaming /v1/completions through the SMG gateway to one replica, next to the same streams over
#   gRPC and the offline engine; SMG_WHEEL=path/to/smg-*.whl (more wheels: space-separated) is installed first with
#   pip --no-deps into /tmp/smg-site, since the device has no network).
#
# nano-vLLM (steps peer, peer8b) runs on FlashAttention-4 through the peer folder's shim: stage FA4 first
# (shared/device/README.md: call 1 carries .device/fa4a and sources its setup.sh; call 2 carries .device/grpc and
# .device/fa4b and runs `source .device/fa4b/setup.sh && bash bench/gpu_suite.sh`). PEER_DIR (default
# ../shared/peer, then .perf/peer) is the peer folder; without flash_attn.cute the peer steps say so and skip.
set -uo pipefail
OUT=${OUT:-gpu-results}
PY=${PY:-python3}
MODEL=${MODEL:-/tmp/qwen3-0.6b-random}
MODEL8B=${MODEL8B:-/tmp/qwen3-8b-random}
PAIRS=${PAIRS:-3}
if [ -z "${PEER_DIR:-}" ]; then
  for d in ../shared/peer shared/peer .perf/peer; do [ -f "$d/peer_bench.py" ] && PEER_DIR=$(cd "$d" && pwd) && break; done
fi
PEER_DIR=${PEER_DIR:-../shared/peer}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(kernels decode gemv latency peer model8b latency8b prefill8b)
backends=$($PY -c "
import torch
from qwen3.attention.backend import auto_backend_name, backend_unavailable_reason
print(' '.join(b for b in ('flash-attn', 'triton') if not backend_unavailable_reason(b, torch.device('cuda'))))")
auto=$($PY -c "import torch; from qwen3.attention.backend import auto_backend_name; print(auto_backend_name(torch.device('cuda'), torch.bfloat16))")
commit=$(cat .perf-commit 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)  # .perf-commit: a copied tree
echo "# $(date -u +%FT%TZ) commit $commit; $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader); backends: $backends; auto: $auto; peer: $PEER_DIR" | tee "$OUT/summary.txt"
summary() { echo "$*" | tee -a "$OUT/summary.txt" > /dev/null; }

step() {  # step NAME TIMEOUT_S COMMAND...: run one step, log it, never stop the suite
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "## $name: rc=$rc in $((SECONDS - t0)) s"
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  summary "$name rc=$rc $((SECONDS - t0))s: $(grep -E "${PICK:-.}" "$OUT/$name.log" | tail -n 1)"
}
have_fa4() { $PY -c "import flash_attn.cute" > /dev/null 2>&1; }

[ -f qwen3serve/__init__.py ] || make proto-gen PY=$PY > "$OUT/proto.log" 2>&1
[ -f "$MODEL/config.json" ] || $PY -m qwen3.testing.make_checkpoint --preset qwen3-0.6b --out "$MODEL" --device cuda > "$OUT/model.log" 2>&1

for s in "${steps[@]}"; do
  case $s in
    kernels) TAIL=15 PICK="passed|failed|error" step kernels 240 $PY -m pytest -q -p no:cacheprovider -x \
               tests/gpu/test_attention_kernels.py tests/gpu/test_fused_kernels.py tests/gpu/test_decode_kernels.py \
               tests/gpu/test_engine_gpu.py ;;
    gemv) TAIL=60 PICK="per token" step gemv 300 $PY bench/gemv.py ${SWEEP:+--sweep} --json "$OUT/results.jsonl" ;;
    decode) TAIL=20 PICK="auto picks" step decode 180 $PY bench/attention_decode.py --graphs --json "$OUT/decode.json"
            summary "decode rows: $(grep -E '^(triton|flash-attn|d2d) ' "$OUT/decode.log" | awk '{printf "%s/%s/%s %s TB/s %s; ", $1, $2, $3, $5, $6}')" ;;
    latency) TAIL=4 PICK="ms/token" step latency 150 $PY bench/latency.py --model "$MODEL" --json "$OUT/results.jsonl" ;;
    profile) TAIL=40 step profile 150 $PY bench/latency.py --model "$MODEL" --repeats 1 --output-len 64 --profile 32 ;;
    peer|peer8b)
      m=$MODEL; [ "$s" = peer8b ] && m=$MODEL8B
      if ! have_fa4; then summary "$s: skipped (flash_attn.cute not importable: stage FA4 first)"; echo "## $s: skipped, no FA4"; continue; fi
      TAIL=12 PICK="median of" step "$s" 560 $PY bench/peer_compare.py --model "$m" --peer-dir "$PEER_DIR" --pairs "$PAIRS" \
        --log "$OUT/$s-runs.log" --json "$OUT/results.jsonl" ;;
    model8b) [ -f "$MODEL8B/config.json" ] || TAIL=3 step model8b 240 $PY -m qwen3.testing.make_checkpoint \
               --preset qwen3-8b --out "$MODEL8B" --device cuda ;;
    latency8b) TAIL=4 PICK="ms/token" step latency8b 150 $PY bench/latency.py --model "$MODEL8B" --repeats 3 --output-len 128 --json "$OUT/results.jsonl" ;;
    prefill8b) TAIL=4 PICK="prefill" step prefill8b 150 $PY bench/prefill.py --model "$MODEL8B" --json "$OUT/results.jsonl" ;;
    throughput)
      for b in $backends; do
        TAIL=4 PICK="tok/s" step "throughput-$b" 300 $PY bench/throughput.py --model "$MODEL" --attention-backend "$b" --json "$OUT/results.jsonl"
      done ;;
    unfused)  # A/B: the PyTorch element-wise path instead of the fused Triton kernels
      QWEN3_TORCH_ELEMENTWISE=1 TAIL=4 PICK="ms/token" step latency-unfused 180 $PY bench/latency.py --model "$MODEL" --json "$OUT/results.jsonl" ;;
    switches)  # A/B, batch-1 latency: QWEN3_FUSED_KV_STORE, QWEN3_GEMV_SILU, QWEN3_GEMV each off, then the opt-in QWEN3_PDL=1 on
      QWEN3_FUSED_KV_STORE=0 TAIL=4 PICK="ms/token" step latency-no-fused-store 150 $PY bench/latency.py --model "$MODEL" --json "$OUT/results.jsonl"
      QWEN3_GEMV_SILU=0 TAIL=4 PICK="ms/token" step latency-no-gemv-silu 150 $PY bench/latency.py --model "$MODEL" --json "$OUT/results.jsonl"
      QWEN3_GEMV=0 TAIL=4 PICK="ms/token" step latency-no-gemv 150 $PY bench/latency.py --model "$MODEL" --json "$OUT/results.jsonl"
      QWEN3_PDL=1 TAIL=4 PICK="ms/token" step latency-pdl 150 $PY bench/latency.py --model "$MODEL" --json "$OUT/results.jsonl" ;;
    service) TAIL=8 PICK="service / offline" step service 400 $PY bench/service_throughput.py --model "$MODEL" ;;
    sweep)  # latency under load; draw it elsewhere: python bench/plot_sweep.py $OUT/sweep.json docs/load_sweep.png
      TAIL=12 PICK="wrote" step sweep 540 $PY bench/load_sweep.py --model "$MODEL" --json "$OUT/sweep.json" ;;
    structured) TAIL=3 PICK="passed|failed|error" step structured-test 240 $PY -m pytest -q -p no:cacheprovider \
                  tests/gpu/test_structured_gpu.py
                TAIL=4 PICK="ratio" step structured 400 $PY bench/structured_throughput.py --model "$MODEL" \
                  --json "$OUT/results.jsonl" ;;
    structured8b)  # needs model8b first; the torch-profiler table shows where the constrained 8B step's device idles
      TAIL=40 PICK="ratio" step structured8b 400 $PY bench/structured_throughput.py --model "$MODEL8B" \
        --profile 40:20 --json "$OUT/results.jsonl" ;;
    smg)
      if [ -n "${SMG_WHEEL:-}" ]; then  # unquoted on purpose: one or more wheel paths
        $PY -m pip install -q --no-index --no-deps --target /tmp/smg-site $SMG_WHEEL > "$OUT/smg-install.log" 2>&1
        export PYTHONPATH="/tmp/smg-site:$PYTHONPATH"
      fi
      TAIL=10 PICK="SMG / offline" step smg 560 $PY bench/smg_throughput.py --model "$MODEL" \
        --smg-log "$OUT/smg-gateway.log" --json "$OUT/results.jsonl" ;;
    hf) TAIL=6 step hf 480 $PY bench/throughput.py --model "$MODEL" --hf --json "$OUT/results.jsonl" ;;  # same run
    *) echo "unknown step $s" ;;
  esac
done
echo "# ===== summary ($OUT/summary.txt) ====="
cat "$OUT/summary.txt"
