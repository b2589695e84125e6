#!/usr/bin/env python3
"""Lists circles among a crate's source files: file A imports B (`crate::b`, or an item the crate
root re-exports from B) and B imports A, directly or around a longer loop. Exit 1 on any.
Usage: module-cycles.py crates/zhili-gateway/src"""
import re, sys, pathlib

src = pathlib.Path(sys.argv[1])
root = (src / "lib.rs").read_text()
# Items the crate root re-exports, mapped to the module that defines them.
reexport = {}
for m, items in re.findall(r"pub use (\w+)::\{?([\w, ]+)\}?;", root):
    for item in items.split(","):
        reexport[item.strip()] = m
graph = {}
for f in src.glob("*.rs"):
    if f.stem == "lib":
        continue
    text = f.read_text()
    deps = set(re.findall(r"crate::([a-z_0-9]+)", text))
    deps |= {reexport[i] for i in re.findall(r"crate::([A-Z]\w*)", text) if i in reexport}
    graph[f.stem] = {d for d in deps if d != f.stem}
cycles, state, stack = [], {}, []

def visit(u):
    state[u] = 1
    stack.append(u)
    for v in sorted(graph.get(u, ())):
        if v in graph and state.get(v) == 1:
            cycles.append(stack[stack.index(v):] + [v])
        elif v in graph and not state.get(v):
            visit(v)
    stack.pop()
    state[u] = 2

for u in sorted(graph):
    if not state.get(u):
        visit(u)
for c in cycles:
    print("circle: " + " -> ".join(c))
sys.exit(1 if cycles else 0)
