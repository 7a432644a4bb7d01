#!/usr/bin/env bash
# Issue 17, second call on the H200 (final binaries): prompt logprobs on the GPU engine against
# an HF fp32 reference at TP 1 and 2 (prompt_logprobs.sh), then structured output's checks and
# its 64-stream cost again on the merged code (structured.sh).
#   bash bench/gpu/s23b.sh BIN_DIR OUT_DIR
set -uo pipefail
BIN=$(realpath "$1"); OUT=${2:-/tmp/r4b-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
here=$(dirname "$0")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bash "$here/run.sh" "$BIN" "$OUT" ckpt | grep -v "^== .*done"
bash "$here/prompt_logprobs.sh" "$BIN" "$OUT"
STREAMS="1 64" bash "$here/structured.sh" "$BIN" "$OUT/structured"
