"""Schemathesis hooks for the Zhili fuzz run.

A blocking read (`index=N`) holds its answer back until something changes or `wait` passes
(default 5 minutes). Generated requests that name an index get a short wait, so the fuzzer
tests blocking reads without sitting on each one for minutes.
"""
import schemathesis


@schemathesis.hook
def map_query(ctx, query):
    if isinstance(query, dict) and "index" in query:
        query["wait"] = "20ms"
    return query
