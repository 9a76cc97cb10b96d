#!/usr/bin/env python3
"""Markdown tables from `blr bench layer --out FILE` records (docs/perf/layers-h100.md).

    python3 bench/layers_table.py layers-h100.json [--before OLD.json]

Table 1: per (config, T), dense cuBLAS and the fastest strategy of each BLR format
(time us, speedup vs dense, fraction of the roofline floor), single layer. Table 2: the same
for the rows timed as one CUDA graph over 24 weight sets (per-layer time). With --before, a
third table puts the fastest time per (config, T, format) next to the older run's.
"""
import argparse
import json
from collections import OrderedDict

FORMATS = ["lowrank", "monarch", "blast"]


def best(records, graph):
    out = OrderedDict()
    for r in records:
        if (r.get("layers_in_graph", 1) > 1) != graph:
            continue
        key = (r["config"], r["tokens"])
        cell = out.setdefault(key, {})
        f = r["format"]
        if f not in cell or r["ms"] < cell[f]["ms"]:
            cell[f] = r
    return out


def fmt_dense(r):
    return "%.1f (%.0f%%)" % (r["ms"] * 1e3, 100 * r["roofline_frac"]) if r else "-"


def fmt(r):
    if not r:
        return "-"
    return "%.1f %s (%.2fx, %.0f%%)" % (
        r["ms"] * 1e3, r["strategy"], r["speedup_vs_dense"], 100 * r["roofline_frac"])


def table(cells, title):
    lines = [title, "", "| config | T | dense cuBLAS | " + " | ".join(FORMATS) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in FORMATS) + " |"]
    for (cfg, t), cell in cells.items():
        lines.append("| %s | %d | %s | %s |" % (
            cfg, t, fmt_dense(cell.get("dense")), " | ".join(fmt(cell.get(f)) for f in FORMATS)))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--before")
    a = ap.parse_args()
    recs = json.load(open(a.json))
    print(table(best(recs, False), "### Single layer (us; speedup vs dense cuBLAS; fraction of roofline)"))
    g = best(recs, True)
    if g:
        print()
        print(table(g, "### Graph of 24 weight sets back to back (per-layer us; speedup vs dense in the same kind of graph; fraction of roofline)"))
    if a.before:
        old = best(json.load(open(a.before)), False)
        new = best(recs, False)
        print()
        print("### Fastest strategy per format, before -> after (us)")
        print()
        print("| config | T | " + " | ".join(FORMATS) + " |")
        print("| --- | --- | " + " | ".join("---" for _ in FORMATS) + " |")
        for key, cell in new.items():
            o = old.get(key, {})
            parts = []
            for f in FORMATS:
                if f in cell and f in o:
                    parts.append("%.1f -> %.1f" % (o[f]["ms"] * 1e3, cell[f]["ms"] * 1e3))
                else:
                    parts.append("-")
            print("| %s | %d | %s |" % (key[0], key[1], " | ".join(parts)))


if __name__ == "__main__":
    main()
