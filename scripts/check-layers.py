#!/usr/bin/env python3
"""Checks the workspace's dependency levels (docs/ARCHITECTURE.md): every crate imports only
crates on lower levels, dev-dependencies included; crates on one level never import each other.
A crate missing from LEVELS fails the check, so a new crate gets a level when it is added."""
import json, subprocess, sys

LEVELS = {
    "zhili-test-support": 0,
    "zhili-model": 1, "zhili-client": 1.5,  # the SDK: zhili-model only
    "zhili-store": 2, "zhili-telemetry": 2, "zhili-config": 2, "zhili-net": 2,
    "zhili-registry": 3, "zhili-health": 3, "zhili-acl": 3, "zhili-kv": 3, "zhili-routes": 3, "zhili-events": 3, "zhili-txn": 3, "zhili-plans": 3,
    "zhili-dns": 3, "zhili-gateway": 3,
    "zhili-store-fjall": 4, "zhili-http": 4,
    "zhili-api": 5, "zhili-consul": 5, "zhili-nacos": 5, "zhili-dtm": 5,
    "zhili": 6, "zhili-bench": 6, "zhili-shop": 6,
}

meta = json.loads(subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps", "--locked"], check=True, capture_output=True, text=True).stdout)
members = {p["name"]: p for p in meta["packages"]}
bad = []
for name, pkg in sorted(members.items()):
    if name not in LEVELS:
        bad.append(f"{name}: no level (add it to scripts/check-layers.py and docs/ARCHITECTURE.md)")
        continue
    for dep in pkg["dependencies"]:
        if dep["name"] in members and LEVELS.get(dep["name"], 99) >= LEVELS[name]:
            kind = dep["kind"] or "normal"
            bad.append(f"{name} (L{LEVELS[name]}) imports {dep['name']} (L{LEVELS.get(dep['name'], '?')}) as a {kind} dependency")
for b in bad:
    print(b)
print(f"{len(members)} crates checked: " + ("ok" if not bad else f"{len(bad)} problems"))
sys.exit(1 if bad else 0)
