#!/usr/bin/env bash
# Issue 17: structured output's cost on the GPU. 64 concurrent greedy streams (ignore_eos, fixed
# max_tokens) with a json_schema each vs 64 unconstrained, through `r4b serve --device cuda` on
# the full-size random checkpoint (run.sh's `ckpt` stage makes it), printing tok/s of both and
# the ratio (target ≥ 0.90), plus 1 stream each.
#   bash bench/gpu/structured.sh BIN_DIR OUT_DIR
# Env: STREAMS (default "1 64"), OUTPUT_TOKENS (256), TP (1), SERVE_FLAGS.
set -uo pipefail
BIN=$(realpath "${1:-dist}"); OUT=${2:-/tmp/r4b-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 R4B_LOG=${R4B_LOG:-info}
here=$(dirname "$0")
CK=/tmp/r4b-ckpt
stamp() { echo "== $(date +%T) $*"; }
[ -f $CK/config.json ] || bash "$here/run.sh" "$BIN" "$OUT" ckpt | grep -v "^== .*done"
stamp "r4b serve --device cuda (TP=${TP:-1})"
"$BIN/r4b" serve $CK --device cuda --port 8102 --tensor-parallel-size "${TP:-1}" ${SERVE_FLAGS:-} > "$OUT/serve_structured.log" 2>&1 &
SERVE=$!
ready=0
for _ in $(seq 1 600); do
  curl -sf localhost:8102/ready > /dev/null && { ready=1; break; }
  kill -0 $SERVE 2>/dev/null || break
  sleep 0.5
done
if [ $ready = 1 ]; then
  stamp "64 json_schema streams vs 64 unconstrained"
  timeout 900 python3 "$here/structured_bench.py" --url http://127.0.0.1:8102 --streams ${STREAMS:-1 64} \
    --output-tokens "${OUTPUT_TOKENS:-256}" --json "$OUT/structured.json"
else
  echo "r4b serve did not get ready"; tail -20 "$OUT/serve_structured.log"
fi
kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null
grep -iE "panic|error|refused" "$OUT/serve_structured.log" | head -6
stamp done
