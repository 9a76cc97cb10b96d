"""PyTorch side of `blr bench layer`: times the PyTorch reference code of BRIEF section 2 (eager)
and its torch.compile, on the same GPU, for the same layer configs, and writes the same JSON
records, so one table can show blr next to PyTorch.

    python3 bench/pytorch_layers.py --config llama7b-qkvo --tokens 1,16,128,1024 --out torch.json
    python3 bench/pytorch_layers.py --config all --compile --out torch.json

Method (BRIEF section 6, same as blr): bf16 inputs and weights, CUDA events around each run,
median of --reps runs, L2 evicted before every run by *reading* a buffer 4x the L2 size (a
write flush leaves dirty lines whose write-back lands in the timed region), ceilings (copy
bandwidth, bf16 GEMM rate) measured in the same run. rel_error is against the same code run
in fp32 on the same (bf16-rounded) weights and inputs.
"""

import argparse
import json
import math
import statistics
import sys

import torch

# name, m, n, native T, blast b, blast r, monarch b, monarch R, lowrank r (BRIEF section 3;
# mirrors blr_core::cost::REFERENCE_CONFIGS).
CONFIGS = {
    "llama7b-qkvo": (4096, 4096, 1024, 16, 1024, 16, 1024, 1024),
    "llama7b-gate-up": (11008, 4096, 1024, 16, 1488, 16, 1536, 1488),
    "llama7b-down": (4096, 11008, 1024, 16, 1488, 16, 1536, 1488),
    "llama3.2-1b-qo": (2048, 2048, 1024, 16, 256, 16, 256, 256),
    "llama3.2-1b-gate": (8192, 2048, 1024, 16, 512, 16, 512, 512),
    "llama3.2-1b-up": (8192, 2048, 1024, 16, 768, 16, 768, 768),
    "llama3.2-1b-down": (2048, 8192, 1024, 16, 768, 16, 768, 768),
    "gpt2s-attn": (2304, 768, 1024, 6, 192, 4, 192, 192),
    "gpt2s-fc": (3072, 768, 1024, 6, 192, 4, 192, 192),
    "gpt2s-proj": (768, 3072, 1024, 6, 192, 4, 192, 192),
    "vit-b16-qkv": (2304, 768, 197, 3, 128, 4, 128, 128),
    "vit-b16-fc1": (3072, 768, 197, 3, 128, 4, 128, 128),
    "vit-b16-fc2": (768, 3072, 197, 3, 128, 4, 128, 128),
    "dit-xl2-qkv": (3456, 1152, 256, 9, 384, 9, 384, 384),
    "dit-xl2-fc1": (4608, 1152, 256, 9, 256, 9, 256, 256),
}


# ---------------------------------------------------------------- reference code (BRIEF §2)
def dense_fwd(x, w):
    return torch.nn.functional.linear(x, w)


def lowrank_fwd(x, u, v):
    return (x @ v.t()) @ u.t()


def monarch_fwd(x, w1, w2):
    # fly's blockdiag_butterfly_multiply, generalised (b blocks, total rank R).
    t, n = x.shape
    b, r, nb = w1.shape
    mb = w2.shape[1]
    out1 = torch.bmm(x.view(t, b, nb).transpose(0, 1), w1.transpose(1, 2))  # (b, T, R)
    out1 = out1.transpose(0, 1).reshape(t, b * r).view(t, r, b).transpose(1, 2)  # P: (T, b, R)
    out2 = torch.bmm(out1.transpose(0, 1), w2.transpose(1, 2))  # (b, T, m/b)
    return out2.permute(1, 2, 0).reshape(t, mb * b)


def blast_fwd(x, u, vt, s):
    # Public BLAST reference: bmm, broadcast-multiply + sum over input blocks, bmm.
    t, n = x.shape
    b_in, r, q = vt.shape
    b_out, p, _ = u.shape
    z = torch.bmm(x.view(t, b_in, q).transpose(0, 1), vt.transpose(1, 2))  # (b_in, T, r)
    w = (s.unsqueeze(2) * z.unsqueeze(0)).sum(1)  # (b_out, T, r)
    y = torch.bmm(w, u.transpose(1, 2))  # (b_out, T, p)
    return y.transpose(0, 1).reshape(t, b_out * p)


