#!/usr/bin/env bash
# Event log benchmark: Zhili's appends (single events and batches of 100) against NATS
# JetStream publishes with acks and PostgreSQL INSERTs (synchronous_commit=on), in the same
# run, through the same generator (zhili-bench).
# Then the streaming append, catch-up reads, consumer groups, webhooks and end-to-end latency.
# 256-byte events. Not part of CI. Usage: bench/events.sh [seconds-per-scenario]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
SECS=${1:-5}
PORT=18700
NATS_PORT=14222
PG_PORT=15432
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | tail -1)

command -v nats-server >/dev/null || { apt-get update -qq && apt-get install -y -qq nats-server >/dev/null; }
cargo build --release -q -p zhili -p zhili-bench
echo "# machine: $(machine); nats-server $(nats-server --version | awk '{print $NF}')"

out=$($GEN ready --bin $BIN --data-dir "$WORK/zhili" --addr 127.0.0.1:$PORT --keep)
pids+=("$(echo "$out" | field pid)")
# JetStream on file storage. nats-server 2.9 has no per-message fsync setting: it writes each
# message to its block file at once and fsyncs every 2 minutes (sync_interval arrived in 2.10).
nats-server -js -sd "$WORK/nats" -a 127.0.0.1 -p $NATS_PORT >"$WORK/nats.log" 2>&1 &
pids+=("$!")
# PostgreSQL: a private cluster (trust auth on 127.0.0.1), default durability (fsync on,
# synchronous_commit on).
chmod 755 "$WORK"; mkdir -p "$WORK/pg"; chown postgres "$WORK/pg"
runuser -u postgres -- "$PG_BIN/initdb" -A trust -D "$WORK/pg/data" >/dev/null
runuser -u postgres -- "$PG_BIN/postgres" -D "$WORK/pg/data" -p $PG_PORT -k "$WORK/pg" -c listen_addresses=127.0.0.1 -c max_connections=200 >"$WORK/pg.log" 2>&1 &
pids+=("$!")
sleep 2

echo "## Zhili: one event per HTTP append (fsync before the answer, group commit)"
for c in 1 16 64; do $GEN load --target 127.0.0.1:$PORT --scenario events-append --concurrency $c --seconds "$SECS"; done
echo "## Zhili: batches of 100 events per append (per_second counts appends; events = x100)"
for c in 1 16 64; do $GEN load --target 127.0.0.1:$PORT --scenario events-batch --concurrency $c --seconds "$SECS"; done
echo "## NATS JetStream: one publish at a time per connection, acked"
for c in 1 16 64; do $GEN nats-publish --target 127.0.0.1:$NATS_PORT --concurrency $c --inflight 1 --seconds "$SECS"; done
echo "## NATS JetStream: 100 publishes in flight per connection, acked"
for c in 1 16 64; do $GEN nats-publish --target 127.0.0.1:$NATS_PORT --concurrency $c --inflight 100 --seconds "$SECS"; done
echo "## PostgreSQL: one INSERT of one event per statement (committed, synchronous_commit=on)"
for c in 1 16 64; do $GEN pg-insert --target 127.0.0.1:$PG_PORT --concurrency $c --batch 1 --seconds "$SECS"; done
echo "## PostgreSQL: INSERTs of 100 events per statement (per_second counts statements; events = x100)"
for c in 1 16 64; do $GEN pg-insert --target 127.0.0.1:$PG_PORT --concurrency $c --batch 100 --seconds "$SECS"; done
echo "## Zhili: streaming append (NDJSON over one connection per producer, 1,000 in flight each)"
for c in 1 16 64; do $GEN events-publish --target 127.0.0.1:$PORT --concurrency $c --inflight 1000 --seconds "$SECS"; done
echo "## Zhili: catch-up reads of 200,000 events (pages of 4,096; then SSE from the start)"
$GEN events-read --target 127.0.0.1:$PORT --events 200000 --readers 2
echo "## Zhili: consumer group, 4 competing consumers pulling 1,000 and acking"
$GEN events-group --target 127.0.0.1:$PORT --events 200000 --consumers 4
echo "## Zhili: webhook delivery to a local receiver (window 1 = strictly in order; 64)"
$GEN events-webhook --target 127.0.0.1:$PORT --events 10000 --window 1
$GEN events-webhook --target 127.0.0.1:$PORT --events 50000 --window 64
echo "## Zhili: end-to-end latency, append -> SSE subscriber, 10,000 events/s open loop"
$GEN events-latency --target 127.0.0.1:$PORT --rate 10000 --conns 32 --seconds 10
