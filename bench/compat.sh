#!/usr/bin/env bash
# Compatibility-API benchmarks (issue 3): Consul register, Consul health query (plain and on the
# blocking path), Nacos v1 register and beat, Nacos 2.x gRPC register, DNS A queries over UDP.
# Not part of CI.
# Usage: bench/compat.sh [seconds-per-scenario]   (JSON lines on stdout)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
SECS=${1:-5}
PORT=18500
DNS_PORT=$((PORT + 100))
NACOS_PORT=$((PORT + 200))
NACOS_GRPC_PORT=$((PORT + 300))
cargo build --release -q -p zhili -p zhili-bench

echo "# machine: $(machine)"
out=$($GEN ready --bin $BIN --data-dir "$WORK/z" --addr 127.0.0.1:$PORT --keep)
pids+=("$(echo "$out" | field pid)")
for sc in consul-register consul-health consul-health-blocking; do
  $GEN load --target 127.0.0.1:$PORT --scenario $sc --seconds "$SECS" --instances 10
done
for sc in nacos-register nacos-beat; do
  $GEN load --target 127.0.0.1:$NACOS_PORT --scenario $sc --seconds "$SECS" --instances 1000
done
$GEN nacos-grpc --target 127.0.0.1:$NACOS_GRPC_PORT --seconds "$SECS"
$GEN dns --target 127.0.0.1:$DNS_PORT --name bench-consul.service.consul --seconds "$SECS"
