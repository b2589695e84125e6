#!/usr/bin/env python3
"""Renders the raw output of bench/all.sh as markdown tables and puts them into
docs/BENCHMARKS.md between the `bench/all.sh` markers (added at the top when missing).
Usage: bench/tables.py OUT_DIR BENCHMARKS_MD COMMAND"""
import json
import re
import statistics
import sys
from pathlib import Path

BEGIN = "<!-- bench/all.sh: begin (generated; edits here are overwritten) -->"
END = "<!-- bench/all.sh: end -->"


def lines(path):
    """(comments, JSON objects) of one suite's output."""
    comments, objs = [], []
    for raw in Path(path).read_text().splitlines():
        raw = raw.strip()
        if raw.startswith("#"):
            comments.append(raw.lstrip("# "))
        elif raw.startswith("{"):
            try:
                objs.append(json.loads(raw))
            except json.JSONDecodeError:
                pass
    return comments, objs


def ms(us):
    return "—" if us is None else f"{us / 1000:.2f} ms"


def rate(x):
    return f"{x:,.0f}"


def scenario_table(title, rows):
    """A table of closed-loop results (one generator JSON line each)."""
    md = ["", f"| {title} | per second | p50 | p99 | errors |", "|---|---|---|---|---|"]
    return md + [f"| {o['scenario']} | {rate(o['per_second'])} | {ms(o['p50_us'])} | {ms(o['p99_us'])} | {o['errors']} |" for o in rows]


def gateway(out):
    comments, objs = lines(out / "gateway.jsonl")
    rounds = {}
    for o in objs:
        if "round" in o:
            rounds.setdefault(o["proxy"], []).append(o)
    med = {p: statistics.median(r["rps"] for r in rs) for p, rs in rounds.items()}
    md = ["### Gateway: Zhili vs nginx vs HAProxy", ""]
    md += [f"- {c}" for c in comments if not c.startswith("medians") and not c.startswith("two workers")]
    md += ["", "Closed loop (wrk, 64 connections), requests/s:", "", "| proxy | rounds | median | vs nginx | errors |", "|---|---|---|---|---|"]
    for p, rs in rounds.items():
        base = med.get("nginx-2w" if p.endswith("-2w") else "nginx")
        ratio = f"{med[p] / base:.2f}×" if base else "—"
        errs = "; ".join(sorted({r.get("errors", "").strip() for r in rs} - {""})) or "0"
        md.append(f"| {p} | {' / '.join(rate(r['rps']) for r in rs)} | **{rate(med[p])}** | {ratio} | {errs} |")
    open_loop = [o for o in objs if "load_pct" in o]
    if open_loop:
        md += ["", "Open loop at 25/50/75 % of the slowest proxy's median (coordinated-omission corrected): p50 / p99 / p99.9", ""]
        pcts = sorted({o["load_pct"] for o in open_loop})
        md += ["| proxy | " + " | ".join(f"{p} % ({rate(next(o['result']['rate'] for o in open_loop if o['load_pct'] == p))}/s)" for p in pcts) + " |"]
        md += ["|---" * (len(pcts) + 1) + "|"]
        for proxy in dict.fromkeys(o["proxy"] for o in open_loop):
            cells = []
            for p in pcts:
                r = next((o["result"] for o in open_loop if o["proxy"] == proxy and o["load_pct"] == p), None)
                cells.append("—" if r is None else f"{ms(r['p50_us'])} / **{ms(r['p99_us'])}** / {ms(r.get('p999_us'))}" + (f" ({r['errors']} errors)" if r.get("errors") else ""))
            md.append(f"| {proxy} | " + " | ".join(cells) + " |")
    return md


def compat(out):
    comments, objs = lines(out / "compat.jsonl")
    md = ["### Registry: Zhili's Nacos API vs r-nacos (same generator, same run), Consul and DNS", ""]
    md += [f"- {c}" for c in comments]
    md += ["", "| scenario | Zhili /s (p99) | r-nacos /s (p99) | Zhili ÷ r-nacos | server CPU per request, Zhili / r-nacos |", "|---|---|---|---|---|"]
    pairs = {}
    for o in objs:
        if "result" in o:
            pairs.setdefault(o["result"]["scenario"], {})[o["server"]] = o["result"]
    for sc, sides in pairs.items():
        z, r = sides.get("zhili"), sides.get("r-nacos")
        cell = lambda x: "—" if x is None else f"{rate(x['per_second'])} ({ms(x['p99_us'])})" + (f", {x['errors']} errors" if x.get("errors") else "")
        ratio = f"**{z['per_second'] / r['per_second']:.2f}×**" if z and r and r["per_second"] else "—"
        cpu = lambda x: f"{x['server_cpu_us_per_request']:.0f} µs" if x and "server_cpu_us_per_request" in x else "—"
        md.append(f"| {sc} | {cell(z)} | {cell(r)} | {ratio} | {cpu(z)} / {cpu(r)} |")
    push = {o["server"]: o["push"] for o in objs if "push" in o}
    if push:
        any_side = next(iter(push.values()))
        md += ["", f"Push fan-out (`nacos-push`): {any_side['subscribers']} gRPC subscribers of a {any_side['instances']}-instance service, "
               f"{any_side['rounds']} changes; server CPU per change (until every push is out and acknowledged) and change-to-push delay. "
               "r-nacos, like Nacos, gathers changes for about a second before it pushes.", "",
               "| server | CPU per change | p50 | p99 |", "|---|---|---|---|"]
        for side, x in push.items():
            md.append(f"| {side} | {x['server_cpu_ms_per_change']:.1f} ms | {ms(x['p50_us'])} | {ms(x['p99_us'])} |")
        z, r = push.get("zhili"), push.get("r-nacos")
        if z and r and z["server_cpu_ms_per_change"]:
            md.append(f"\nr-nacos ÷ Zhili CPU per change: **{r['server_cpu_ms_per_change'] / z['server_cpu_ms_per_change']:.2f}×**")
    notes = [o for o in objs if "server" in o and "result" not in o and "push" not in o]
    if notes:
        md += [""] + [f"- `{json.dumps(o)}`" for o in notes]
    alone = [o for o in objs if "server" not in o and "scenario" in o]
    if alone:
        md += scenario_table("Zhili alone", alone)
    return md


def foundation(out):
    comments, objs = lines(out / "foundation.jsonl")
    md = ["### Foundation: registry, KV and watches vs etcd", ""]
    md += [f"- {c}" for c in comments]
    md += scenario_table("scenario", [o for o in objs if "per_second" in o])
    other = [o for o in objs if "per_second" not in o]
    if other:
        md += [""] + [f"- `{json.dumps(o)}`" for o in other]
    return md


def main():
    out, doc, command = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    versions = (out / "versions.txt").read_text().strip().splitlines()
    md = [BEGIN, "", f"## Side by side, generated by `{command}`", "", "Peers: " + ", ".join(versions) + ".", ""]
    for part in (gateway, compat, foundation):
        try:
            md += part(out) + [""]
        except FileNotFoundError as e:
            md += [f"(missing: {e.filename})", ""]
    md.append(END)
    text = doc.read_text()
    block = "\n".join(md)
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        first_section = text.find("\n## ")
        text = text[: first_section + 1] + block + "\n\n" + text[first_section + 1 :] if first_section >= 0 else text + "\n" + block + "\n"
    doc.write_text(text)


if __name__ == "__main__":
    main()
