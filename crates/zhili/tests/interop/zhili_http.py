"""HTTP calls to Zhili's API listener for the interop scenarios (standard library only)."""

import json
import urllib.error
import urllib.request


def call(base, token, method, path, body=None):
    """One request; returns (status, the body parsed as JSON, or as text when it is not JSON)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(f"{base}{path}", data=data, method=method)
    if token:
        req.add_header("X-Consul-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()
