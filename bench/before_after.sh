#!/usr/bin/env bash
# A refactor's speed check in one device call: the benchmark workload's output tok/s (bench/throughput.py) and
# batch-1 ms/token (bench/latency.py) of an earlier tree BEFORE and of this tree AFTER, alternating
# (before, after, before, after, ...) on one GPU and one random-weight checkpoint, so that a shared machine's drift
# falls on both sides alike. Prints one line per run and the medians last.
#
#   bash bench/before_after.sh BEFORE_DIR [ROUNDS]
#
# BEFORE_DIR is a copy of the earlier tree (e.g. `git archive REV | tar -x -C .perf/before`); its commit is read
# from BEFORE_DIR/.perf-commit. Needs CUDA; MODEL (default /tmp/qwen3-0.6b-random) is written when missing.
set -uo pipefail
BEFORE=${1:?usage: bench/before_after.sh BEFORE_DIR [ROUNDS]}
ROUNDS=${2:-2}
PY=${PY:-python3}
OUT=${OUT:-gpu-results}
MODEL=${MODEL:-/tmp/qwen3-0.6b-random}
BACKEND=${BACKEND:-triton}
mkdir -p "$OUT"
AFTER=$PWD
export PYTHONUNBUFFERED=1
[ -f "$MODEL/config.json" ] || $PY -m qwen3.testing.make_checkpoint --preset qwen3-0.6b --out "$MODEL" > "$OUT/ba-model.log" 2>&1
(cd "$BEFORE" && [ -f qwen3serve/__init__.py ] || make -s proto-gen PY=$PY) > "$OUT/ba-proto.log" 2>&1
log="$OUT/before_after.log"
: > "$log"
run() {  # run SIDE DIR: one throughput and one latency measurement of the tree in DIR
  local side=$1 dir=$2
  local tput lat
  tput=$(cd "$dir" && PYTHONPATH="$dir" timeout 240 $PY bench/throughput.py --model "$MODEL" \
           --attention-backend "$BACKEND" 2>&1 | tee -a "$log" | grep -A1 'output tok/s' | tail -n 1 | awk '{print $NF " output tok/s"}')
  lat=$(cd "$dir" && PYTHONPATH="$dir" timeout 180 $PY bench/latency.py --model "$MODEL" \
          --attention-backend "$BACKEND" --repeats 3 2>&1 | tee -a "$log" | grep -oE '[0-9.]+ ms/token' | tail -n 1)
  echo "$side ${tput:-?} ${lat:-?}" | tee -a "$OUT/before_after.txt"
}
echo "# before $(cat "$BEFORE/.perf-commit" 2>/dev/null || echo '?'), after $(cat .perf-commit 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo '?'), backend $BACKEND, $(date -u +%FT%TZ)" | tee "$OUT/before_after.txt"
for _ in $(seq "$ROUNDS"); do
  run before "$BEFORE"
  run after "$AFTER"
done
$PY - "$OUT/before_after.txt" <<'EOF'
import re, statistics, sys
rows = [line.split(maxsplit=1) for line in open(sys.argv[1]) if line[:6] in ("before", "after ")]
for side in ("before", "after"):
    vals = [r[1] for r in rows if r[0] == side]
    tput = [float(m.group().replace(",", "")) for v in vals if (m := re.search(r"[0-9][0-9,.]*(?= output)", v))]
    lat = [float(m.group(1)) for v in vals if (m := re.search(r"([0-9.]+) ms/token", v))]
    print(f"{side}: median {statistics.median(tput) if tput else float('nan'):,.0f} output tok/s, "
          f"{statistics.median(lat) if lat else float('nan'):.3f} ms/token ({len(tput)} runs)")
EOF
