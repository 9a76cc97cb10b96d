"""Summarise an `ncu --csv --metrics ...` dump: one line per profiled kernel launch, skipping
the harness's fill/reference kernels. Usage: ncu_summary.py FILE.csv"""
import csv
import sys
from collections import OrderedDict

rows = OrderedDict()
with open(sys.argv[1]) as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    key = (r["ID"], r["Kernel Name"][:60])
    rows.setdefault(key, {})[r["Metric Name"]] = (r["Metric Unit"], r["Metric Value"])
skip = ("k_fill", "k_ref", "k_pack", "k_flush")
print(f"{'id':>4} {'kernel':<48} {'grid':>7} {'regs':>4} {'us':>8} {'rdMB':>7} {'wrMB':>7} {'TB/s':>6} {'tc%':>5} {'bankc':>8}")
for (i, name), m in rows.items():
    if name.startswith(skip):
        continue
    def v(k, scale=1.0):
        if k not in m:
            return float("nan")
        unit, val = m[k]
        x = float(val.replace(",", ""))
        mult = {"nsecond": 1e-3, "usecond": 1, "msecond": 1e3, "byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1, "Gbyte": 1e3}.get(unit, 1)
        return x * mult
    us = v("gpu__time_duration.sum")
    rd = v("dram__bytes_read.sum")
    wr = v("dram__bytes_write.sum")
    print(f"{i:>4} {name:<48} {v('launch__grid_size'):7.0f} {v('launch__registers_per_thread'):4.0f} {us:8.2f} {rd:7.2f} {wr:7.2f} {(rd+wr)/us:6.2f} {v('sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active'):5.1f} {v('l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum'):8.0f}")
