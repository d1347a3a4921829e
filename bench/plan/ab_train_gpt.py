#!/usr/bin/env python3
"""Side-by-side step times of train_gpt layouts (issue 15, docs/planner.md "The 06:00 run").

Runs each layout given, in turn, REPEAT times (A B C A B C ...), so that every layout sees the
same mix of other programs' load, and prints each run's median step time (steps 1-5 of 6, as
bench/plan/validate_train_gpt.sh measures) with the load average at its start, then each
layout's median over the runs. Use it to tell whether one layout is really slower than another
on a loaded machine: compare the layouts' ratios, not their seconds.

Usage: bench/plan/ab_train_gpt.py [--build build-plan] [--repeat 2] 'LABEL|ARGS' ...
  ARGS are train_gpt flags for the layout, e.g. 'dp4 m4 ZeRO-1|--dp 4 --pp 2 --microbatches 4 --zero 1';
  'mpi:N ' in front of them runs the layout under mpirun -np N (--backend mpi).
"""
import argparse, os, re, statistics, subprocess

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--build", default="build-plan")
parser.add_argument("--repeat", type=int, default=2)
parser.add_argument("variants", nargs="+")
opt = parser.parse_args()
train = f"{opt.build}/examples/train_gpt"
model = ("--layers 6 --d-model 192 --heads 6 --context 128 --batch 32 --steps 6 --log-every 1 "
         "--val-every 0 --sample-len 0").split()
env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
results = {v: [] for v in opt.variants}


def load():
    return open("/proc/loadavg").read().split()[0]


for r in range(opt.repeat):
    for v in opt.variants:
        label, args = v.split("|", 1)
        args = args.split()
        cmd = [train] + model + args
        if args and args[0].startswith("mpi:"):
            cmd = (["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", args[0][4:], train] + model + args[1:] +
                   ["--backend", "mpi"])
        at = load()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        rates = [float(x) for x in re.findall(r"^step +\d+ +loss \S+ +lr \S+ +(\d+) tokens/s", p.stdout, re.M)]
        if p.returncode or len(rates) < 2:
            raise SystemExit(f"train_gpt failed: {' '.join(cmd)}\n{p.stdout[-1000:]}\n{p.stderr[-1000:]}")
        seconds = 32 * 128 / statistics.median(rates[1:])
        results[v].append(seconds)
        steps = " ".join(f"{32 * 128 / x:.3f}" for x in rates)
        print(f"pass {r}  {label:24s} {seconds:.3f} s/step  (steps {steps}; load {at})", flush=True)
for v, xs in results.items():
    print(f"{v.split('|')[0]:24s} median {statistics.median(xs):.3f} s/step over {len(xs)} runs")
