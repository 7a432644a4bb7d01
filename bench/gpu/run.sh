#!/usr/bin/env bash
# One scripted GPU run (see bench/gpu/README.md): full-size random checkpoint → HF reference logits →
# our logits → comparison → engine decode figures → HTTP TTFT/throughput → HF generate baseline.
#   bash bench/gpu/run.sh BIN_DIR OUT_DIR [stages]   (stages: comma list, default all)
# BIN_DIR holds `r4b` and `r4b-gpu-check` built with `--features cuda` on the build machine.
set -uo pipefail
BIN=$(realpath "${1:-dist}"); OUT=${2:-/tmp/r4b-out}; STAGES=${3:-ckpt,ref,logits,compare,ktest,logits80,sample,profile,decode,sampled,eager,nccl,http,hf}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export R4B_LOG=${R4B_LOG:-info,r4b_worker=debug,r4b_gateway::images=debug,r4b_gateway::generate=debug,r4b_coordinator::engine=debug}
CK=/tmp/r4b-ckpt; REF=/tmp/r4b-ref; REF32=/tmp/r4b-ref32
has() { [[ ",$STAGES," == *",$1,"* ]]; }
stamp() { echo "== $(date +%T) $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
if has ckpt && [ ! -f $CK/config.json ]; then
  stamp checkpoint; python3 bench/gpu/make_checkpoint.py $CK 2>&1 | tail -8
fi
if has ref; then stamp hf_reference; python3 bench/gpu/hf_reference.py $CK $REF 2>&1 | tail -12; fi
if has ref32; then
  stamp hf_reference fp32; python3 bench/gpu/hf_reference.py $CK $REF32 --dtype fp32 2>&1 | tail -6
fi
if has logits; then stamp our logits; timeout 180 "$BIN/r4b-gpu-check" logits $CK $REF /tmp/ours.safetensors; fi
if has compare; then
  stamp compare: ours vs HF bf16; python3 bench/gpu/compare.py $REF /tmp/ours.safetensors --json "$OUT/correctness.json"
  if [ -d $REF32 ]; then
    stamp compare: ours vs HF fp32
    python3 bench/gpu/compare.py $REF32 /tmp/ours.safetensors --json "$OUT/correctness_fp32.json"
    stamp compare: HF bf16 vs HF fp32 "(the reference's own bf16 error)"
    python3 bench/gpu/compare.py $REF32 $REF/reference.safetensors --json "$OUT/hf_bf16_vs_fp32.json"
  fi
fi
if has ktest; then
  # The kernel tests (kernels/tests/kernels.rs, built with --features cuda --release --no-run
  # and copied to BIN_DIR/kernels-test), with the device's own kernels and with the sm_80 ones.
  stamp kernel tests, device kernels; timeout 180 "$BIN/kernels-test" --test-threads 1 2>&1 | tail -16
  stamp kernel tests, sm_80 kernels; R4B_KERNEL_ARCH=sm80 timeout 180 "$BIN/kernels-test" --test-threads 1 2>&1 | tail -16
fi
if has logits80; then
  stamp our logits, sm_80 kernels; timeout 180 "$BIN/r4b-gpu-check" logits $CK $REF /tmp/ours80.safetensors --kernel-arch sm80 2>&1 | grep -vE "loading weights"
  stamp compare: ours sm_80 vs HF bf16; python3 bench/gpu/compare.py $REF /tmp/ours80.safetensors --json "$OUT/correctness_sm80.json"
fi
if has sample; then stamp GPU sampler vs host sampler; timeout 120 "$BIN/r4b-gpu-check" sample 2>&1 | tee "$OUT/sample.txt"; fi
if has attn; then stamp attention kernels; timeout 120 "$BIN/r4b-gpu-check" attn 2>&1 | tee "$OUT/attn.txt"; fi
if has profile; then stamp profile; timeout 120 "$BIN/r4b-gpu-check" profile 2>&1 | tee "$OUT/profile.txt"; fi
if has decode; then
  stamp engine decode
  timeout 240 "$BIN/r4b-gpu-check" decode $CK --batches ${BATCHES:-1,8,32,64,128,256} 2>&1 | tee "$OUT/decode.txt"
fi
if has sampled; then
  stamp engine decode, sampled rows "(temperature 0.8, top-p 0.9, GPU sampler)"
  timeout 180 "$BIN/r4b-gpu-check" decode $CK --batches ${SAMPLED_BATCHES:-1,256} --sampled 2>&1 | grep -E "^\| [0-9]|rror" | tee "$OUT/decode_sampled.txt"
fi
if has eager; then
  stamp engine decode eager
  timeout 120 "$BIN/r4b-gpu-check" decode $CK --batches 1,64 --output 128 --eager 2>&1 | tee "$OUT/decode_eager.txt"
fi
if has nccl; then
  stamp NCCL forced at TP=1
  timeout 120 "$BIN/r4b-gpu-check" logits $CK $REF /tmp/ours_nccl.safetensors --force-nccl 2>&1 | grep -E "decode path|NCCL|rror"
  timeout 120 "$BIN/r4b-gpu-check" decode $CK --batches 1,64 --output 128 --force-nccl 2>&1 | grep -E "^\| [0-9]|rror"
fi
if has http; then
  stamp http
  t0=$(date +%s.%N)
  "$BIN/r4b" serve $CK --device cuda --port 8000 > "$OUT/serve.log" 2>&1 &
  SERVE=$!
  for _ in $(seq 1 240); do
    curl -sf localhost:8000/ready > /dev/null && break
    kill -0 $SERVE 2>/dev/null || break
    sleep 0.5
  done
  echo "serve ready after $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
  timeout 300 python3 bench/gpu/http_bench.py --image $REF/image_640x480.png --streams ${STREAMS:-1 256} \
    --sampled-streams ${SAMPLED_STREAMS:-1 256} \
    --json "$OUT/http.json" 2>&1 | tail -24
  kill $SERVE; wait $SERVE 2>/dev/null
  grep -iE "error|panic|weights on GPU|encoded|image [0-9]" "$OUT/serve.log" | head -14
  grep -E "step [0-9]+: 1 sequences, 29" "$OUT/serve.log" | head -4
  # Time to first token, split: gateway before submit / coordinator queue / steps / round trip.
  grep -E "first token|first message" "$OUT/serve.log" | sed -n 3,8p
fi
if has soak || has respawn; then
  # Issue 12 on the GPU: a 10x overload soak (admission control), then kill -9 of the rank
  # under load (respawn, memory freed). The same server for both.
  stamp "serve for soak/respawn (--max-num-seqs ${SOAK_SEQS:-16} --max-queue ${SOAK_QUEUE:-4})"
  "$BIN/r4b" serve $CK --device cuda --port 8001 --max-num-seqs ${SOAK_SEQS:-16} \
    --max-queue ${SOAK_QUEUE:-4} > "$OUT/serve_soak.log" 2>&1 &
  SERVE=$!
  for _ in $(seq 1 240); do curl -sf localhost:8001/ready > /dev/null && break; kill -0 $SERVE 2>/dev/null || break; sleep 0.5; done
  if has soak; then
    stamp soak
    timeout 200 python3 bench/gpu/soak.py --url http://127.0.0.1:8001 \
      --capacity $(( ${SOAK_SEQS:-16} + ${SOAK_QUEUE:-4} )) --secs ${SOAK_SECS:-30} --json "$OUT/soak.json"
  fi
  if has respawn; then
    stamp "respawn: kill -9 of the rank under load"
    timeout 120 python3 bench/gpu/soak.py --url http://127.0.0.1:8001 --capacity 4 --secs 40 \
      > "$OUT/respawn_load.txt" 2>&1 &
    LOAD=$!
    sleep 8
    WPID=$(curl -s localhost:8001/health | python3 -c "import json,sys; print(json.load(sys.stdin)['replicas'][0]['worker_pids'][0])")
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
    t0=$(date +%s.%N); kill -9 $WPID
    for _ in $(seq 1 600); do
      H=$(curl -s localhost:8001/health); R=$(echo "$H" | python3 -c "import json,sys; r=json.load(sys.stdin)['replicas'][0]; print(r['state'], r['restarts'], (r['worker_pids'] or [0])[0])")
      set -- $R; [ "$1" = serving ] && [ "$2" -ge 1 ] && [ "$3" != "$WPID" ] && break; sleep 0.1
    done
    echo "serving again $(python3 -c "print(round($(date +%s.%N) - $t0, 2))") s after kill -9 of pid $WPID (state $1, restarts $2, new pid $3)"
    echo "old pid still present: $(ps -p $WPID -o stat= || echo no)"
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
    wait $LOAD; cat "$OUT/respawn_load.txt"
  fi
  kill $SERVE; wait $SERVE 2>/dev/null
  grep -iE "worker group|restarted|refused|panic" "$OUT/serve_soak.log" | head -8
fi
if has hf; then stamp hf_generate; python3 bench/gpu/hf_generate.py $CK --json "$OUT/hf.json" 2>&1 | tail -8; fi
stamp done
