"""Real clients against Zhili's event log: the PyPI `cloudevents` SDK builds structured and binary
events that Zhili accepts and parses what Zhili delivers to a webhook; the `standardwebhooks`
library verifies every delivery's signature and rejects a tampered one; a consumer group with two
competing consumers processes every event with none lost, and unacknowledged ones come back.

usage: events_clients.py http://127.0.0.1:PORT EVENTS"""
import json
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cloudevents.v1.conversion import to_binary, to_structured
from cloudevents.v1.http import CloudEvent, from_http
from standardwebhooks import Webhook

API = sys.argv[1]
EVENTS = int(sys.argv[2])


def call(method, path, body=None, headers=None):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(API + path, data=data, method=method, headers=headers or {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


received = []


burst = {"in_flight": 0, "max_in_flight": 0, "failed": set(), "done": {}}
burst_lock = threading.Lock()


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        headers = {k.lower(): v for k, v in self.headers.items()}
        if self.path == "/burst":
            return self.burst(headers, body)
        received.append((headers, body))
        self.send_response(204)
        self.end_headers()

    def burst(self, headers, body):
        # A slow receiver that fails the first attempt of every tenth event.
        Webhook(secrets["hook-window"]).verify(body, headers)
        n = int(headers["ce-id"].split("-")[1])
        with burst_lock:
            burst["in_flight"] += 1
            burst["max_in_flight"] = max(burst["max_in_flight"], burst["in_flight"])
            fail = n % 10 == 0 and n not in burst["failed"]
            if fail:
                burst["failed"].add(n)
        time.sleep(0.02)
        with burst_lock:
            burst["in_flight"] -= 1
            if not fail:
                burst["done"][n] = burst["done"].get(n, 0) + 1
        self.send_response(500 if fail else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
threading.Thread(target=server.serve_forever, daemon=True).start()
hook = f"http://127.0.0.1:{server.server_port}/hook"

# A webhook subscription per mode on one stream; the secret is shown once.
secrets = {}
for name, mode in [("hook-binary", "binary"), ("hook-structured", "structured")]:
    st, v = call("PUT", f"/api/v1/subscriptions/{name}", {"stream": "order-py", "webhook": {"url": hook, "mode": mode}})
    assert st == 201, (st, v)
    assert v["secret"].startswith("whsec_"), v
    secrets[name] = v["secret"]
st, v = call("GET", "/api/v1/subscriptions/hook-binary")
assert "secret" not in json.dumps(v), "the secret is not shown again"

# Publish with the SDK: one structured, one binary event.
paid = CloudEvent({"type": "order.paid", "source": "/shop", "subject": "order-17", "traceext": "abc"}, {"amount": 42})
headers, body = to_structured(paid)
st, v = call("POST", "/api/v1/streams/order-py", body, dict(headers))
assert st == 201, (st, v)
placed = CloudEvent({"type": "order.placed", "source": "/shop", "subject": "order-18"}, {"items": 3})
headers, body = to_binary(placed)
st, v = call("POST", "/api/v1/streams/order-py", body, {**dict(headers), "content-type": "application/json"})
assert st == 201, (st, v)

deadline = time.time() + 20
while len(received) < 4 and time.time() < deadline:
    time.sleep(0.05)
assert len(received) == 4, f"expected 4 deliveries, got {len(received)}"
by_type = {}
for headers, body in received:
    secret = secrets["hook-structured" if headers.get("content-type", "").startswith("application/cloudevents+json") else "hook-binary"]
    Webhook(secret).verify(body, headers)  # raises unless the signature is valid
    tampered = body[:-1] + (b"x" if body[-1:] != b"x" else b"y")
    try:
        Webhook(secret).verify(tampered, headers)
        raise AssertionError("a tampered body passed verification")
    except AssertionError:
        raise
    except Exception:
        pass
    event = from_http(headers, body)
    by_type.setdefault(event["type"], []).append(event)
assert sorted(by_type) == ["order.paid", "order.placed"], by_type
for e in by_type["order.paid"]:
    assert (e["id"], e["subject"], e["traceext"], e.data["amount"]) == (paid["id"], "order-17", "abc", 42), e
for e in by_type["order.placed"]:
    assert (e["id"], e.data["items"]) == (placed["id"], 3), e
st, v = call("GET", "/api/v1/subscriptions/hook-binary")
assert v["checkpoint"] == 2 and all(a["status"] == 204 for a in v["deliveries"]), v

# A delivery window: up to 8 in flight at once to a slow receiver, every event delivered and
# signed, failures retried, and the checkpoint at the end.
st, v = call("PUT", "/api/v1/subscriptions/hook-window", {"stream": "burst-py", "webhook": {"url": hook.replace("/hook", "/burst"), "window": 8}})
assert st == 201, (st, v)
secrets["hook-window"] = v["secret"]
batch = [{"specversion": "1.0", "id": f"b-{i}", "source": "/burst", "type": "burst", "data": {"n": i}} for i in range(200)]
st, v = call("POST", "/api/v1/streams/burst-py", batch, {"content-type": "application/cloudevents-batch+json"})
assert st == 201, v
deadline = time.time() + 60
while len(burst["done"]) < 200 and time.time() < deadline:
    time.sleep(0.05)
assert sorted(burst["done"]) == list(range(200)), f"{len(burst['done'])} of 200 delivered"
assert len(burst["failed"]) == 20, burst["failed"]
assert 1 < burst["max_in_flight"] <= 8, burst["max_in_flight"]
deadline = time.time() + 10
while time.time() < deadline:
    st, v = call("GET", "/api/v1/subscriptions/hook-window")
    if v["checkpoint"] == 200:
        break
    time.sleep(0.05)
assert v["checkpoint"] == 200 and v["in_flight"] == 0, v

# Consumer group: EVENTS events, two competing consumers; each drops (does not ack) its first
# few deliveries, which must come back after the ack timeout.
st, v = call("PUT", "/api/v1/subscriptions/workers", {"stream": "jobs-1", "ack_timeout": "1s"})
assert st == 201, v
for start in range(0, EVENTS, 500):
    batch = [{"specversion": "1.0", "id": f"job-{i}", "source": "/jobs", "type": "job.created", "data": {"n": i}} for i in range(start, min(start + 500, EVENTS))]
    st, v = call("POST", "/api/v1/streams/jobs-1", batch, {"content-type": "application/cloudevents-batch+json"})
    assert st == 201, v
done = {}
lock = threading.Lock()
redelivered = []


def consumer(who):
    dropped = 0
    idle_since = time.time()
    while time.time() - idle_since < 5:
        st, v = call("GET", "/api/v1/subscriptions/workers/next?max=200&wait=1s")
        assert st == 200, v
        if not v["events"]:
            with lock:
                if len(done) == EVENTS:
                    return
            continue
        idle_since = time.time()
        acks = []
        for e in v["events"]:
            if e["deliveries"] > 1:
                redelivered.append(e["event"]["id"])
            if dropped < 5 and e["deliveries"] == 1:
                dropped += 1
                continue
            acks.append(e["ack_id"])
            with lock:
                done[e["event"]["data"]["n"]] = who
        st, r = call("POST", "/api/v1/subscriptions/workers/ack", {"ack_ids": acks})
        assert st == 200, r


threads = [threading.Thread(target=consumer, args=(w,)) for w in ("a", "b")]
for t in threads:
    t.start()
for t in threads:
    t.join(timeout=120)
missing = sorted(set(range(EVENTS)) - set(done))
assert not missing, f"{len(missing)} events never processed: {missing[:10]}"
assert len(redelivered) >= 10, f"the 10 dropped deliveries should come back, saw {len(redelivered)}"
shares = {w: list(done.values()).count(w) for w in ("a", "b")}
assert all(shares.values()), f"both consumers took work: {shares}"
st, v = call("GET", "/api/v1/subscriptions/workers")
assert v["checkpoint"] == EVENTS and v["in_flight"] == 0, v
print(f"ok: 4 signed webhook deliveries verified; 200 through a window of 8 (at most {burst['max_in_flight']} at once); {EVENTS} events by two consumers {shares}, {len(redelivered)} redelivered")
