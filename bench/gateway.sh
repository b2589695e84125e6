#!/usr/bin/env bash
# Gateway benchmark: Zhili's gateway against nginx and HAProxy as reverse proxies, side by side in
# one run. Each proxy gets one worker and CPU 0; the upstream (nginx answering a fixed 1 KiB body
# on two ports) and the load generator (wrk) share CPU 1. Then each proxy again with two workers
# (nginx worker_processes 2, HAProxy nbthread 2, zhili gateway --workers 2), everything sharing
# both CPUs. Not part of CI.
# Usage: bench/gateway.sh [seconds] [connections]   (needs Debian nginx-light, haproxy, wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
SECS=${1:-10}
CONNS=${2:-64}
for tool in nginx haproxy wrk taskset; do
  command -v $tool >/dev/null || { echo "missing $tool (apt-get install nginx-light haproxy wrk)"; exit 1; }
done
cargo build --release -q -p zhili -p zhili-bench
UP1=19101 UP2=19102 NGINX=19201 HAPROXY=19202 ZHILI=19203 API=19500

upstream_conf
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/ng.pid; error_log $WORK/ng.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream demo { server 127.0.0.1:$UP1; server 127.0.0.1:$UP2; keepalive 128; }
  server { listen 127.0.0.1:$NGINX; location /demo/ { proxy_pass http://demo/; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:$HAPROXY
  use_backend demo if { path_beg /demo/ }
backend demo
  balance roundrobin
  http-request replace-path /demo/(.*) /\1
  server s1 127.0.0.1:$UP1
  server s2 127.0.0.1:$UP2
CONF

taskset -c 1 nginx -c "$WORK/upstream.conf" -p "$WORK" & pids+=($!)
taskset -c 0 nginx -c "$WORK/nginx.conf" -p "$WORK" & pids+=($!)
taskset -c 0 haproxy -f "$WORK/haproxy.cfg" -db -q & pids+=($!)
taskset -c 1 $BIN server --dev --data-dir "$WORK/z" --api-addr 127.0.0.1:$API --dns-addr off --nacos-addr off --gateway-addr off --log-level warn >/dev/null & pids+=($!)
demo_route
# The same route behind a JWT (HS256) and a rate limit per consumer (high enough never to refuse).
SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
curl -sf -XPUT "127.0.0.1:$API/api/v1/routes/auth" -H 'content-type: application/json' -d "{\"path_prefix\": \"/auth/\", \"service\": \"demo\", \"strip_prefix\": true,
  \"auth\": {\"jwt\": {\"keys\": [{\"alg\": \"HS256\", \"secret\": \"$SECRET\"}], \"issuer\": \"bench\", \"claims_to_headers\": {\"sub\": \"x-user\"}}},
  \"rate_limit\": {\"rate\": 1000000000, \"key\": {\"consumer\": true}}}" >/dev/null
TOKEN=$(SECRET=$SECRET python3 -c '
import base64, hashlib, hmac, json, os, time
b = lambda d: base64.urlsafe_b64encode(d).rstrip(b"=").decode()
head = b(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b(json.dumps({"sub": "bench", "iss": "bench", "exp": int(time.time()) + 3600}).encode())
sig = b(hmac.new(os.environ["SECRET"].encode(), f"{head}.{body}".encode(), hashlib.sha256).digest())
print(f"{head}.{body}.{sig}")')
taskset -c 0 $BIN gateway --server "http://127.0.0.1:$API" --addr 127.0.0.1:$ZHILI --workers 1 --access-log false --log-level warn --metrics-addr 127.0.0.1:$((ZHILI+1)) >/dev/null & pids+=($!)
gw_pid=$!
for port in $NGINX $HAPROXY $ZHILI; do
  for _ in $(seq 100); do curl -sf "127.0.0.1:$port/demo/" -o /dev/null && break; sleep 0.1; done
done

echo "# machine: $(machine); wrk -t1 -c$CONNS -d${SECS}s, proxies on CPU 0, upstream+wrk on CPU 1"
echo "# zhili gateway idle RSS: $(awk '/VmRSS/ {print $2, $3}' /proc/$gw_pid/status)"
closed() { # name port path [header]
  local out
  if [ -n "${4:-}" ]; then
    out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${SECS}s" --latency -H "$4" "http://127.0.0.1:$2$3")
  else
    out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${SECS}s" --latency "http://127.0.0.1:$2$3")
  fi
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  errs=$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}' | tr '\n' ' ')
  echo "{\"round\":$round,\"proxy\":\"$1\",\"rps\":$rps,\"p50\":\"$p50\",\"p99\":\"$p99\",\"errors\":\"$errs\"}" | tee -a "$WORK/closed.jsonl"
}
for round in 1 2 3; do
  closed nginx $NGINX /demo/
  closed haproxy $HAPROXY /demo/
  closed zhili $ZHILI /demo/
  closed zhili-jwt-ratelimit $ZHILI /auth/ "Authorization: Bearer $TOKEN"
done
median() { grep "\"proxy\":\"$1\"" "$WORK/closed.jsonl" | field rps | sort -n | sed -n 2p; }
slowest=$(for p in nginx haproxy zhili; do median $p; done | sort -n | head -1)
echo "# medians: nginx $(median nginx), haproxy $(median haproxy), zhili $(median zhili), zhili-jwt-ratelimit $(median zhili-jwt-ratelimit); slowest $slowest"
# Open loop at 25/50/75% of the slowest proxy's capacity (coordinated-omission corrected).
for pct in 25 50 75; do
  rate=$(awk -v s="$slowest" -v p="$pct" 'BEGIN {printf "%d", s * p / 100}')
  for name in nginx haproxy zhili; do
    case $name in nginx) port=$NGINX;; haproxy) port=$HAPROXY;; zhili) port=$ZHILI;; esac
    echo "{\"load_pct\":$pct,\"proxy\":\"$name\",\"result\":$(taskset -c 1 $GEN open-loop --target 127.0.0.1:$port --path /demo/ --rate "$rate" --conns "$CONNS" --seconds "$SECS")}"
  done
