#!/usr/bin/env python3
"""Re-predicts the layouts of the 07:35 quiet validation (docs/planner/validation_2026-12-05_0735.md)
with the current planner, on cluster files standing in for that run's calibrations (docs/planner.md,
"Session 7"): each world size's 07:35 peak and element-wise rate on the committed curve, the MPI core
counts printed then, the threads core counts backed out of the 07:35 dp-only predictions; plus a
block overhead (us per pass, ns per token) and the MPI waiting shares at 2 and 4 processes given on
the command line. Prints each row against the 07:35 measured time. No timing runs.

Usage: bench/plan/repredict_0735.py [BUILD_DIR] PASS_US TOKEN_NS W2 W4
  e.g. bench/plan/repredict_0735.py build-plan4 600 1170 0.02 0.03
"""
import os, sys, tempfile
if len(sys.argv) == 6:
    build = sys.argv.pop(1)
else:
    build = "build-plan4"
tmp = tempfile.mkdtemp()
import json, subprocess, re
spec = ["--layers", "6", "--hidden", "192", "--heads", "6", "--vocab", "256", "--seq", "128", "--batch", "32", "--tessera-block"]
def cluster(base, peak, ew, cores, w, n, ov, tag):
    j = json.load(open(base)); j["peak_tflops"] = peak/1000; j["memory_bandwidth_gbps"] = ew
    if cores: j["cores_per_node"] = cores; j["cores_per_node_at_ranks"] = [[n, cores]]
    if w is not None: j["waiting_core_share"] = w
    j["block_overhead"] = {"per_pass_us": ov[0], "per_token_ns": ov[1]}
    p = f"{tmp}/cl_{tag}.json"; json.dump(j, open(p, "w")); return p
def pred(cl, dp, tp, pp, m, zero=0, v=1, sched=None):
    cmd = [f"{build}/tools/tessera-plan", "plan", "--fp32", "--cluster", cl] + spec + ["--dp", str(dp), "--tp", str(tp), "--pp", str(pp), "--mbs", str(32//(dp*m)), "--zero", str(zero), "--v", str(v)] + (["--schedule", sched] if sched else [])
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(re.search(r"time +([\d.]+) s", r.stdout)[1])
# (backend, n, layout(dp,tp,pp,m,zero,v,sched), old predicted, measured, peak, ew, cores, w_old)
T="plan/clusters/this_machine_threads.json"; M="plan/clusters/this_machine_mpi.json"
rows = [
 (T,1,(1,1,1,1),0.790,0.872,128.0,7.96,None,None),
 (T,1,(1,1,1,16),0.757,0.840,128.0,7.96,None,None),
 (T,2,(2,1,1,1),0.425,0.440,129.3,8.08,None,None),
 (T,2,(1,2,1,1),0.444,0.471,129.3,8.08,None,None),
 (T,2,(1,1,2,2),0.569,0.622,129.3,8.08,None,None),
 (T,2,(1,1,2,4,0,3,"interleaved"),0.413,0.462,129.3,8.08,None,None),
 (T,4,(4,1,1,1),0.397,0.441,131.6,8.22,None,None),
 (T,4,(2,2,1,1),0.409,0.471,131.6,8.22,None,None),
 (T,4,(2,1,2,2),0.387,0.426,131.6,8.22,None,None),
 (T,4,(1,2,2,2),0.404,0.467,131.6,8.22,None,None),
 (T,4,(1,1,4,4),0.382,0.477,131.6,8.22,None,None),
 (T,4,(2,1,2,2,1,3,"interleaved"),0.382,0.431,131.6,8.22,None,None),
 (T,8,(8,1,1,1),0.437,0.480,128.5,7.48,None,None),
 (T,8,(4,2,1,1),0.438,0.488,128.5,7.48,None,None),
 (T,8,(4,1,2,2),0.415,0.447,128.5,7.48,None,None),
 (T,8,(2,2,2,2),0.428,0.470,128.5,7.48,None,None),
 (T,8,(2,1,4,4),0.404,0.454,128.5,7.48,None,None),
 (T,8,(1,2,4,4),0.422,0.478,128.5,7.48,None,None),
 (T,8,(4,1,2,2,1,3,"interleaved"),0.401,0.454,128.5,7.48,None,None),
 (M,2,(2,1,1,1),0.406,0.459,137.1,7.53,1.91,"w2"),
 (M,2,(1,2,1,1),0.426,0.510,137.1,7.53,1.91,"w2"),
 (M,2,(1,1,2,2),0.602,0.658,137.1,7.53,1.91,"w2"),
 (M,2,(2,1,1,2,1),0.388,0.453,137.1,7.53,1.91,"w2"),
 (M,4,(4,1,1,1),0.455,0.508,127.4,7.79,1.79,"w4"),
 (M,4,(2,2,1,1),0.477,0.489,127.4,7.79,1.79,"w4"),
 (M,4,(2,1,2,2),0.655,0.547,127.4,7.79,1.79,"w4"),
 (M,4,(1,2,2,2),0.700,0.509,127.4,7.79,1.79,"w4"),
 (M,4,(1,1,4,4),0.806,0.579,127.4,7.79,1.79,"w4"),
 (M,4,(4,1,1,2,1),0.431,0.478,127.4,7.79,1.79,"w4"),
]
import sys
ov = (float(sys.argv[1]), float(sys.argv[2])); wnew = {"w2": float(sys.argv[3]), "w4": float(sys.argv[4])}
def mk(base, peak, ew, cores, w, n, ov, tag):
    j = json.load(open(base)); j["peak_tflops"] = peak/1000; j["memory_bandwidth_gbps"] = ew
    j["cores_per_node"] = cores; j["cores_per_node_at_ranks"] = [[n, cores]] if cores else []
    j["waiting_core_share"] = w; j["block_overhead"] = {"per_pass_us": ov[0], "per_token_ns": ov[1]}
    p = f"{tmp}/cl3_{tag}.json"; json.dump(j, open(p, "w")); return p
# threads cores per world from the dp-only row of 07:35: total = U * n / c
cores = {}
for base,n,l,old,meas,peak,ew,c,wk in rows:
    if base == T and l[0] == n and l[3] == 1 and n > 1:
        U = pred(mk(base, peak, ew, 0, 0, n, (0,0), "u"), *l)
        cores[n] = n * U / old
print("threads cores backed out of the 07:35 dp rows:", {k: round(v,3) for k,v in cores.items()})
errs=[]
for base,n,l,old,meas,peak,ew,c,wk in rows:
    if base == T:
        c = cores.get(n, 0); w = 0.0
    else:
        w = wnew[wk]
    new = pred(mk(base, peak, ew, c, w, n, ov, "n"), *l)
    oldsim = pred(mk(base, peak, ew, c, 0.0 if base == T else {"w2":1.0,"w4":0.98}[wk], n, (0,0), "o"), *l)
    e = (new-meas)/meas; errs.append(abs(e))
    print(f"{'mpi' if base==M else 'threads'} {n} {l}: measured {meas:.3f}; 07:35 {old:.3f} ({100*(old-meas)/meas:+.1f}%), its stand-in now {oldsim:.3f}; new {new:.3f} ({100*e:+.1f}%)")
print(f"mean |error| {100*sum(errs)/len(errs):.1f}%, max {100*max(errs):.1f}%, within 15%: {sum(e<=0.15 for e in errs)} of {len(errs)}")
