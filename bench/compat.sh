#!/usr/bin/env bash
# Compatibility-API benchmarks: Zhili's Nacos API side by side with r-nacos (the fastest Nacos
# server, the crate `rnacos` 0.8.x, installed here with `cargo install --locked` into
# target/peers) through the same generator in the same run: Nacos v1 instance register (with and
# without metadata), beat, the instance list of a 10-instance service, config publish and get,
# Nacos 2.x gRPC register, service query and health check (a request the server answers without
# doing anything: what the gRPC stack alone costs), each with the server's CPU per request, and
# the push fan-out to 200 gRPC subscribers (server CPU per change).
# Then Zhili alone: Consul register, Consul health query (plain and on
# the blocking path), DNS A queries over UDP. Each server runs pinned to CPU 0; the generator
# runs on CPU 1. Not part of CI.
# Usage: bench/compat.sh [seconds-per-scenario]   (JSON lines on stdout)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
SECS=${1:-5}
PORT=18500
DNS_PORT=$((PORT + 100))
NACOS_PORT=$((PORT + 200))
NACOS_GRPC_PORT=$((PORT + 300))
RN_PORT=18848
RN_GRPC_PORT=19848
RNACOS_VERSION=0.8.8
RNACOS=target/peers/rnacos/bin/rnacos
cargo build --release -q -p zhili -p zhili-bench
if ! [ -x $RNACOS ] || ! $RNACOS --version | grep -q "$RNACOS_VERSION"; then
  cargo install -q --locked rnacos --version "$RNACOS_VERSION" --root target/peers/rnacos
fi

echo "# machine: $(machine); peer: $($RNACOS --version)"
# Zhili: its default runtime (one worker thread per core), pinned to CPU 0 like the peer.
out=$(taskset -c 0 $GEN ready --bin $BIN --data-dir "$WORK/z" --addr 127.0.0.1:$PORT --keep)
ZPID=$(echo "$out" | field pid)
pids+=("$ZPID")
# r-nacos: a single node with its raft initialized (config writes need a leader), on CPU 0.
RNACOS_HTTP_PORT=$RN_PORT RNACOS_GRPC_PORT=$RN_GRPC_PORT RNACOS_HTTP_CONSOLE_PORT=$((RN_PORT + 1)) \
  RNACOS_DATA_DIR="$WORK/rnacos" RNACOS_RAFT_NODE_ADDR=127.0.0.1:$RN_GRPC_PORT RNACOS_RAFT_AUTO_INIT=true RUST_LOG=warn \
  taskset -c 0 $RNACOS >"$WORK/rnacos.log" 2>&1 &
RPID=$!
pids+=("$RPID")
for _ in $(seq 100); do
  curl -sf -XPOST "127.0.0.1:$RN_PORT/nacos/v1/cs/configs?dataId=ready&group=BENCH&content=x" 2>/dev/null | grep -q true && break
  sleep 0.1
done

# The same scenario against both servers, back to back.
pair() { # scenario instances
  for side in zhili r-nacos; do
    local target=127.0.0.1:$NACOS_PORT
    [ $side = r-nacos ] && target=127.0.0.1:$RN_PORT
    settle "$ZPID" "$RPID"
    echo "{\"server\":\"$side\",\"result\":$(taskset -c 1 $GEN load --target $target --scenario "$1" --seconds "$SECS" --instances "$2")}"
  done
}
pair nacos-register 10
pair nacos-register-meta 10
pair nacos-beat 1000
pair nacos-list 10
pair nacos-config-get 10
pair nacos-config-publish 10
# A publish acknowledged is not necessarily readable yet (r-nacos applies through its raft log):
# right after the publish run, how long until one more published value reads back.
for side in zhili r-nacos; do
  port=$NACOS_PORT
  [ $side = r-nacos ] && port=$RN_PORT
  start=$(date +%s%N)
  curl -sf -XPOST "127.0.0.1:$port/nacos/v1/cs/configs?dataId=visible&group=BENCH&content=marker-$start" >/dev/null
  visible=null
  for _ in $(seq 1200); do
    if [ "$(curl -s "127.0.0.1:$port/nacos/v1/cs/configs?dataId=visible&group=BENCH")" = "marker-$start" ]; then
      visible=$(( ($(date +%s%N) - start) / 1000000 )); break
    fi
    sleep 0.1
  done
  echo "{\"server\":\"$side\",\"config_readable_after_publish_run_ms\":$visible}"
done
for mode in "" --metadata --query --check; do
  for side in zhili r-nacos; do
    target=127.0.0.1:$NACOS_GRPC_PORT pid=$ZPID
    [ $side = r-nacos ] && target=127.0.0.1:$RN_GRPC_PORT pid=$RPID
    settle "$ZPID" "$RPID"
    echo "{\"server\":\"$side\",\"result\":$(taskset -c 1 $GEN nacos-grpc --target $target --seconds "$SECS" --pid $pid $mode)}"
  done
done
# Push fan-out: 200 subscribers of a 100-instance service, one change at a time; the server's
# CPU per change (until every push is out and acknowledged) and the delay to each subscriber.
for side in zhili r-nacos; do
  target=127.0.0.1:$NACOS_GRPC_PORT pid=$ZPID
  [ $side = r-nacos ] && target=127.0.0.1:$RN_GRPC_PORT pid=$RPID
  settle "$ZPID" "$RPID"
  echo "{\"server\":\"$side\",\"push\":$(taskset -c 1 $GEN nacos-push --target $target --subscribers 200 --instances 100 --rounds 5 --pid $pid)}"
done

for sc in consul-register consul-health consul-health-blocking; do
  taskset -c 1 $GEN load --target 127.0.0.1:$PORT --scenario $sc --seconds "$SECS" --instances 10
done
taskset -c 1 $GEN dns --target 127.0.0.1:$DNS_PORT --name bench-consul.service.consul --seconds "$SECS"