done
metrics=$(curl -sf "127.0.0.1:$((ZHILI+1))/metrics")
reqs=$(echo "$metrics" | awk '/^zhili_gateway_requests_total / {print $2}')
conns=$(echo "$metrics" | awk '/^zhili_gateway_upstream_connections_total / {print $2}')
echo "# zhili upstream connections opened: $conns for $reqs requests (reuse $(awk -v c="$conns" -v r="$reqs" 'BEGIN {printf "%.4f%%", 100 * (1 - c / r)}'))"
echo "# zhili gateway RSS after load: $(awk '/VmRSS/ {print $2, $3}' /proc/$gw_pid/status)"

# Two workers each, on both CPUs (upstream and wrk too: the machine has two cores).
for p in "${pids[@]:1}"; do kill "$p" 2>/dev/null || true; done
for port in $NGINX $HAPROXY $ZHILI $API; do
  for _ in $(seq 100); do ss -ltn | grep -q "127.0.0.1:$port " || break; sleep 0.1; done
done
sed -i 's/^worker_processes 1;/worker_processes 2;/' "$WORK/nginx.conf"
sed -i 's/nbthread 1/nbthread 2/' "$WORK/haproxy.cfg"
nginx -c "$WORK/nginx.conf" -p "$WORK" & pids+=($!)
haproxy -f "$WORK/haproxy.cfg" -db -q & pids+=($!)
$BIN server --dev --data-dir "$WORK/z2" --api-addr 127.0.0.1:$API --dns-addr off --nacos-addr off --nacos-grpc-addr off --dtm-addr off --gateway-addr off --log-level warn >/dev/null & pids+=($!)
demo_route
$BIN gateway --server "http://127.0.0.1:$API" --addr 127.0.0.1:$ZHILI --workers 2 --access-log false --log-level warn >/dev/null & pids+=($!)
for port in $NGINX $HAPROXY $ZHILI; do
  for _ in $(seq 100); do curl -sf "127.0.0.1:$port/demo/" -o /dev/null && break; sleep 0.1; done
done
closed2() { # name port
  local out rps errs
  out=$(wrk -t2 -c"$CONNS" -d"${SECS}s" --latency "http://127.0.0.1:$2/demo/")
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  errs=$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}' | tr '\n' ' ')
  echo "{\"round\":$round,\"proxy\":\"$1-2w\",\"rps\":$rps,\"errors\":\"$errs\"}" | tee -a "$WORK/closed.jsonl"
}
for round in 1 2 3; do
  closed2 nginx $NGINX
  closed2 haproxy $HAPROXY
  closed2 zhili $ZHILI
done
echo "# two workers, medians: nginx $(median nginx-2w), haproxy $(median haproxy-2w), zhili $(median zhili-2w)"
