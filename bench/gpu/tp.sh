#!/usr/bin/env bash
# Issue 14 on one GPU: tensor parallelism with several ranks sharing the device.
#   bash bench/gpu/tp.sh BIN_DIR OUT_DIR [stages]
# stages (comma list): ckpt,ref,ref32 (run.sh's), ktest (kernel tests, IPC all-reduce included),
# allreduce (µs per call), logits (teacher-forced, TP in $TPS, vs HF bf16 and fp32),
# greedy (r4b serve at each TP in $TPS: 64 greedy tokens vs TP = 1; decode graphs included),
# kill (kill -9 of one rank of a TP = $KILL_TP replica under load).
set -uo pipefail
BIN=$(realpath "${1:-dist}"); OUT=${2:-/tmp/r4b-out}; STAGES=${3:-ckpt,ref,ref32,ktest,allreduce,logits,greedy,kill}
TPS=${TPS:-1 2 4 8}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 R4B_LOG=${R4B_LOG:-info}
here=$(dirname "$0")
CK=/tmp/r4b-ckpt; REF=/tmp/r4b-ref; REF32=/tmp/r4b-ref32
has() { [[ ",$STAGES," == *",$1,"* ]]; }
stamp() { echo "== $(date +%T) $*"; }
for s in ckpt ref ref32; do has $s && bash "$here/run.sh" "$BIN" "$OUT" $s | grep -v "^== .*done"; done
if has ktest; then
  stamp kernel tests; timeout 240 "$BIN/kernels-test" --test-threads 1 2>&1 | grep -E "^test |ipc|result" | tail -20
fi
if has allreduce; then stamp "IPC all-reduce, ranks in one process on one GPU"; timeout 120 "$BIN/r4b-gpu-check" allreduce 2>&1 | tee "$OUT/allreduce.txt"; fi
if has logits; then
  for tp in $TPS; do
    stamp "logits TP=$tp (ranks as processes on one GPU)"
    timeout 300 "$BIN/r4b-gpu-check" logits $CK $REF /tmp/ours_tp$tp.safetensors --tp $tp 2>&1 | grep -E "tokens, forward|encoded in|rror|TP =|kv:|panic" | head -12
    python3 "$here/compare.py" $REF /tmp/ours_tp$tp.safetensors --json "$OUT/correctness_tp$tp.json" 2>&1 | tail -8
    [ -d $REF32 ] && python3 "$here/compare.py" $REF32 /tmp/ours_tp$tp.safetensors --json "$OUT/correctness_fp32_tp$tp.json" 2>&1 | tail -8
  done
fi
serve() { # tp port log
  "$BIN/r4b" serve $CK --device cuda --port $2 --tensor-parallel-size $1 ${SERVE_FLAGS:-} > "$3" 2>&1 &
  SERVE=$!
  for _ in $(seq 1 600); do curl -sf localhost:$2/ready > /dev/null && return 0; kill -0 $SERVE 2>/dev/null || return 1; sleep 0.5; done
  return 1
}
if has greedy; then
  files=()
  for tp in $TPS; do
    stamp "greedy TP=$tp through r4b serve"
    t0=$(date +%s.%N)
    if serve $tp 8100 "$OUT/serve_tp$tp.log"; then
      echo "ready after $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
      nvidia-smi --query-gpu=memory.used --format=csv,noheader
      timeout 300 python3 "$here/tp_greedy.py" run --url http://127.0.0.1:8100 --ref $REF --json "$OUT/greedy_tp$tp.json" && files+=("$OUT/greedy_tp$tp.json")
    else
      echo "TP=$tp did not get ready"; tail -20 "$OUT/serve_tp$tp.log"
    fi
    kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null
    grep -iE "panic|error|IPC|KV blocks|weights on GPU" "$OUT/serve_tp$tp.log" | head -6
  done
  [ ${#files[@]} -gt 1 ] && python3 "$here/tp_greedy.py" compare "${files[@]}"
fi
if has kill; then
  ktp=${KILL_TP:-4}
  stamp "kill -9 of rank 1 of a TP=$ktp replica under load"
  if serve $ktp 8101 "$OUT/serve_kill.log"; then
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
    timeout 200 python3 "$here/kill_probe.py" --url http://127.0.0.1:8101 --rank 1 --streams 4
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
    grep -iE "worker group|failed|restart|timed out|rank" "$OUT/serve_kill.log" | grep -v "^$" | head -12
  else
    echo "TP=$ktp did not get ready"; tail -20 "$OUT/serve_kill.log"
  fi
  kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null
  sleep 1
  echo "after the server stopped, compute apps on the GPU: $(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader | wc -l)"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader
fi
stamp done
