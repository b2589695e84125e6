"""The legacy nacos-sdk-python client (PyPI 2.0.x, Nacos open API v1 over HTTP) against Zhili, ACLs on.

Usage: nacos_v1_scenario.py HOST NACOS_HTTP_PORT API_PORT TOKEN

register -> discover -> beats (10200 / 20404) -> health change by missed beats -> modify ->
deregister, groups, config publish/get/watch (long-poll woken by a Consul KV write) /remove.
"""

import sys
import threading
import time

import nacos
from zhili_http import call

HOST, HTTP_PORT, API_PORT, TOKEN = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
SERVICE = "legacy-demo"
TIMEOUT = 15.0


def api(method, path, body=None):
    """A call to Zhili's API listener (native or Consul)."""
    return call(f"http://{HOST}:{API_PORT}", TOKEN, method, path, body)


def eventually(what, f, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        value = f()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.1)


def hosts(client, service=SERVICE, healthy_only=False, group_name=None):
    return sorted((h["ip"], h["port"], h["healthy"]) for h in
                  client.list_naming_instance(service, healthy_only=healthy_only, group_name=group_name)["hosts"])


def main():
    client = nacos.NacosClient(f"{HOST}:{HTTP_PORT}", username="zhili", password=TOKEN)

    # Short heartbeat windows so a missed beat shows within the test.
    st, body = api("PUT", f"/api/v1/services/{SERVICE}",
                   {"health": {"heartbeat_interval": "1s", "unhealthy_after": "2s", "remove_after": "4s"}})
    assert st == 200, (st, body)

    # The client beats this one every second in the background.
    assert client.add_naming_instance(SERVICE, "10.4.0.1", 8080, metadata={"v": "1"}, heartbeat_interval=1)
    # This one never beats.
    assert client.add_naming_instance(SERVICE, "10.4.0.2", 8080)
    assert hosts(client) == [("10.4.0.1", 8080, True), ("10.4.0.2", 8080, True)], hosts(client)
    one = client.get_naming_instance(SERVICE, "10.4.0.1", 8080)
    assert one["ip"] == "10.4.0.1" and one["metadata"] == {"v": "1"}, one

    # Visible through Consul with the same health.
    st, body = api("GET", f"/v1/health/service/{SERVICE}?passing=true")
    assert st == 200 and sorted(e["Service"]["Address"] for e in body) == ["10.4.0.1", "10.4.0.2"], body

    assert client.send_heartbeat(SERVICE, "10.4.0.1", 8080)["code"] == 10200
    assert client.send_heartbeat(SERVICE, "10.9.9.9", 1)["code"] == 20404

    # Missed beats: unhealthy, then removed; a beat for it then says 20404 so the client re-registers.
    eventually("silent instance unhealthy",
               lambda: hosts(client) == [("10.4.0.1", 8080, True), ("10.4.0.2", 8080, False)])
    assert [h[0] for h in hosts(client, healthy_only=True)] == ["10.4.0.1"]
    eventually("silent instance removed", lambda: hosts(client) == [("10.4.0.1", 8080, True)])
    assert client.send_heartbeat(SERVICE, "10.4.0.2", 8080)["code"] == 20404

    # Modify: weight and metadata, seen through the native API.
    assert client.modify_naming_instance(SERVICE, "10.4.0.1", 8080, weight=3.0, metadata={"v": "2"})
    st, body = api("GET", f"/api/v1/services/{SERVICE}/instances/10.4.0.1:8080")
    assert st == 200 and body["weight"] == 300 and body["metadata"] == {"v": "2"}, body

    # Groups: the service carries the group; another group's name does not see it.
    assert client.add_naming_instance("legacy-grouped", "10.4.1.1", 1, group_name="LG")
    assert [h[0] for h in hosts(client, "legacy-grouped", group_name="LG")] == ["10.4.1.1"]
    assert hosts(client, "legacy-grouped", group_name="OTHER") == []
    st, body = api("GET", "/api/v1/services/legacy-grouped")
    assert st == 200 and body["service"]["group"] == "LG", body
    assert client.remove_naming_instance("legacy-grouped", "10.4.1.1", 1, group_name="LG")

    # Deregister: gone for Consul too.
    assert client.remove_naming_instance(SERVICE, "10.4.0.1", 8080)
    st, body = api("GET", f"/v1/health/service/{SERVICE}")
    assert st == 200 and body == [], body

    # Config: publish, read, watch (long-poll), change through Consul KV, remove.
    assert client.publish_config("legacy.properties", "DEFAULT_GROUP", "a=1")
    assert client.get_config("legacy.properties", "DEFAULT_GROUP", no_snapshot=True) == "a=1"
    seen = []
    changed = threading.Event()

    def on_change(params):
        seen.append(params["content"])
        changed.set()

    client.add_config_watcher("legacy.properties", "DEFAULT_GROUP", on_change)
    time.sleep(1.5)  # the watcher's first long-poll is in flight
    st, body = api("PUT", "/v1/kv/config/public/DEFAULT_GROUP/legacy.properties", b"a=2")
    assert st == 200 and body is True, (st, body)
    eventually("long-poll woken by the KV write", lambda: "a=2" in seen)
    assert client.remove_config("legacy.properties", "DEFAULT_GROUP")
    assert client.get_config("legacy.properties", "DEFAULT_GROUP", no_snapshot=True) is None

    # No token, no access.
    anonymous = nacos.NacosClient(f"{HOST}:{HTTP_PORT}")
    try:
        anonymous.add_naming_instance(SERVICE, "10.4.9.9", 1)
        raise AssertionError("anonymous registration succeeded")
    except nacos.exception.NacosException as e:
        assert "Insufficient privilege" in str(e), e
    print("nacos v1 scenario passed")


main()
