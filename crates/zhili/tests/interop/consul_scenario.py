"""py-consul against a real zhili server: register -> discover -> blocking-query wake-up ->
health change -> deregister, KV and session round trips, ACL enforcement. Exits non-zero
(with a traceback) on the first assertion that fails.

Usage: consul_scenario.py HOST PORT TOKEN
"""
import sys
import threading
import time

import consul
import requests

host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
anon = consul.Consul(host=host, port=port)
c = consul.Consul(host=host, port=port, token=token)

# ACLs: without a token nothing is readable or writable.
# (py-consul sends no token on agent.self(), so that call is anonymous here, as against Consul.)
for call in (lambda: anon.kv.put("x", "y"), lambda: anon.agent.service.register("nope", port=1), lambda: c.agent.self()):
    try:
        call()
        raise AssertionError("anonymous write was accepted")
    except consul.ACLPermissionDenied:
        pass

assert c.catalog.datacenters() == ["dc1"]

# Register with a TTL check: critical until the first pass, as in Consul.
c.agent.service.register("web", service_id="web1", address="127.0.0.1", port=8080, tags=["v1"], meta={"env": "prod"},
                         check=consul.Check.ttl("30s"))
c.agent.service.register("web", service_id="web2", address="127.0.0.2", port=8080, tags=["v2"],
                         check=consul.Check.ttl("30s"))
index, nodes = c.health.service("web", passing=True)
assert nodes == [], nodes
c.agent.check.ttl_pass("service:web1", "ok")
c.agent.check.ttl_pass("service:web2", "ok")
index, nodes = c.health.service("web", passing=True)
assert sorted(n["Service"]["ID"] for n in nodes) == ["web1", "web2"], nodes
assert {n["Service"]["Address"] for n in nodes} == {"127.0.0.1", "127.0.0.2"}
_, tagged = c.health.service("web", tag="v1", passing=True)
assert [n["Service"]["ID"] for n in tagged] == ["web1"]
_, services = c.catalog.services()
assert services["web"] == sorted(services["web"]) and set(services["web"]) == {"v1", "v2"}, services
_, catalog = c.catalog.service("web")
assert {e["ServiceID"] for e in catalog} == {"web1", "web2"}
assert "web1" in c.agent.services()
assert c.agent.checks()["service:web1"]["Status"] == "passing"

# Blocking query: a health change wakes the watcher well before its wait runs out.
def fail_later():
    time.sleep(0.3)
    c.agent.check.ttl_fail("service:web2", "down")

threading.Thread(target=fail_later).start()
started = time.time()
new_index, nodes = c.health.service("web", passing=True, index=index, wait="10s")
woke = time.time() - started
assert woke < 5, f"blocking query took {woke:.2f}s"
assert int(new_index) > int(index)
assert [n["Service"]["ID"] for n in nodes] == ["web1"], nodes

# A blocking query with nothing changing answers at its wait (within wait * 1.0625).
started = time.time()
same_index, _ = c.health.service("web", passing=True, index=new_index, wait="1s")
took = time.time() - started
assert 0.9 < took < 1.0625 + 0.5, f"idle blocking query took {took:.2f}s"
assert same_index == new_index

# Maintenance drains without deregistering.
c.agent.service.maintenance("web1", "true", "deploy")
_, nodes = c.health.service("web", passing=True)
assert nodes == [], nodes
_, all_nodes = c.health.service("web")
assert len(all_nodes) == 2
c.agent.service.maintenance("web1", "false")

# Catalog registration on another node, with an externally-set check status.
assert c.catalog.register("ext-node", "10.9.9.9", service={"Service": "db", "ID": "db1", "Port": 5432},
                          check={"CheckID": "db-up", "Name": "db", "Status": "passing", "ServiceID": "db1"})
_, db = c.health.service("db", passing=True)
assert [(n["Node"]["Node"], n["Service"]["Port"]) for n in db] == [("ext-node", 5432)], db
_, nodes = c.catalog.nodes()
assert {n["Node"] for n in nodes} >= {"ext-node"}
assert c.catalog.deregister("ext-node", service_id="db1")

# Deregister: gone from every view.
c.agent.service.deregister("web1")
c.agent.service.deregister("web2")
_, nodes = c.health.service("web")
assert nodes == [], nodes

# KV: put with flags, get, recurse, keys with a separator, CAS, blocking read, delete.
assert c.kv.put("app/config/db", "postgres://db", flags=42)
index, entry = c.kv.get("app/config/db")
assert entry["Value"] == b"postgres://db" and entry["Flags"] == 42, entry
assert not c.kv.put("app/config/db", "other", cas=entry["ModifyIndex"] - 1)
assert c.kv.put("app/config/db", "postgres://db2", cas=entry["ModifyIndex"])
assert c.kv.put("app/config/cache", "redis")
_, keys = c.kv.get("app/", keys=True, separator="/")
assert keys == ["app/config/"], keys
_, tree = c.kv.get("app/", recurse=True)
assert [e["Key"] for e in tree] == ["app/config/cache", "app/config/db"], tree
index, _ = c.kv.get("app/config/db")

def write_later():
    time.sleep(0.3)
    c.kv.put("app/config/db", "postgres://db3")

threading.Thread(target=write_later).start()
started = time.time()
_, entry = c.kv.get("app/config/db", index=index, wait="10s")
assert time.time() - started < 5
assert entry["Value"] == b"postgres://db3", entry

# Sessions and locks.
session = c.session.create(name="leader", ttl=15, lock_delay=0)
assert c.kv.put("app/leader", "me", acquire=session)
other = c.session.create(name="other", lock_delay=0)
assert not c.kv.put("app/leader", "you", acquire=other)
_, entry = c.kv.get("app/leader")
assert entry["Session"] == session
assert c.session.renew(session)["ID"] == session
c.session.destroy(session)
_, entry = c.kv.get("app/leader")
assert "Session" not in entry, entry
assert c.kv.put("app/leader", "you", acquire=other)

# Transactions apply whole or not at all. (py-consul's txn.put sends no token, so the request
# goes through requests, py-consul's own HTTP library, with the token header.)
def txn(ops):
    return requests.put(f"http://{host}:{port}/v1/txn", json=ops, headers={"X-Consul-Token": token}, timeout=10)

r = txn([{"KV": {"Verb": "set", "Key": "app/t1", "Value": "MQ=="}}, {"KV": {"Verb": "get", "Key": "app/config/db"}}])
assert r.status_code == 200 and r.json()["Errors"] is None and len(r.json()["Results"]) == 2, r.text
r = txn([{"KV": {"Verb": "set", "Key": "app/t2", "Value": "Mg=="}}, {"KV": {"Verb": "check-not-exists", "Key": "app/t1"}}])
assert r.status_code == 409 and r.json()["Errors"][0]["OpIndex"] == 1, r.text
assert c.kv.get("app/t2")[1] is None

assert c.kv.delete("app/", recurse=True)
assert c.kv.get("app/config/db")[1] is None
assert c.status.leader()
print("consul scenario passed")
