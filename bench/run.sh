#!/usr/bin/env bash
# Zhili foundation benchmarks, with etcd as the peer in the same run. Not part of CI.
# Usage: bench/run.sh [seconds-per-scenario]   (results: JSON lines on stdout, summary at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
SECS=${1:-5}
PORT=18500
ETCD_PORT=12379

command -v etcd >/dev/null || { apt-get update -qq && apt-get install -y -qq etcd-server >/dev/null; }
cargo build --release -q -p zhili -p zhili-bench

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

echo "# machine: $(machine); $(etcd --version | head -1)"

start_zhili() { # data-dir -> sets ZPID, prints ready json
  local out; out=$($GEN ready --bin $BIN --data-dir "$1" --addr 127.0.0.1:$PORT --keep)
  ZPID=$(echo "$out" | field pid); pids+=("$ZPID"); echo "$out"
}

echo "## start-to-ready (empty store)"
start_zhili "$WORK/z1"
sleep 1
echo "{\"idle_rss_kb\":$(rss_kb "$ZPID")}"

echo "## load (64 keep-alive connections, ${SECS}s each)"
for sc in register heartbeat discover kv-put; do
  n=10; [ "$sc" = heartbeat ] && n=1000
  $GEN load --target 127.0.0.1:$PORT --scenario $sc --seconds "$SECS" --instances $n
done
echo "## wake-up: one change, 1000 blocking watchers"
$GEN wake --target 127.0.0.1:$PORT --watchers 1000 --rounds 5
kill -9 "$ZPID"; sleep 0.5

echo "## RSS with 100,000 ephemeral instances"
start_zhili "$WORK/z2" >/dev/null
$GEN fill-instances --target 127.0.0.1:$PORT --count 100000
echo "{\"rss_100k_instances_kb\":$(rss_kb "$ZPID")}"
kill -9 "$ZPID"; sleep 0.5

echo "## restart-to-ready with 100,000 persistent KV entries"
start_zhili "$WORK/z3" >/dev/null
$GEN fill-kv --target 127.0.0.1:$PORT --count 100000
kill -9 "$ZPID"; sleep 0.5
start_zhili "$WORK/z3"
kill -9 "$ZPID"; sleep 0.5

echo "## etcd (same generator, same machine)"
etcd --data-dir "$WORK/etcd" --name bench --listen-client-urls http://127.0.0.1:$ETCD_PORT \
  --advertise-client-urls http://127.0.0.1:$ETCD_PORT --listen-peer-urls http://127.0.0.1:12380 \
  --initial-advertise-peer-urls http://127.0.0.1:12380 --initial-cluster bench=http://127.0.0.1:12380 \
  --log-level error >"$WORK/etcd.log" 2>&1 &
EPID=$!; pids+=("$EPID")
for _ in $(seq 100); do curl -sf http://127.0.0.1:$ETCD_PORT/health >/dev/null && break; sleep 0.1; done
sleep 1
echo "{\"etcd_idle_rss_kb\":$(rss_kb "$EPID")}"
for sc in etcd-put-lease etcd-keepalive etcd-put; do
  $GEN load --target 127.0.0.1:$ETCD_PORT --scenario $sc --seconds "$SECS"
done
