"""Side-by-side table of a bench/tma run: per row, dense and Monarch `partial` with each
BLR_MONARCH_STAGE1 variant (us, speedup vs dense), from OUT_DIR/b-<variant>.json. Dense rows
come from whichever file has them (run2: the first variant's).
Usage: python3 bench/tma/table.py OUT_DIR variant [variant ...]"""
import json
import os
import sys

out, variants = sys.argv[1], sys.argv[2:]


def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else []


def key(r):
    return (r["config"], r["tokens"], r.get("layers_in_graph"))


runs = {v: load(f"b-{v}.json") for v in variants}
dense = {key(r): r for v in variants for r in runs[v] if r["format"] == "dense"}
part = {
    v: {key(r): r for r in runs[v] if r["format"] == "monarch" and r["strategy"] == "partial"}
    for v in variants
}
print("config T graph | dense us | " + " | ".join(f"{v} us (x dense)" for v in variants))
for k in part[variants[0]]:
    d = dense.get(k)
    row = f"{k[0]} {k[1]} {k[2]} | " + (f"{d['ms'] * 1e3:.1f}" if d else "-")
    for v in variants:
        m = part[v].get(k)
        if m is None:
            row += " | -"
            continue
        sp = f" ({d['ms'] / m['ms']:.2f}x)" if d else ""
        row += f" | {m['ms'] * 1e3:.1f}{sp}"
    print(row)
