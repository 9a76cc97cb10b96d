#!/usr/bin/env python3
"""Cross-check `blr eval ppl` with PyTorch: the same perplexity recipe with transformers.

Weights: a bundle from `blr eval reference --arch llama --model smollm2 --out FILE` (SmolLM2
dequantised from its GGUF, HF names). Tokenizer: the HF `tokenizers` library configured as
SmolLM2's (BPE from the GGUF vocab/merges, Digits + ByteLevel pre-tokenizer). Data: the text file
read as-is. Windows of --ctx every --stride tokens, each scoring the targets the previous window
did not (the Hugging Face recipe, as blr implements it).

    python crates/blr-models/tools/ppl_reference.py BUNDLE GGUF data/wikitext-2/test.txt \
        --tokens 4096 --ctx 512 --stride 256
Needs torch, transformers, tokenizers, gguf, safetensors.
"""
import argparse
import json
import math

import gguf
import torch
from safetensors import safe_open
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM


def tokenizer_from_gguf(path):
    r = gguf.GGUFReader(path)
    f = r.fields["tokenizer.ggml.tokens"]
    toks = [bytes(f.parts[i]).decode() for i in f.data]
    f = r.fields["tokenizer.ggml.merges"]
    merges = [tuple(bytes(f.parts[i]).decode().split(" ")) for i in f.data]
    f = r.fields["tokenizer.ggml.token_type"]
    types = [int(f.parts[i][0]) for i in f.data]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(toks)}, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(toks, types) if ty in (3, 4)])
    return tk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("gguf")
    ap.add_argument("data")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    a = ap.parse_args()
    with safe_open(a.bundle, framework="pt") as f:
        cfg = json.loads(f.metadata()["blr.reference.config"])
        sd = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("blr.reference.")}
    c = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    c._attn_implementation = "eager"
    m = LlamaForCausalLM(c).eval()
    m.load_state_dict(sd, strict=False)
    m.tie_weights()
    text = open(a.data, encoding="utf-8").read()
    # No special-token parsing for data: encode with the specials removed from the splitter.
    ids = tokenizer_from_gguf(a.gguf).encode(text, add_special_tokens=False).ids[: a.tokens]
    ids = torch.tensor(ids)
    nll, count, prev_end = 0.0, 0, 0
    begin = 0
    while True:
        end = min(begin + a.ctx, len(ids))
        trg = end - max(prev_end, begin + 1)  # targets not scored yet (never the window's first)
        x = ids[begin:end][None]
        with torch.no_grad():
            logp = torch.log_softmax(m(x).logits[0].double(), dim=-1)
        for p in range(end - trg, end):
            nll -= logp[p - 1 - begin, ids[p]].item()
            count += 1
        prev_end = end
        if begin + a.ctx >= len(ids):
            break
        begin += a.stride
    print(f"tokens {len(ids)} ctx {a.ctx} stride {a.stride}: scored {count}, "
          f"nll {nll / count:.6f}, perplexity {math.exp(nll / count):.4f}")


if __name__ == "__main__":
    main()
