#!/usr/bin/env python3
"""Draws the convergence runs of bench/compress/convergence.sh in one SVG: the training loss of
the progress lines (every 20 steps, thin) and the validation loss (dots, thick) of every policy
whose log is in one of the DIRs (the last DIR that has it; a run still going is drawn as far as it
got).
PLOT_TITLE="..." replaces the title's optimizer (default "AdamW"), e.g. "momentum SGD, lr 0.1".
Usage: python3 bench/compress/plot_curves.py DIR... OUT.svg"""
import re
import os
import sys

COLORS = {"none": "#000000", "bf16": "#1f77b4", "powersgd_4": "#d62728", "topk_0_01": "#2ca02c", "diloco_10": "#9467bd",
          "powersgd_4_warmup_20": "#ff7f0e", "diloco_1_lr_1_momentum_0_compress_topk_0_01": "#17becf",
          "diloco_1_lr_1_momentum_0_compress_powersgd_4": "#e377c2", "diloco_10_lr_1_momentum_0": "#8c564b",
          "diloco_10_lr_1_momentum_0_5": "#bcbd22", "powersgd_64": "#7f7f7f",
          "powersgd_4_warmup_20_freeze_20": "#ff9896", "topk_0_01_warmup_20_freeze_20": "#98df8a",
          "none_freeze_20": "#aaaaaa", "diloco_10_lr_1_momentum_0_5_own_clip": "#dbdb8d",
          "diloco_10_lr_1_momentum_0_6": "#c5b0d5", "diloco_10_lr_1_momentum_0_7": "#6b3fa0",
          "diloco_10_lr_1_momentum_0_4": "#e7cb94",
          "diloco_10_lr_1_momentum_0_8": "#393b79",
          "diloco_1_lr_1_momentum_0_compress_topk_0_01_own_clip": "#9edae5", "topk_0_01_momentum_0_9": "#2ca02c",
          "topk_0_01_momentum_0_9_sparsity_warmup_40": "#98df8a"}
LABELS = {"none": "fp32 all-reduce", "bf16": "bf16", "powersgd_4": "PowerSGD r=4", "topk_0_01": "top-k 1%",
          "diloco_10": "DiLoCo H=10", "powersgd_4_warmup_20": "PowerSGD r=4, warmup 20",
          "diloco_1_lr_1_momentum_0_compress_topk_0_01": "top-k 1% of the update",
          "diloco_1_lr_1_momentum_0_compress_powersgd_4": "PowerSGD r=4 of the update",
          "diloco_10_lr_1_momentum_0": "DiLoCo H=10 averaging", "diloco_10_lr_1_momentum_0_5": "DiLoCo H=10 lr 1 mom 0.5",
          "powersgd_64": "PowerSGD r=64 (check)",
          "powersgd_4_warmup_20_freeze_20": "PowerSGD r=4, v frozen @20", "topk_0_01_warmup_20_freeze_20": "top-k 1%, v frozen @20",
          "none_freeze_20": "fp32, v frozen @20", "diloco_10_lr_1_momentum_0_5_own_clip": "DiLoCo lr 1 mom 0.5, own clip",
          "diloco_10_lr_1_momentum_0_6": "DiLoCo lr 1 mom 0.6, own clip", "diloco_10_lr_1_momentum_0_7": "DiLoCo lr 1 mom 0.7, own clip",
          "diloco_10_lr_1_momentum_0_4": "DiLoCo lr 1 mom 0.4, own clip",
          "diloco_10_lr_1_momentum_0_8": "DiLoCo lr 1 mom 0.8, own clip",
          "diloco_1_lr_1_momentum_0_compress_topk_0_01_own_clip": "top-k of the update, own clip",
          "topk_0_01_momentum_0_9": "top-k 1%, DGC momentum 0.9",
          "topk_0_01_momentum_0_9_sparsity_warmup_40": "top-k 1%, DGC, sparsity warm-up 40"}


def read(path):
    train, val = [], []
    with open(path) as f:
        for line in f:
            m = re.match(r"step\s+(\d+)\s+loss ([0-9.]+)", line)
            if m:
                train.append((int(m.group(1)), float(m.group(2))))
            m = re.match(r"step\s+(\d+)\s+validation loss ([0-9.]+)", line)
            if m:
                val.append((int(m.group(1)), float(m.group(2))))
    return train, val


def main(srcs, out):
    runs = {}
    for name in COLORS:
        found = [os.path.join(d, name + ".log") for d in srcs if os.path.exists(os.path.join(d, name + ".log"))]
        if found:
            runs[name] = read(found[-1])  # the last DIR that has the policy's log
    W, H, L, R, T, B = 900, 480, 60, 300, 30, 40
    smax = 400
    ys = [v for t, va in runs.values() for _, v in t[1:] + va]
    ymin, ymax = min(ys) * 0.97, min(max(ys), 3.2)
    X = lambda s: L + (W - L - R) * s / smax
    Y = lambda v: T + (H - T - B) * (ymax - min(v, ymax)) / (ymax - ymin)
    o = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' font-family='sans-serif' font-size='12'>",
         "<rect width='100%' height='100%' fill='white'/>",
         f"<text x='{L}' y='18'>GPT 6x192 on KJV, dp 4, 400 steps, {os.environ.get('PLOT_TITLE', 'AdamW')}: "
         "train loss every 20 steps (thin), validation (dots)</text>",
         f"<line x1='{L}' y1='{H - B}' x2='{W - R}' y2='{H - B}' stroke='black'/>",
         f"<line x1='{L}' y1='{T}' x2='{L}' y2='{H - B}' stroke='black'/>"]
    for i in range(6):
        v = ymin + (ymax - ymin) * i / 5
        o.append(f"<text x='8' y='{Y(v) + 4:.1f}'>{v:.2f}</text>")
        o.append(f"<line x1='{L}' y1='{Y(v):.1f}' x2='{W - R}' y2='{Y(v):.1f}' stroke='#ddd'/>")
    for s in range(0, smax + 1, 100):
        o.append(f"<text x='{X(s) - 10:.1f}' y='{H - B + 16}'>{s}</text>")
    for k, (name, (train, val)) in enumerate(runs.items()):
        c = COLORS[name]
        pts = " ".join(f"{X(s):.1f},{Y(v):.1f}" for s, v in train[1:])
        o.append(f"<polyline fill='none' stroke='{c}' stroke-width='1' opacity='0.7' points='{pts}'/>")
        o.append(f"<polyline fill='none' stroke='{c}' stroke-width='2.5' points='" +
                 " ".join(f"{X(s):.1f},{Y(v):.1f}" for s, v in val) + "'/>")
        for s, v in val:
            o.append(f"<circle cx='{X(s):.1f}' cy='{Y(v):.1f}' r='3' fill='{c}'/>")
        last = val[-1] if val else (0, float("nan"))
        o.append(f"<text x='{W - R + 10}' y='{T + 20 + 18 * k}' fill='{c}'>{LABELS[name]}: {last[1]:.4f} @{last[0]}</text>")
    o.append("</svg>")
    with open(out, "w") as f:
        f.write("\n".join(o) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:-1], sys.argv[-1])
