#!/usr/bin/env python3
"""Memory of blocked watchers: N raw connections each holding a Consul blocking query on one
service, and the server's VmRSS before and while they are held. Not part of CI.

Usage: bench/held_watchers.py SERVER_PID API_PORT WATCHERS   (one JSON line on stdout)
Start the server first (e.g. `zhili-bench ready --bin target/release/zhili --data-dir D
--addr 127.0.0.1:PORT --keep`, with ZHILI_MAX_CONNECTIONS above WATCHERS); the open-file limit
must fit WATCHERS sockets in this process too.
"""
import json
import socket
import sys
import time
import urllib.request

pid, port, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])


def rss_kb():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise SystemExit("no VmRSS for pid %d" % pid)


body = json.dumps({"Name": "w", "ID": "w1", "Address": "10.0.0.1", "Port": 80}).encode()
urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/agent/service/register", data=body, method="PUT"), timeout=10).read()
index = urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health/service/w", timeout=10).headers["X-Consul-Index"]
time.sleep(0.5)
before = rss_kb()
held = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"GET /v1/health/service/w?index={index}&wait=60s HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: held-watchers\r\nAccept: */*\r\n\r\n".encode())
    held.append(s)
time.sleep(2)
# Every watcher must still be held (an answer or a refusal would mean it was not).
for s in held[:: max(1, n // 100)]:
    s.setblocking(False)
    try:
        got = s.recv(64)
        raise SystemExit(f"a watcher was answered instead of held: {got!r}")
    except BlockingIOError:
        pass
while_held = rss_kb()
print(json.dumps({"watchers": n, "rss_before_kb": before, "rss_held_kb": while_held, "per_watcher_bytes": round((while_held - before) * 1024 / n)}))
