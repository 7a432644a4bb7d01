#!/usr/bin/env bash
# Prompt logprobs on the GPU engine vs an independent fp32 reference: `r4b serve --device cuda`
# on the full-size random checkpoint (run.sh's `ckpt` stage makes it) at TP=1 and TP=2 (the ranks
# share the one GPU), --max-num-batched-tokens 256 so a 700-id prompt crosses prefill chunks;
# prompt_logprobs.py sends echo + logprobs (max_tokens 0 and 1) and prompt_logprobs 3 requests,
# then computes the same positions with HF transformers in fp32 and prints max/mean |d logprob|,
# rank agreement and PASS / FAIL against HF bf16's own error vs fp32, plus the time to score 2,000 prompt tokens.
#   bash bench/gpu/prompt_logprobs.sh BIN_DIR OUT_DIR
# Env: TPS (default "1 2"), SERVE_FLAGS.
set -uo pipefail
BIN=$(realpath "${1:-dist}"); OUT=${2:-/tmp/r4b-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 R4B_LOG=${R4B_LOG:-info}
here=$(dirname "$0")
CK=/tmp/r4b-ckpt
stamp() { echo "== $(date +%T) $*"; }
[ -f $CK/config.json ] || bash "$here/run.sh" "$BIN" "$OUT" ckpt | grep -v "^== .*done"
files=()
for tp in ${TPS:-1 2}; do
  stamp "r4b serve --device cuda (TP=$tp)"
  log="$OUT/serve_prompt_logprobs_tp$tp.log"
  "$BIN/r4b" serve $CK --device cuda --port 8103 --tensor-parallel-size "$tp" \
    --max-num-batched-tokens 256 --max-model-len 4096 ${SERVE_FLAGS:-} > "$log" 2>&1 &
  SERVE=$!
  ready=0
  for _ in $(seq 1 600); do
    curl -sf localhost:8103/ready > /dev/null && { ready=1; break; }
    kill -0 $SERVE 2>/dev/null || break
    sleep 0.5
  done
  if [ $ready = 1 ]; then
    timing=""; [ "$tp" = 1 ] && timing=--timing
    if timeout 300 python3 "$here/prompt_logprobs.py" query --url http://127.0.0.1:8103 \
        --out "$OUT/prompt_logprobs_tp$tp.json" $timing; then
      files+=("$OUT/prompt_logprobs_tp$tp.json")
    else
      echo "TP=$tp: query failed"
    fi
  else
    echo "TP=$tp: r4b serve did not get ready"; tail -20 "$log"
  fi
  kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null
  grep -iE "panic|error|refused" "$log" | head -6
done
if [ ${#files[@]} -gt 0 ]; then
  stamp "HF transformers fp32 reference"
  timeout 600 python3 "$here/prompt_logprobs.py" compare $CK "${files[@]}"
else
  echo FAIL: no engine results
fi
stamp done
