#!/usr/bin/env python3
"""Check blr's model implementations against PyTorch reference implementations.

Input: bundles written by `blr eval reference --arch ARCH --out FILE` (crates/blr-models/src/reference.rs):
random weights under the PyTorch model's own state-dict names, a random input, blr's CPU (f32)
output for it, and the config in the metadata. This script builds the PyTorch model
(transformers LlamaForCausalLM / GPT2LMHeadModel, timm VisionTransformer, and DiT written below
from the paper, with the reference implementation's module names), loads the weights, runs the
same input and prints ||blr - torch|| / ||torch||.

Usage (on a machine with torch, transformers, timm, safetensors):
    python crates/blr-models/tools/torch_reference.py llama.safetensors gpt2.safetensors ...
    python crates/blr-models/tools/torch_reference.py --device cuda --tol 1e-4 *.safetensors
Bundles written with `blr eval reference --also cuda` also hold blr's CUDA (bf16) output, checked
against the same PyTorch output with --tol-bf16. Per output it prints the max absolute
difference, the largest reference magnitude and ||blr - torch|| / ||torch||.
Exit status 1 when any relative error exceeds its limit (--tol, default 1e-4: both sides f32).
"""
import argparse
import json
import math
import sys

import torch
import torch.nn as nn
from safetensors import safe_open


def load(path):
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "blr.reference.arch" not in meta:
        sys.exit(f"{path}: not a blr reference bundle (no blr.reference.arch metadata)")
    return meta["blr.reference.arch"], json.loads(meta["blr.reference.config"]), tensors


def state_dict(tensors):
    return {k: v for k, v in tensors.items() if not k.startswith("blr.reference.")}


def load_weights(model, sd, allowed_missing=()):
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in allowed_missing and not k.endswith(".attn.bias")
               and not k.endswith(".attn.masked_bias")]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")


def run_llama(cfg, t, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    c = LlamaConfig(**kwargs)
    # transformers >= 5 keeps RoPE settings in `rope_parameters`; make sure they are ours.
    if hasattr(c, "rope_parameters"):
        rp = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
        if cfg.get("rope_scaling"):
            rp.update(cfg["rope_scaling"])
            rp["rope_theta"] = cfg["rope_theta"]
        c.rope_parameters = rp
    c._attn_implementation = "eager"
    m = LlamaForCausalLM(c).eval()
    load_weights(m, state_dict(t), allowed_missing=("lm_head.weight",) if cfg["tie_word_embeddings"] else ())
    if cfg["tie_word_embeddings"]:
        m.tie_weights()
    m = m.to(device)
    ids = t["blr.reference.input_ids"].long()[None].to(device)
    with torch.no_grad():
        return m(ids).logits[0].float().cpu()


def run_gpt2(cfg, t, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = GPT2Config(**{k: v for k, v in cfg.items() if k != "model_type"})
    c._attn_implementation = "eager"
    m = GPT2LMHeadModel(c).eval()
    load_weights(m, state_dict(t), allowed_missing=("lm_head.weight",))
    m.tie_weights()
    m = m.to(device)
    ids = t["blr.reference.input_ids"].long()[None].to(device)
    with torch.no_grad():
        return m(ids).logits[0].float().cpu()


def run_vit(cfg, t, device):
    from timm.models.vision_transformer import VisionTransformer

    m = VisionTransformer(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], in_chans=cfg["in_chans"],
        num_classes=cfg["num_classes"], embed_dim=cfg["embed_dim"], depth=cfg["depth"],
        num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_hidden"] / cfg["embed_dim"],
        qkv_bias=True, class_token=True, global_pool="token",
    ).eval()
    m.load_state_dict(state_dict(t), strict=True)
    m = m.to(device)
    with torch.no_grad():
        return m(t["blr.reference.image"].to(device)).float().cpu()


# ---- DiT, written from the paper (Peebles & Xie 2023) with the reference code's module names.

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        x = (a.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x, c):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1))
        x = x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))
        return x


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq=256):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq // 2
        f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * f[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    def __init__(self, classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(classes + 1, dim)

    def forward(self, y):
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    def __init__(self, p, cin, dim):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, kernel_size=p, stride=p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class FinalLayer(nn.Module):
    def __init__(self, dim, p, cout):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, p * p * cout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, p = cfg["hidden_size"], cfg["patch_size"]
        self.p, self.cin = p, cfg["in_channels"]
        self.cout = 2 * self.cin if cfg["learn_sigma"] else self.cin
        n = (cfg["input_size"] // p) ** 2
        self.x_embedder = PatchEmbed(p, self.cin, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg["num_classes"], d)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, d), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(d, cfg["num_heads"], cfg["mlp_hidden"]) for _ in range(cfg["depth"])])
        self.final_layer = FinalLayer(d, p, self.cout)

    def unpatchify(self, x):
        c, p = self.cout, self.p
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for blk in self.blocks:
            x = blk(x, c)
        return self.unpatchify(self.final_layer(x, c))


def run_dit(cfg, t, device):
    m = DiT(cfg).eval()
    m.load_state_dict(state_dict(t), strict=True)
    m = m.to(device)
    with torch.no_grad():
        return m(t["blr.reference.latent"].to(device), t["blr.reference.t"].to(device),
                 t["blr.reference.y"].long().to(device)).float().cpu()


RUNNERS = {"llama": run_llama, "gpt2": run_gpt2, "vit": run_vit, "dit": run_dit}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--tol-bf16", type=float, default=3e-2,
                    help="limit for outputs of blr's bf16 backends (blr.reference.output_cuda)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__} on {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    worst_ok = True
    rows = []
    print(f"{'bundle':34} {'arch':5} {'blr backend':12} {'output':>16} {'max abs':>10} {'max |ref|':>10} "
          f"{'rel. (norm)':>11}  result")
    for path in args.bundles:
        arch, cfg, t = load(path)
        ref = RUNNERS[arch](cfg, t, args.device).double()
        # blr's CPU (f32) output always; its CUDA (bf16) output when the bundle has one.
        for key, backend, tol in (("blr.reference.output", "cpu f32", args.tol),
                                  ("blr.reference.output_cuda", "cuda bf16", args.tol_bf16)):
            if key not in t:
                continue
            ours = t[key].reshape(ref.shape).double()
            diff = ours - ref
            err = (diff.norm() / ref.norm()).item()
            max_abs = diff.abs().max().item()
            ref_max = ref.abs().max().item()
            ok = math.isfinite(err) and math.isfinite(max_abs) and err <= tol
            worst_ok &= ok
            rows.append({"bundle": path, "arch": arch, "backend": backend, "shape": list(ref.shape),
                         "max_abs": max_abs, "max_ref": ref_max, "rel_norm": err, "tol": tol, "ok": ok})
            print(f"{path:34} {arch:5} {backend:12} {str(tuple(ref.shape)):>16} {max_abs:10.3e} "
                  f"{ref_max:10.3e} {err:11.3e}  {'ok' if ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": args.device, "rows": rows}, f, indent=1)
    sys.exit(0 if worst_ok else 1)


if __name__ == "__main__":
    main()
