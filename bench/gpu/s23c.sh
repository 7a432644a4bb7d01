#!/usr/bin/env bash
# Issue 17, third call on the H200: prompt logprobs on the GPU engine (host scoring now parallel
# over rows) against HF fp32, judged by HF bf16's own error (prompt_logprobs.sh).
#   bash bench/gpu/s23c.sh BIN_DIR OUT_DIR
set -uo pipefail
BIN=$(realpath "$1"); OUT=${2:-/tmp/r4b-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
here=$(dirname "$0")
bash "$here/run.sh" "$BIN" "$OUT" ckpt | grep -v "^== .*done"
bash "$here/prompt_logprobs.sh" "$BIN" "$OUT"
