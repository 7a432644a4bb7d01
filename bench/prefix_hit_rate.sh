#!/usr/bin/env bash
# Prefix-cache hit rate, prefix-aware routing vs round-robin, on a multi-turn chat workload:
# two replicas (TP = 2 each, CPU, embedded model) in a real etcd behind one gateway.
# Needs protoc (etcd-client's build) and /usr/bin/etcd (Debian etcd-server).
# Knobs: CONVS (16), TURNS (6), CLIENTS (4). Prints one RESULT line per policy.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test -p r4b --features etcd --locked --test prefix_routing -- --ignored --nocapture 2>&1 \
  | grep -E '^(RESULT|SKIPPED|test result)|panicked'
