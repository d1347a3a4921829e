#!/usr/bin/env python3
"""PyTorch's speed on the model gpt_device_bench trains, for the side-by-side table of
scripts/gpu_check.sh: GPT-2 (pre-LN blocks, tanh GELU, tied LM head), random tokens, AdamW
(fused), eager mode; fp32 with TF32 off, or bf16 autocast. Prints one line in
gpt_device_bench's format: "pytorch <name> <dtype> tokens/s X step_ms Y mfu Z loss L params N".

    pytorch_gpt.py --layers 12 --d-model 768 --heads 12 --context 1024 --batch 16 --dtype bf16
"""
import argparse
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, context, layers, d, heads):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def main():
    p = argparse.ArgumentParser()
    for k, v in (("layers", 6), ("d-model", 192), ("heads", 6), ("context", 128), ("batch", 32), ("vocab", 256),
                 ("steps", 20), ("warmup", 3)):
        p.add_argument("--" + k, type=int, default=v)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--name", default="gpt")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("SKIP: torch sees no CUDA device")
        return 77
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(1)
    dev = torch.device("cuda")
    model = GPT(a.vocab, a.context, a.layers, a.d_model, a.heads).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    x = torch.randint(0, a.vocab, (a.batch, a.context), device=dev)
    y = torch.randint(0, a.vocab, (a.batch, a.context), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    total = 0.0
    for _ in range(a.steps):
        total += float(step().detach())  # a host sync per step, as the tessera bench's norm read
    torch.cuda.synchronize()
    s = time.perf_counter() - t0
    n = sum(q.numel() for q in model.parameters())
    tokens = a.batch * a.context
    tps = tokens * a.steps / s
    flops = 6 * n + 12 * a.layers * a.d_model * a.context
    print(f"pytorch {a.name} {a.dtype} tokens/s {tps:.0f} step_ms {1e3 * s / a.steps:.3f} "
          f"mfu {tps * flops / (a.peak_tflops * 1e12):.4f} loss {total / a.steps:.4f} params {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
