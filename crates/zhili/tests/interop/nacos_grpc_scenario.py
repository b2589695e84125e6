"""nacos-sdk-python 3.x (Nacos 2.x gRPC) against Zhili, with ACLs on.

Usage: nacos_grpc_scenario.py HOST NACOS_HTTP_PORT NACOS_GRPC_PORT API_PORT TOKEN

register -> discover -> subscribe push on a change made through another protocol -> health change
-> deregister, batch register, service list, connection-bound ephemerality, config round trip with
a listener woken by a Consul KV write, and cross-protocol checks through the Consul and native APIs.
"""

import asyncio
import logging
import sys
import tempfile
import time
import urllib.error
import urllib.request

from zhili_http import call
from v2.nacos import (BatchRegisterInstanceParam, ClientConfigBuilder, ConfigParam, DeregisterInstanceParam,
                      GRPCConfig, ListInstanceParam, ListServiceParam, NacosConfigService, NacosException,
                      NacosNamingService, RegisterInstanceParam, SubscribeServiceParam)

HOST, HTTP_PORT, GRPC_PORT, API_PORT, TOKEN = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
SERVICE = "nacos-grpc-demo"
TIMEOUT = 10.0
# Longer than the --read-timeout the test gives the server.
QUIET = 5.0


def api(method, path, body=None):
    """A call to Zhili's API listener (native or Consul)."""
    return call(f"http://{HOST}:{API_PORT}", TOKEN, method, path, body)


def consul_addresses(passing=True):
    st, body = api("GET", f"/v1/health/service/{SERVICE}" + ("?passing=true" if passing else ""))
    assert st == 200, (st, body)
    return sorted((e["Service"]["Address"], e["Service"]["Port"]) for e in body)


async def eventually(what, f, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        value = f()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.1)


def config(password=TOKEN):
    cache = tempfile.mkdtemp(prefix="nacos-py3-")
    return (ClientConfigBuilder()
            .server_address(f"{HOST}:{HTTP_PORT}")
            .username("zhili")
            .password(password)
            .log_level(logging.WARNING)
            .log_dir(cache)
            .cache_dir(cache)
            .grpc_config(GRPCConfig(grpc_timeout=5000, port_offset=GRPC_PORT - HTTP_PORT))
            .build())


async def naming_scenario():
    naming = await NacosNamingService.create_naming_service(config())
    assert await naming.register_instance(RegisterInstanceParam(
        service_name=SERVICE, ip="10.1.0.1", port=8080, weight=2.0, metadata={"version": "v1"}))
    hosts = await naming.list_instances(ListInstanceParam(service_name=SERVICE, subscribe=False, healthy_only=True))
    assert [(h.ip, h.port, h.weight, h.metadata.get("version")) for h in hosts] == [("10.1.0.1", 8080, 2.0, "v1")], hosts

    # The same instance through the Consul and native APIs.
    assert consul_addresses() == [("10.1.0.1", 8080)], consul_addresses()
    st, body = api("GET", f"/api/v1/services/{SERVICE}/instances")
    assert st == 200 and [i["weight"] for i in body["instances"]] == [200], body

    # Subscribe; a registration through the native API is pushed to us.
    pushed = []

    async def on_change(instances):
        pushed.append(sorted((i.ip, i.port, i.healthy) for i in instances))

    await naming.subscribe(SubscribeServiceParam(service_name=SERVICE, subscribe_callback=on_change))
    st, body = api("POST", f"/api/v1/services/{SERVICE}/instances", {"address": "10.1.0.2", "port": 8080})
    assert st in (200, 201), (st, body)
    await eventually("push of the native registration",
                     lambda: any(p == [("10.1.0.1", 8080, True), ("10.1.0.2", 8080, True)] for p in pushed))

    # Health change through Consul (maintenance) is pushed as healthy=False.
    st, body = api("PUT", "/v1/agent/service/maintenance/10.1.0.2:8080?enable=true&reason=test")
    assert st == 200, (st, body)
    await eventually("push of the health change",
                     lambda: any(p == [("10.1.0.1", 8080, True), ("10.1.0.2", 8080, False)] for p in pushed))
    healthy = await naming.list_instances(ListInstanceParam(service_name=SERVICE, subscribe=False, healthy_only=True))
    assert [(h.ip, h.port) for h in healthy] == [("10.1.0.1", 8080)], healthy

    # Deregister through gRPC: gone for Consul too, and pushed.
    assert await naming.deregister_instance(DeregisterInstanceParam(service_name=SERVICE, ip="10.1.0.1", port=8080))
    await eventually("deregistration visible in Consul", lambda: ("10.1.0.1", 8080) not in consul_addresses(passing=False))
    await eventually("push of the deregistration", lambda: any(p == [("10.1.0.2", 8080, False)] for p in pushed))
    st, _ = api("DELETE", f"/api/v1/services/{SERVICE}/instances/10.1.0.2:8080")
    assert st in (200, 204), st

    # Batch register, then batch deregister one: exactly the rest remain.
    batch = [RegisterInstanceParam(service_name="nacos-batch", ip=f"10.2.0.{n}", port=9000) for n in (1, 2, 3)]
    assert await naming.batch_register_instances(BatchRegisterInstanceParam(service_name="nacos-batch", instances=batch))
    listed = await naming.list_instances(ListInstanceParam(service_name="nacos-batch", subscribe=False, healthy_only=True))
    assert sorted(h.ip for h in listed) == ["10.2.0.1", "10.2.0.2", "10.2.0.3"], listed
    assert await naming.batch_deregister_instances(BatchRegisterInstanceParam(service_name="nacos-batch", instances=batch[:1]))

    # list_instances subscribes, so the client's cache follows the server's pushes.
    async def batch_rest():
        listed = await naming.list_instances(ListInstanceParam(service_name="nacos-batch", healthy_only=True))
        return sorted(h.ip for h in listed) == ["10.2.0.2", "10.2.0.3"]

    await eventually("batch deregistration leaves exactly the rest", batch_rest)

    services = await naming.list_services(ListServiceParam(page_size=100))
    assert "nacos-batch" in services.services, services

    # A second client's ephemeral instance lives exactly as long as its connection.
    other = await NacosNamingService.create_naming_service(config())
    assert await other.register_instance(RegisterInstanceParam(service_name=SERVICE, ip="10.1.0.9", port=7000))
    await eventually("second client's instance visible", lambda: ("10.1.0.9", 7000) in consul_addresses())

    # Quiet past the server's read timeout (the test runs it with --read-timeout 2s): the client
    # sends nothing on its stream, yet keeps its connection and its instance. Dropped, the SDK
    # would reconnect and register again, under a new create index.
    def create_index():
        st, body = api("GET", f"/v1/catalog/service/{SERVICE}")
        assert st == 200, (st, body)
        return [e["CreateIndex"] for e in body if (e["ServiceAddress"], e["ServicePort"]) == ("10.1.0.9", 7000)]

    registered = create_index()
    await asyncio.sleep(QUIET)
    assert create_index() == registered, (registered, create_index())
    await other.shutdown()
    await eventually("instance removed with its connection", lambda: ("10.1.0.9", 7000) not in consul_addresses(passing=False))

    # A group other than the default is its own service attribute.
    assert await naming.register_instance(RegisterInstanceParam(
        service_name="grouped", group_name="G1", ip="10.3.0.1", port=1))
    in_group = await naming.list_instances(ListInstanceParam(service_name="grouped", group_name="G1", subscribe=False, healthy_only=True))
    assert [h.ip for h in in_group] == ["10.3.0.1"], in_group
    st, body = api("GET", "/api/v1/services/grouped")
    assert st == 200 and body["service"]["group"] == "G1", body
    await naming.shutdown()


