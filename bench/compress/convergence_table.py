#!/usr/bin/env python3
"""The Markdown table of docs/compression.md from bench/compress/convergence.sh's logs: per policy,
the dp MB sent per step (mean over the progress lines after step 0), the validation loss every
50 steps, and the difference from the fp32 run at the last step both reached.
Usage: python3 bench/compress/convergence_table.py [DIR (default data/compress)]"""
import os
import re
import sys
d = sys.argv[1] if len(sys.argv) > 1 else 'data/compress'
names=[('none','fp32 all-reduce'),('bf16','bf16'),('powersgd_4','PowerSGD r=4'),('topk_0_01','top-k 1%'),('diloco_10','DiLoCo H=10')]
steps=[50,100,150,200,250,300,350,399]
vals={};mb={}
for n,_ in names:
    p=os.path.join(d,n+'.log'); vals[n]={}
    if not os.path.exists(p): continue
    for line in open(p):
        m=re.match(r"step\s+(\d+)\s+validation loss ([0-9.]+)",line)
        if m: vals[n][int(m.group(1))]=float(m.group(2))
        m=re.search(r"dp ([0-9.e+-]+) MB/step",line)
        if m and not line.startswith("step    0 "): mb.setdefault(n,[]).append(float(m.group(1)))
out=['| policy | MB sent / step / rank | '+' | '.join(f'val @{s}' for s in steps)+' | vs fp32 at the last common step |','|---|---:|'+'---:|'*len(steps)+'---:|']
for n,label in names:
    v=vals.get(n,{})
    if not v: out.append(f'| {label} | not run | '+' | '.join('' for s in steps)+' | |'); continue
    m=mb.get(n,[]); avg=sum(m)/len(m) if m else None
    cells=[f'{v[s]:.4f}' if s in v else '' for s in steps]
    common=[s for s in steps if s in v and s in vals['none']]
    last=common[-1] if common else None
    rel=f'{100*(v[last]-vals["none"][last])/vals["none"][last]:+.2f}% @{last}' if last else ''
    mbs=f'{avg:.3g}' if avg is not None else '-'
    out.append(f'| {label} | {mbs} | '+' | '.join(cells)+f' | {rel} |')
print('\n'.join(out))
