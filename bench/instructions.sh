#!/usr/bin/env bash
# User-space instructions per proxied GET: Zhili's gateway against nginx, each under valgrind's
# callgrind, behind the same upstream and route as bench/gateway.sh. Instruction counts do not
# depend on what else the machine is doing, so this measures a change to the gateway's request
# path that a noisy host hides in requests/s (kernel time is not counted: it is about the same
# for both proxies, the same segments and system calls). Counters are zeroed after a warm-up,
# then wrk runs; instructions ÷ requests. Not part of CI.
# Usage: bench/instructions.sh [seconds] [zhili binary]   (needs valgrind, Debian nginx-light, wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
SECS=${1:-8}
for tool in valgrind callgrind_control nginx wrk taskset; do
  command -v $tool >/dev/null || { echo "missing $tool (apt-get install valgrind nginx-light wrk)"; exit 1; }
done
if [ -n "${2:-}" ]; then GW=$2; else cargo build --release -q -p zhili; GW=$BIN; fi
UP1=19141 UP2=19142 NGINX=19241 ZHILI=19243 API=19540

upstream_conf
# One process (no master), so callgrind sees the worker.
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1; master_process off; daemon off; pid $WORK/ng.pid; error_log $WORK/ng.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream demo { server 127.0.0.1:$UP1; server 127.0.0.1:$UP2; keepalive 128; }
  server { listen 127.0.0.1:$NGINX; location /demo/ { proxy_pass http://demo/; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
taskset -c 1 nginx -c "$WORK/upstream.conf" -p "$WORK" & pids+=($!)
taskset -c 1 $BIN server --dev --data-dir "$WORK/z" --api-addr 127.0.0.1:$API --dns-addr off --nacos-addr off --nacos-grpc-addr off --dtm-addr off --gateway-addr off --log-level warn >/dev/null 2>&1 & pids+=($!)
demo_route

# Starts `name` under callgrind (the rest of the line is its command), warms it up, zeroes its
# counters, runs wrk and prints one JSON line.
measure() { # name port command...
  local name=$1 port=$2 out=$WORK/cg.$1 vg n ir
  shift 2
  taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$out" "$@" >/dev/null 2>&1 &
  vg=$!
  for _ in $(seq 300); do curl -sf "127.0.0.1:$port/demo/" -o /dev/null && break; sleep 0.2; done
  taskset -c 1 wrk -t1 -c16 -d5s "http://127.0.0.1:$port/demo/" >/dev/null
  callgrind_control -z $vg >/dev/null 2>&1
  n=$(taskset -c 1 wrk -t1 -c16 -d"${SECS}s" "http://127.0.0.1:$port/demo/" | awk '/requests in/ {print $1}')
  callgrind_control -d $vg >/dev/null 2>&1
  sleep 1
  kill $vg 2>/dev/null || true
  wait $vg 2>/dev/null || true
  # The dump after the zero is part 1; its summary counts every thread.
  ir=$(awk '/^summary:/ {print $2}' "$out.1")
  echo "{\"proxy\":\"$name\",\"requests\":$n,\"instructions\":$ir,\"per_request\":$((ir / n))}"
}
echo "# machine: $(machine); callgrind, wrk -t1 -c16 -d${SECS}s after a 5 s warm-up; one worker each"
measure nginx $NGINX nginx -c "$WORK/nginx.conf" -p "$WORK"
measure zhili $ZHILI "$GW" gateway --server "http://127.0.0.1:$API" --addr 127.0.0.1:$ZHILI --workers 1 --access-log false --log-level warn
