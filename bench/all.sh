#!/usr/bin/env bash
# Runs the three side-by-side suites in one go — the gateway against nginx and HAProxy
# (bench/gateway.sh), the Nacos API against r-nacos plus Consul and DNS (bench/compat.sh), the
# foundation against etcd (bench/run.sh) — keeps their raw output in target/bench/, and rewrites
# the generated section of docs/BENCHMARKS.md (between its `bench/all.sh` markers) with the
# tables, the date, the machine and the peers' versions. Not part of CI.
# Usage: bench/all.sh [seconds-per-run]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
OUT=target/bench
mkdir -p $OUT
bench/gateway.sh "$SECS" 64 > $OUT/gateway.jsonl
bench/compat.sh "$SECS" > $OUT/compat.jsonl
bench/run.sh "$SECS" > $OUT/foundation.jsonl
{
  echo "nginx: $(nginx -v 2>&1 | sed 's/.*version: //')"
  echo "HAProxy: $(haproxy -v | head -1 | awk '{print $3}')"
  echo "r-nacos: $(target/peers/rnacos/bin/rnacos --version | awk '{print $2}')"
  echo "etcd: $(etcd --version | head -1 | awk '{print $3}')"
  echo "wrk: $(wrk -v 2>&1 | head -1 | awk '{print $2}')"
} > $OUT/versions.txt
python3 bench/tables.py $OUT docs/BENCHMARKS.md "bench/all.sh $SECS"
echo "docs/BENCHMARKS.md updated from $OUT"
