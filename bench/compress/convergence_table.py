#!/usr/bin/env python3
"""The Markdown table of docs/compression.md from bench/compress/convergence.sh's logs: per policy,
the dp MB sent per step (the whole run's mean from train_gpt's last line "dp sent X MB/step over
N steps", warm-up included; older logs: the mean over the progress lines after step 0), the validation loss every
50 steps, and the difference from the fp32 run at the last step both reached.
Usage: python3 bench/compress/convergence_table.py [DIR...] (default data/compress; a policy's log is
taken from the last DIR that has it)"""
import os
import re
import sys
names=[('none','fp32 all-reduce'),('bf16','bf16'),('powersgd_4','PowerSGD r=4'),('topk_0_01','top-k 1%'),('diloco_10','DiLoCo H=10'),
       ('powersgd_4_warmup_20','PowerSGD r=4, 20 steps uncompressed first'),
       ('diloco_1_lr_1_momentum_0_compress_topk_0_01','top-k 1% of the AdamW update (--sync-every 1)'),
       ('diloco_10_lr_1_momentum_0','DiLoCo H=10, outer lr 1, no momentum (averaging)'),
       ('diloco_10_lr_1_momentum_0_5','DiLoCo H=10, outer lr 1, Nesterov 0.5'),
       ('powersgd_64','PowerSGD r=64 (a check of the code, not a target)'),
       ('powersgd_4_warmup_20_freeze_20','PowerSGD r=4, warmup 20, AdamW v frozen at step 20 (1-bit Adam)'),
       ('topk_0_01_warmup_20_freeze_20','top-k 1%, warmup 20, AdamW v frozen at step 20 (1-bit Adam)'),
       ('none_freeze_20','fp32 all-reduce, AdamW v frozen at step 20 (diagnostic)'),
       ('diloco_10_lr_1_momentum_0_5_own_clip','DiLoCo H=10, outer lr 1, Nesterov 0.5, each replica clipped by its own norm'),
       ('diloco_10_lr_1_momentum_0_4','DiLoCo H=10, outer lr 1, Nesterov 0.4, own-norm clipping'),
       ('diloco_10_lr_1_momentum_0_6','DiLoCo H=10, outer lr 1, Nesterov 0.6, own-norm clipping'),
       ('diloco_10_lr_1_momentum_0_7','DiLoCo H=10, outer lr 1, Nesterov 0.7, own-norm clipping'),
       ('diloco_10_lr_1_momentum_0_8','DiLoCo H=10, outer lr 1, Nesterov 0.8, own-norm clipping'),
       ('diloco_10_lr_1_25_momentum_0_5','DiLoCo H=10, outer lr 1.25, Nesterov 0.5, own-norm clipping'),
       ('diloco_1_lr_1_momentum_0_compress_powersgd_4','PowerSGD r=4 of the AdamW update (--sync-every 1), own-norm clipping'),
       ('diloco_1_lr_1_momentum_0_compress_topk_0_01_own_clip','top-k 1% of the AdamW update (--sync-every 1), own-norm clipping')]
dirs=sys.argv[1:] or ['data/compress']
steps=[50,100,150,200,250,300,350,399]
vals={};mb={};whole={}
for n,_ in names:
    vals[n]={}
    found=[os.path.join(d,n+'.log') for d in dirs if os.path.exists(os.path.join(d,n+'.log'))]
    if not found: continue
    for line in open(found[-1]):
        m=re.match(r"step\s+(\d+)\s+validation loss ([0-9.]+)",line)
        if m: vals[n][int(m.group(1))]=float(m.group(2))
        m=re.search(r"dp ([0-9.e+-]+) MB/step",line)
        if m and not line.startswith("step    0 "): mb.setdefault(n,[]).append(float(m.group(1)))
        m=re.match(r"dp sent ([0-9.e+-]+) MB/step over (\d+) steps",line)
        if m: whole[n]=float(m.group(1))  # the whole run's mean (warm-up included)
out=['| policy | MB sent / step / rank | '+' | '.join(f'val @{s}' for s in steps)+' | vs fp32 at the last common step |','|---|---:|'+'---:|'*len(steps)+'---:|']
for n,label in names:
    v=vals.get(n,{})
    if not v:
        if n in dict(names[:5]): out.append(f'| {label} | not run | '+' | '.join('' for s in steps)+' | |')
        continue
    m=mb.get(n,[]); avg=whole.get(n, sum(m)/len(m) if m else None)
    cells=[f'{v[s]:.4f}' if s in v else '' for s in steps]
    common=[s for s in steps if s in v and s in vals['none']]
    last=common[-1] if common else None
    rel=f'{100*(v[last]-vals["none"][last])/vals["none"][last]:+.2f}% @{last}' if last else ''
    mbs=f'{avg:.3g}' if avg is not None else '-'
    out.append(f'| {label} | {mbs} | '+' | '.join(cells)+f' | {rel} |')
print('\n'.join(out))
