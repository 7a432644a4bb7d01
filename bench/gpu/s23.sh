#!/usr/bin/env bash
# Issue 17 on the H200, one call: the token-mask kernel test and the GPU sampler's masked rows,
# then structured output's cost (structured.sh: 1 and 64 json_schema streams vs unconstrained),
# and the unconstrained figures of the previous binaries in the same run (before/after).
#   bash bench/gpu/s23.sh NEW_BIN_DIR OLD_BIN_DIR OUT_DIR
set -uo pipefail
NEW=$(realpath "$1"); OLD=$(realpath "$2"); OUT=${3:-/tmp/r4b-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
here=$(dirname "$0")
stamp() { echo "== $(date +%T) $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
bash "$here/run.sh" "$NEW" "$OUT" ckpt | grep -v "^== .*done"
stamp "kernel tests (device kernels)"; timeout 180 "$NEW/kernels-test" --test-threads 1 2>&1 | grep -E "^test |result" | tail -24
stamp "GPU sampler vs host sampler, masked rows included"; timeout 120 "$NEW/r4b-gpu-check" sample 2>&1 | tee "$OUT/sample.txt" | tail -30
STREAMS="1 64" bash "$here/structured.sh" "$NEW" "$OUT"
stamp "before: the previous binaries, unconstrained only"
"$OLD/r4b" serve /tmp/r4b-ckpt --device cuda --port 8103 > "$OUT/serve_old.log" 2>&1 &
S=$!
for _ in $(seq 1 600); do curl -sf localhost:8103/ready > /dev/null && break; kill -0 $S 2>/dev/null || break; sleep 0.5; done
timeout 300 python3 "$here/structured_bench.py" --url http://127.0.0.1:8103 --streams 1 64 --free-only --json "$OUT/structured_before.json"
kill $S 2>/dev/null; wait $S 2>/dev/null
stamp "after again (order effects)"
STREAMS="1 64" bash "$here/structured.sh" "$NEW" "$OUT/again" 2>&1 | grep -E "streams:|FAIL|rror"
stamp done
