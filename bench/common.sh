# Sourced by the bench scripts (from the repository root): a work dir, the release binaries,
# cleanup of everything started (listed in `pids`), and small helpers.
WORK=$(mktemp -d)
BIN=target/release/zhili
GEN=target/release/zhili-bench
pids=()
# TERM first (an nginx master killed with -9 leaves its workers behind), then KILL.
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
# The number after "name": in a JSON line.
field() { sed -E "s/.*\"$1\":([0-9.]+).*/\1/"; }
machine() { echo "$(nproc) cores, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | xargs), $(free -g | awk '/Mem/ {print $2}') GiB; $(date -u +%Y-%m-%dT%H:%MZ)"; }
# Waits until the given processes are idle (no CPU tick, 10 ms, between them over 300 ms; at most
# 15 s), so one server's background work after a run (flushes, compaction, raft) does not land
# in the next server's measurement on the shared CPU.
settle() { # pid...
  local before after
  ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' /proc/$p/stat 2>/dev/null || echo 0))); done; echo $t; }
  for _ in $(seq 50); do
    before=$(ticks "$@"); sleep 0.3; after=$(ticks "$@")
    [ $((after - before)) -le 0 ] && return 0
  done
}
# The gateway benches' upstream: one nginx worker answering a fixed 1 KiB body on ports $UP1 and
# $UP2, its config written to $WORK/upstream.conf.
upstream_conf() {
  local body
  body=$(head -c 1024 /dev/zero | tr '\0' 'x')
  cat > "$WORK/upstream.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/up.pid; error_log $WORK/up.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP1; listen 127.0.0.1:$UP2; location / { default_type text/plain; return 200 "$body"; } } }
CONF
}
# Once the Zhili server on $API is ready: service `demo` on the two upstream ports, and route
# `/demo/` to it with the prefix stripped (as the nginx and HAProxy configs do).
demo_route() {
  local p
  for _ in $(seq 100); do curl -sf "127.0.0.1:$API/health/ready" >/dev/null && break; sleep 0.1; done
  for p in $UP1 $UP2; do
    curl -sf -XPOST "127.0.0.1:$API/api/v1/services/demo/instances" -H 'content-type: application/json' -d "{\"address\":\"127.0.0.1\",\"port\":$p,\"ephemeral\":false}" >/dev/null
  done
  curl -sf -XPUT "127.0.0.1:$API/api/v1/routes/demo" -H 'content-type: application/json' -d '{"path_prefix": "/demo/", "service": "demo", "strip_prefix": true}' >/dev/null
}