async def config_scenario():
    cfg = await NacosConfigService.create_config_service(config())
    assert await cfg.publish_config(ConfigParam(data_id="app.yaml", group="DEFAULT_GROUP", content="level: info"))
    assert await cfg.get_config(ConfigParam(data_id="app.yaml", group="DEFAULT_GROUP")) == "level: info"
    # The same config is a Consul KV key.
    st, body = api("GET", "/v1/kv/config/public/DEFAULT_GROUP/app.yaml?raw")
    assert st == 200 and body == "level: info", (st, body)

    seen = []

    async def on_config(tenant, group, data_id, content):
        seen.append(content)

    await cfg.add_listener("app.yaml", "DEFAULT_GROUP", on_config)
    # A write through Consul KV wakes the Nacos listener (server push).
    st, body = api("PUT", "/v1/kv/config/public/DEFAULT_GROUP/app.yaml", b"level: debug")
    assert st == 200 and body is True, (st, body)
    await eventually("config change pushed to the listener", lambda: "level: debug" in seen)
    assert await cfg.publish_config(ConfigParam(data_id="app.yaml", group="DEFAULT_GROUP", content="level: warn"))
    await eventually("second change pushed", lambda: "level: warn" in seen)
    assert await cfg.remove_config(ConfigParam(data_id="app.yaml", group="DEFAULT_GROUP"))
    st, _ = api("GET", "/v1/kv/config/public/DEFAULT_GROUP/app.yaml")
    assert st == 404, st
    await cfg.shutdown()


async def acl_scenario():
    # A wrong password gets no token, and requests without one are refused.
    req = urllib.request.Request(f"http://{HOST}:{HTTP_PORT}/nacos/v1/auth/users/login?username=zhili&password=wrong", method="POST", data=b"")
    try:
        urllib.request.urlopen(req, timeout=5)
        raise AssertionError("login with a wrong password succeeded")
    except urllib.error.HTTPError as e:
        assert e.code == 403, e.code
    anonymous = await NacosNamingService.create_naming_service(config(password="not-a-token"))
    try:
        await anonymous.register_instance(RegisterInstanceParam(service_name=SERVICE, ip="10.9.9.9", port=1))
        raise AssertionError("registration without a valid token succeeded")
    except NacosException:
        pass
    finally:
        await anonymous.shutdown()
    assert ("10.9.9.9", 1) not in consul_addresses(passing=False)


async def main():
    await naming_scenario()
    await config_scenario()
    await acl_scenario()
    print("nacos grpc scenario passed")


asyncio.run(asyncio.wait_for(main(), 90))
