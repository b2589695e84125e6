#!/usr/bin/env bash
# Compatibility-API benchmarks (issue 3): Consul register, Consul health query (plain and on the
# blocking path), Nacos v1 register and beat, Nacos 2.x gRPC register, DNS A queries over UDP.
# Not part of CI.
# Usage: bench/compat.sh [seconds-per-scenario]   (JSON lines on stdout)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
PORT=18500
DNS_PORT=$((PORT + 100))
NACOS_PORT=$((PORT + 200))
NACOS_GRPC_PORT=$((PORT + 300))
WORK=$(mktemp -d)
BIN=target/release/zhili
GEN=target/release/zhili-bench
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
cargo build --release -q -p zhili -p zhili-bench
field() { sed -E "s/.*\"$1\":([0-9.]+).*/\1/"; }

echo "# machine: $(nproc) cores, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | xargs), $(free -g | awk '/Mem/ {print $2}') GiB; $(date -u +%Y-%m-%dT%H:%MZ)"
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
