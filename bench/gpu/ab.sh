#!/usr/bin/env bash
# Before/after in one call on the GPU machine: one checkpoint and one HF reference, then each unit
# of run.sh stages for the "before" binaries and right after it for the "after" ones, so the two
# sets see the same device state (issue 13's acceptance: logits, decode and HTTP figures).
#   bash bench/gpu/ab.sh BEFORE_DIR AFTER_DIR OUT_DIR ["logits,compare decode http"]
# Each directory holds `r4b` and `r4b-gpu-check` as run.sh expects; figures land in
# OUT_DIR/before and OUT_DIR/after (run.sh's files) and on stdout.
set -uo pipefail
BEFORE=$1; AFTER=$2; OUT=$3; UNITS=${4:-logits,compare decode http}
here=$(dirname "$0")
bash "$here/run.sh" "$AFTER" "$OUT/after" ckpt,ref
for unit in $UNITS; do
  for side in before after; do
    dir=$BEFORE; [ "$side" = after ] && dir=$AFTER
    echo "######## $side: $unit"
    bash "$here/run.sh" "$dir" "$OUT/$side" "$unit"
  done
done