def make_layer(fmt, cfg, gen, dev):
    m, n, _, bb, br, mbk, mr, lr = cfg
    rnd = lambda *shape, std: (torch.randn(*shape, generator=gen) * std).to(dev, torch.bfloat16)
    if fmt == "dense":
        return dense_fwd, (rnd(m, n, std=n**-0.5),), m * n
    if fmt == "lowrank":
        return lowrank_fwd, (rnd(m, lr, std=lr**-0.5), rnd(lr, n, std=n**-0.5)), lr * (m + n)
    if fmt == "monarch":
        w1 = rnd(mbk, mr, n // mbk, std=(n // mbk) ** -0.5)
        w2 = rnd(mbk, m // mbk, mr, std=mr**-0.5)
        return monarch_fwd, (w1, w2), mr * (m + n)
    if fmt == "blast":
        u = rnd(bb, m // bb, br, std=br**-0.5)
        vt = rnd(bb, br, n // bb, std=(n // bb) ** -0.5)
        s = rnd(bb, bb, br, std=bb**-0.5)
        return blast_fwd, (u, vt, s), br * (m + n + bb * bb)
    raise ValueError(fmt)


def flops_of(fmt, cfg, t):
    m, n, _, bb, br, mbk, mr, lr = cfg
    return {
        "dense": 2.0 * t * m * n,
        "lowrank": 2.0 * t * lr * (m + n),
        "monarch": 2.0 * t * mr * (m + n),
        "blast": 2.0 * t * br * (m + n + bb * bb),
    }[fmt]


class Flusher:
    def __init__(self, dev):
        l2 = torch.cuda.get_device_properties(dev).L2_cache_size
        self.buf = torch.zeros(max(l2, 1 << 20) * 4 // 4, dtype=torch.float32, device=dev)

    def flush(self):
        self.buf.sum()


def time_ms(fn, flusher, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        flusher.flush()
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b))
    return statistics.median(samples)


def ceilings(dev, flusher):
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), flusher, 10)
    bw = 2 * src.numel() * 2 / (ms * 1e-3)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ bm, flusher, 10)
    peak = 2 * 8192**3 / (ms * 1e-3)
    del src, dst, a, bm
    return bw, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llama7b-qkvo", help="comma separated, or all")
    ap.add_argument("--tokens", default="1,16,128,native")
    ap.add_argument("--formats", default="dense,lowrank,monarch,blast")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of each layer")
    ap.add_argument("--out", help="write the JSON records here")
    args = ap.parse_args()

    dev = torch.device("cuda")
    flusher = Flusher(dev)
    bw, peak = ceilings(dev, flusher)
    name = torch.cuda.get_device_name(dev)
    print(f"device {name} | torch {torch.__version__} | copy {bw/1e9:.0f} GB/s, bf16 GEMM {peak/1e12:.0f} TFLOP/s",
          file=sys.stderr)
    names = list(CONFIGS) if args.config == "all" else [c.strip() for c in args.config.split(",")]
    records = []
    gen = torch.Generator().manual_seed(7)
    for cname in names:
        cfg = CONFIGS[cname]
        m, n, native = cfg[0], cfg[1], cfg[2]
        toks = sorted({native if t == "native" else int(t) for t in args.tokens.split(",")})
        dense_ms = {}
        for fmt in [f.strip() for f in args.formats.split(",")]:
            fwd, weights, params = make_layer(fmt, cfg, gen, dev)
            weights32 = tuple(w.float() for w in weights)
            compiled = torch.compile(fwd) if args.compile else None
            for t in toks:
                x = torch.randn(t, n, generator=gen).to(dev, torch.bfloat16)
                with torch.no_grad():
                    ref = fwd(x.float(), *weights32)
                variants = [("torch-eager", fwd)] + ([("torch-compile", compiled)] if compiled else [])
                for strat, f in variants:
                    with torch.no_grad():
                        y = f(x, *weights)
                        err = (y.float() - ref).norm().item() / max(ref.norm().item(), 1e-30)
                        ms = time_ms(lambda: f(x, *weights), flusher, args.reps)
                    fl = flops_of(fmt, cfg, t)
                    by = 2.0 * (params + t * (m + n))
                    floor_ms = max(by / bw, fl / peak) * 1e3
                    if fmt == "dense" and strat == "torch-eager":
                        dense_ms[t] = ms
                    rec = {
                        "device": name, "config": cname, "m": m, "n": n, "tokens": t, "format": fmt,
                        "strategy": strat, "params": params, "ms": ms, "floor_ms": floor_ms,
                        "roofline_frac": floor_ms / ms,
                        "speedup_vs_dense": dense_ms.get(t, math.nan) / ms,
                        "rel_error": err, "flops": fl, "bytes": by,
                        "bw_gbs": bw / 1e9, "peak_tflops": peak / 1e12,
                    }
                    records.append(rec)
                    print(f"{cname:<18} {t:>5} {fmt:<8} {strat:<14} {ms:9.4f} {floor_ms:9.4f} "
                          f"{rec['roofline_frac']:6.2f} {rec['speedup_vs_dense']:7.2f}x {err:9.2e}", file=sys.stderr)
            del weights, weights32, compiled
            torch.cuda.empty_cache()
    text = json.dumps(records, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
