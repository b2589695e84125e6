#!/usr/bin/env bash
# Transaction coordinator benchmark: two-branch sagas, TCC (two branches) and 2-phase messages
# through DTM's HTTP API, each submitted with wait_result (an answer = the transaction finished,
# durably), against a local branch server that answers at once; closed loop at 1, 16, 64, then
# sagas open loop at 1,000/s for completion latency. Not part of CI.
# Usage: bench/txn.sh [seconds-per-scenario]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
SECS=${1:-5}
PORT=18800
DTM=127.0.0.1:$((PORT + 400))
cargo build --release -q -p zhili -p zhili-bench
echo "# machine: $(machine)"
out=$($GEN ready --bin $BIN --data-dir "$WORK/zhili" --addr 127.0.0.1:$PORT --keep)
pids+=("$(echo "$out" | field pid)")
for mode in saga tcc msg; do
  echo "## $mode, closed loop"
  for c in 1 16 64; do $GEN txn --target $DTM --mode $mode --concurrency $c --seconds "$SECS"; done
done
echo "## saga, open loop at 1,000/s: completion latency from when each was due"
$GEN txn --target $DTM --mode saga --concurrency 64 --rate 1000 --seconds $((SECS * 2))
