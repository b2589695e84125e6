"""DTM's own Python SDK (PyPI dtmcli 1.7.x) against Zhili's coordinator: saga (committed, and
compensated in reverse after a 409), TCC (confirmed, and cancelled after a failed try) and a
2-phase message, with branch handlers in a small HTTP server here. Final states are checked
through DTM's `query`, and the order of the branch calls as the handlers saw them.

Usage: dtm_scenario.py <dtm base URL, e.g. http://127.0.0.1:36789/api/dtmsvr>
"""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import requests
from dtmcli import msg, saga, tcc, utils

DTM = sys.argv[1]
calls = []
lock = threading.Lock()


class Branches(BaseHTTPRequestHandler):
    def handle_one(self):
        u = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        with lock:
            calls.append((q.get("gid"), u.path, q.get("op"), q.get("branch_id"), body))
        status = 409 if u.path.endswith("Fail") else 200
        out = json.dumps({"dtm_result": "FAILURE" if status == 409 else "SUCCESS"}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = handle_one
    do_POST = handle_one

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Branches)
threading.Thread(target=server.serve_forever, daemon=True).start()
BUSI = f"http://127.0.0.1:{server.server_port}/api/busi"


def of(gid):
    with lock:
        return [f"{c[1].rsplit('/', 1)[1]} {c[2]}" for c in calls if c[0] == gid]


def final(gid):
    deadline = time.time() + 20
    while time.time() < deadline:
        r = requests.get(f"{DTM}/query", params={"gid": gid}, timeout=5)
        assert r.status_code == 200, r.text
        t = r.json()["transaction"]
        if t and t["status"] in ("succeed", "failed"):
            return t["status"]
        time.sleep(0.05)
    raise AssertionError(f"{gid} did not finish: {r.text}")


body = {"amount": 30}

# Saga, committed.
gid = utils.gen_gid(DTM)
s = saga.Saga(DTM, gid)
s.add(body, BUSI + "/TransOut", BUSI + "/TransOutRevert")
s.add(body, BUSI + "/TransIn", BUSI + "/TransInRevert")
s.submit()
assert final(gid) == "succeed", gid
assert of(gid) == ["TransOut action", "TransIn action"], of(gid)
first = [c for c in calls if c[0] == gid][0]
assert first[3] == "01" and json.loads(first[4]) == body, first

# Saga, the second step refuses (409): both compensated, in reverse.
gid = utils.gen_gid(DTM)
s = saga.Saga(DTM, gid)
s.add(body, BUSI + "/TransOut", BUSI + "/TransOutRevert")
s.add(body, BUSI + "/TransInFail", BUSI + "/TransInRevert")
s.submit()
assert final(gid) == "failed", gid
assert of(gid) == ["TransOut action", "TransInFail action", "TransInRevert compensate", "TransOutRevert compensate"], of(gid)


# TCC: the SDK registers each branch and calls its try; submit confirms, last first.
def two_tries(t):
    t.call_branch(body, BUSI + "/TransOutTry", BUSI + "/TransOutConfirm", BUSI + "/TransOutCancel")
    t.call_branch(body, BUSI + "/TransInTry", BUSI + "/TransInConfirm", BUSI + "/TransInCancel")


gid = utils.gen_gid(DTM)
assert tcc.tcc_global_transaction(DTM, gid, two_tries) == gid
assert final(gid) == "succeed"
assert of(gid) == ["TransOutTry try", "TransInTry try", "TransInConfirm confirm", "TransOutConfirm confirm"], of(gid)


# TCC with a failing try: the SDK aborts, every registered branch is cancelled.
def failing_try(t):
    t.call_branch(body, BUSI + "/TransOutTry", BUSI + "/TransOutConfirm", BUSI + "/TransOutCancel")
    t.call_branch(body, BUSI + "/TransInTryFail", BUSI + "/TransInConfirm", BUSI + "/TransInCancel")


gid = utils.gen_gid(DTM)
assert tcc.tcc_global_transaction(DTM, gid, failing_try) == ""
assert final(gid) == "failed"
assert of(gid) == ["TransOutTry try", "TransInTryFail try", "TransInCancel cancel", "TransOutCancel cancel"], of(gid)

# 2-phase message: prepared, then submitted; its step is delivered.
gid = utils.gen_gid(DTM)
m = msg.Msg(DTM, gid)
m.add(body, BUSI + "/TransIn")
m.prepare(BUSI + "/QueryPrepared")
m.submit()
assert final(gid) == "succeed"
assert of(gid) == ["TransIn action"], of(gid)

# A duplicate saga gid with a different body is still the first one: nothing runs twice.
r = requests.get(f"{DTM}/all", params={"limit": 100}, timeout=5)
assert r.status_code == 200 and len(r.json()["transactions"]) == 5, r.text
print("dtm scenario passed")
