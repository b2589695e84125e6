#!/usr/bin/env bash
# Two builds of Zhili against each other: each started fresh (empty data dir) and pinned to CPU 0,
# the generator on CPU 1, the same scenarios back to back, alternating builds for ROUNDS rounds
# (so a noisy minute lands on both). Prints one line per build and round with requests/s and
# errors per scenario, and the server threads' CPU ticks (10 ms) per thread name for the run.
# Build the old one beside the tree, e.g.
#   git worktree add /tmp/old <commit> && (cd /tmp/old && CARGO_TARGET_DIR=/tmp/old-target cargo build --release -p zhili)
# Usage: bench/ab.sh OLD_BIN NEW_BIN [rounds] [seconds-per-scenario]   Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
OLD=$1 NEW=$2 ROUNDS=${3:-3} SECS=${4:-4}
PORT=18500
cargo build --release -q -p zhili-bench
echo "# machine: $(machine); old $OLD, new $NEW"
# scenario, port offset (API 0, Nacos HTTP +200), instances
SCENARIOS=("nacos-register 200 10" "nacos-list 200 10" "consul-health 0 10" "nacos-beat 200 1000")
threads() { for t in /proc/$1/task/*; do echo "$(cat "$t/comm") $(awk '{print $14 + $15}' "$t/stat")"; done | awk '{a[$1] += $2} END {for (k in a) printf "%s=%d ", k, a[k]}'; }
one() { # label binary
  local dir="$WORK/$1-$round" out pid line
  out=$(taskset -c 0 $GEN ready --bin "$2" --data-dir "$dir" --addr 127.0.0.1:$PORT --keep)
  pid=$(echo "$out" | field pid)
  pids+=("$pid")
  line="$1 round $round:"
  for s in "${SCENARIOS[@]}"; do
    set -- $s
    out=$(taskset -c 1 $GEN load --target 127.0.0.1:$((PORT + $2)) --scenario "$1" --seconds "$SECS" --instances "$3")
    line="$line $1=$(echo "$out" | field per_second)/$(echo "$out" | field errors)"
  done
  out=$(taskset -c 1 $GEN nacos-grpc --target 127.0.0.1:$((PORT + 300)) --seconds "$SECS")
  line="$line nacos-grpc-register=$(echo "$out" | field per_second)/$(echo "$out" | field errors)"
  echo "$line | cpu ticks: $(threads "$pid")"
  kill "$pid"
  sleep 1
}
for round in $(seq "$ROUNDS"); do
  one old "$OLD"
  one new "$NEW"
done
