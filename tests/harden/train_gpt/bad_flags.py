#!/usr/bin/env python3
"""train_gpt's command line under a generated sweep of invalid and boundary values.

Every numeric flag that `train_gpt --help` lists gets values no flag accepts (non-numeric,
empty, overflowing, NaN and infinities, a fraction for an integer, one past each end of the
declared range) and its largest declared value where that cannot fit in memory (model and
batch sizes). Every file flag gets a missing file, a directory, and an unwritable path for
outputs. Each run must end within the time bound with exit code 2 and exactly one line on
stderr naming the flag or value, and must not start training. Also: --inject-fault's malformed
values, --backend mpi without mpirun, and (with TESSERA_PLAN) tessera-plan's usage errors, each
exit code 2 and one line; and the flags that do nothing at a layout (ZeRO, compression and
--sync-every at dp 1, --schedule zb-h1 at pp 1, --plan auto overriding a flag given) train with
a one-line note (also --outer-lr without --sync-every, --warmup beyond the schedule). Errors name
what is wrong, once, without a source location. A flag given twice takes its last value; a write
error on --log-json / --loss-csv (/dev/full) exits 1 with one line; a checkpoint index.json with a
negative step or an optimizer step beyond its step is refused (exit 2). Usage: bad_flags.py
TRAIN_GPT [TESSERA_PLAN]
"""
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time

train = os.path.abspath(sys.argv[1])
plan = os.path.abspath(sys.argv[2]) if len(sys.argv) > 2 else None
work = tempfile.mkdtemp()
text = os.path.join(work, "text.txt")
with open(text, "w") as f:
    f.write("And God said, Let there be light: and there was light. " * 300)
a_file = os.path.join(work, "plain_file")
with open(a_file, "w") as f:
    f.write("x")
base = {"--data": text, "--layers": "2", "--d-model": "32", "--heads": "4", "--context": "16", "--batch": "8",
        "--steps": "1", "--val-every": "0", "--sample-len": "0", "--dp": "1"}
env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
LIMIT = 30  # seconds per run: an error before the first step takes well under 1 s

# The numeric flags and their declared ranges, from --help ("--dp INT:INT in [1 - 64]").
help_text = subprocess.run([train, "--help"], capture_output=True, text=True, env=env, timeout=LIMIT).stdout
numeric = {}
for m in re.finditer(r"^\s+(--[a-z0-9-]+) (INT|UINT|FLOAT)(?::INT in \[(-?\d+) - (-?\d+)\])?", help_text, re.M):
    numeric[m.group(1)] = (m.group(2), m.group(3), m.group(4))
if len(numeric) < 20:
    sys.exit(f"FAIL: only {len(numeric)} numeric flags parsed from --help")

full = os.environ.get("BAD_FLAGS_FULL") == "1"
cases = []  # (flag, value, extra flags)
for flag, (kind, lo, hi) in sorted(numeric.items()):
    bad = ["abc", "", "0x", "-99999999999999999999", "1e400"]
    if kind in ("INT", "UINT"):
        bad += ["1.5", "99999999999999999999", "-2147483649", "nan", "inf"]
        if kind == "INT":
            bad += ["2147483648"]
        if lo is not None:
            bad += [str(int(lo) - 1), str(int(hi) + 1)]
        if kind == "UINT":
            bad += ["-1"]
    else:
        bad += ["nan", "inf", "-inf", "-1"]
    # CI runs a rotation: the first value, the range's two ends (or the last two values), and
    # two more in turn, so every value is tried on some flags; BAD_FLAGS_FULL=1 runs them all.
    if not full:
        ends = bad[-2:]
        rest = [v for v in bad[1:] if v not in ends]
        k = len(cases)
        bad = [bad[0]] + ends + [rest[k % len(rest)], rest[(k + 1) % len(rest)]]
    cases += [(flag, v, {}) for v in bad]
# The largest declared sizes: none of these fits in memory, so each is refused before training.
for flag in ["--layers", "--d-model", "--batch", "--context"]:
    lo, hi = numeric[flag][1], numeric[flag][2]
    extra = {"--heads": "1"} if flag == "--d-model" else {}
    cases.append((flag, hi, extra))
# Files: missing, a directory where a file is expected, unwritable outputs.
missing = os.path.join(work, "missing")
for flag, extra in [("--data", {}), ("--resume", {}), ("--eval-model", {"--eval-tokens": a_file}),
                    ("--eval-tokens", {"--eval-model": a_file}), ("--cluster", {"--plan": "auto", "--world": "2"})]:
    cases.append((flag, missing, extra))
    cases.append((flag, work if flag != "--resume" else a_file, extra))
for flag in ["--save", "--loss-csv", "--loss-svg", "--log-json"]:
    cases.append((flag, "/proc/tessera_cannot_write", {}))
    cases.append((flag, os.path.join(a_file, "below_a_file"), {}))
for flag in ["--loss-csv", "--loss-svg", "--log-json"]:
    cases.append((flag, work, {}))
cases.append(("--save", work, {}))  # exists, neither empty nor a checkpoint
# The fault-injection flag (not in --help): malformed, or a rank outside dp x tp x pp.
for v in ["throw", "throw@", "throw@1", "throw@1:", "throw@x:0", "throw@-1:0", "throw@1:1", "kill@1:0", "throw@1:0x"]:
    cases.append(("--inject-fault", v, {}))
# A step this run does not train (--steps 1 trains step 0 only), and --generate (trains none).
cases.append(("--inject-fault", "throw@1:0", {"want": "step 1 is not trained (--steps 1"}))
cases.append(("--inject-fault", "throw@0:0", {"--generate": None, "--resume": work, "want": "--generate"}))
cases.append(("--sample-len", "0", {"--generate": None, "--resume": work, "want": "--generate --sample-len 0 samples nothing"}))
# TESSERA_TIMEOUT (the collectives' timeout) that is not a number of seconds from 0.001 to 1e8.
for v in ["abc", "-5", "0", "5x", "1e10", "0.0001"]:  # 1e10 s overflowed the clock's nanoseconds
    cases.append(("env:TESSERA_TIMEOUT", v, {"want": "TESSERA_TIMEOUT='" + v + "'"}))
# An empty value is refused, not taken as the flag left out (an unset variable in a script).
for flag in ["--resume", "--save", "--log-json", "--data", "--compress", "--inject-fault"]:  # (--inject-fault is outside --help)
    cases.append((flag, "", {"want": flag + " was given an empty value"}))
# An output that would overwrite the data file.
cases.append(("--log-json", base["--data"], {"want": "is the --data file"}))
# --verify with what cannot match the serial run (was found out after training).
cases.append(("--verify", None, {"--dp": "2", "--compress": "powersgd:2", "want": "--compress at dp 2 changes the arithmetic"}))
cases.append(("--verify", None, {"--dp": "2", "--sync-every": "2", "want": "--sync-every at dp 2 changes the arithmetic"}))
cases.append(("--verify", None, {"--on-nonfinite": "skip", "want": "drop --on-nonfinite skip"}))
# Two outputs at one path (the JSON log was overwritten by the CSV).
cases.append(("--log-json", "same.out", {"--loss-csv": "same.out", "want": "are the same file"}))
cases.append(("--loss-svg", "./same.out", {"--loss-csv": "same.out", "want": "are the same file"}))
# --cluster without --plan auto was ignored silently.
cases.append(("--cluster", "c.json", {"want": "--cluster c.json is read only by --plan auto"}))
cases.append(("--plan-tolerance", "0.05", {"want": "--plan-tolerance 0.05 is read only by --plan auto"}))
cases.append(("--plan-tolerance", "-0.1", {"--plan": "auto", "--world": "2", "want": "--plan-tolerance"}))
cases.append(("--plan-tolerance", "nan", {"--plan": "auto", "--world": "2",
                                          "want": "--plan-tolerance must be a fraction in [0, 1], got nan"}))
# Compression flag combinations DpCommunication refuses (were refused inside the ranks, exit 1).
cases.append(("--compress", "topk:0.1", {"--dp": "2", "--tp": "2", "want": "need tp 1 and pp 1"}))
cases.append(("--freeze-variance", "5", {"--dp": "2", "--compress": "powersgd:2", "want": "give the compressor warmup=5"}))
# ZeRO-3's per-layer units reduce every micro-batch (ZeRO-2 and whole-stage units once per step):
# the warm-up --freeze-variance needs is counted in micro-batches there only (session 20).
cases.append(("--freeze-variance", "3", {"--dp": "2", "--zero": "3", "--accum": "2", "--compress": "topk:0.01,warmup=3",
                                         "want": "give the compressor warmup=6 or more (its uncompressed reductions, 2 per step in ZeRO-3's per-layer units here"}))
cases.append(("--compress", "topk:0.1,momentum=0.9", {"--dp": "2", "--optimizer": "sgd", "--momentum": "0", "--zero": "3",
                                                     "--accum": "2", "want": "DGC's velocity would decay 2 times per step"}))
# --optimizer sgd: checkpoints and the device path hold AdamW's state; --momentum is SGD's; top-k's
# momentum correction (DGC) replaces SGD's momentum (session 19).
cases.append(("--optimizer", "sgd", {"--save": "ckpt_out", "want": "--save is not available with --optimizer sgd"}))
cases.append(("--optimizer", "sgd", {"--freeze-variance": "2", "want": "--freeze-variance is not available with --optimizer sgd"}))
cases.append(("--momentum", "0.5", {"want": "--momentum 0.5 is SGD's; add --optimizer sgd"}))
cases.append(("--compress", "topk:0.1,momentum=0.9", {"--dp": "2", "--optimizer": "sgd", "want": "--optimizer sgd --momentum 0"}))
cases.append(("--compress", "topk:0.1,momentum=0.9", {"--dp": "2", "want": "(got --optimizer adamw)"}))
cases.append(("--weight-decay", "0.1", {"--dp": "2", "--optimizer": "sgd", "--momentum": "0",
                                        "--compress": "topk:0.1,momentum=0.9", "want": "bypass the momentum correction"}))
cases.append(("--momentum", "0.99999999", {"--optimizer": "sgd", "want": "--momentum 1 must be in [0, 1) (in fp32)"}))
# DGC's sparsity warm-up (session 20): a count >= 0, top-k only.
cases.append(("--compress", "topk:0.1,sparsity_warmup=-3", {"--dp": "2", "want": "sparsity_warmup \"-3\" is not an integer >= 0"}))
cases.append(("--compress", "powersgd:2,sparsity_warmup=3", {"--dp": "2", "want": "option \"sparsity_warmup=3\" is unknown"}))
# An interleaved schedule whose micro-batches the schedule cannot group (was refused only inside
# the ranks, exit 1, after the banner).
cases.append(("--microbatches", "3", {"--pp": "2", "--schedule": "interleaved", "--virtual-stages": "1",
                                      "--batch": "6", "want": "num_microbatches % group = 3 % 2 = 1"}))
# Interleaving at pp 1 (its checkpoint could not be resumed: session 18's review).
cases.append(("--virtual-stages", "2", {"--schedule": "interleaved", "want": "--virtual-stages 2 at pp 1: interleaving"}))
# --backend mpi without mpirun (no launcher variables in this environment).
cases.append(("--backend", "mpi", {}))
for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "MPI_LOCALNRANKS", "SLURM_PROCID"):
    env.pop(var, None)

# tessera-plan's usage errors: ("tessera-plan", argv).
plan_cases = []
if plan:
    for argv in [[], ["plan", "--nosuch"], ["rank", "--world", "abc"], ["rank", "--cluster", "x.json"],
                 ["plan", "--cluster"], ["calibrate", "--ranks", "1"], ["calibrate", "--backend", "nccl"],
                 ["validate"], ["timeline", "--svg"],
                 # sizes past what the planner replays (tp x pp overflowed int: SIGFPE; the batch's
                 # micro-batches filled the memory)
                 ["rank", "--cluster", "x.json", "--model", "x.json", "--world", "536870912", "--batch", "1536"],
                 ["plan", "--cluster", "x.json", "--model", "x.json", "--batch", "2147483647"]]:
        cases.append(("tessera-plan", argv, {}))
    # Each names what is wrong (the unknown name before a missing --cluster; no doubled prefix,
    # no source location).
    cluster = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "plan", "clusters",
                           "this_machine_threads.json")
    one = ["plan", "--cluster", cluster, "--layers", "2", "--hidden", "64", "--heads", "4", "--vocab", "256", "--seq",
           "32", "--dp", "1", "--pp", "1", "--mbs", "1", "--batch", "1"]
    for argv, want in [(["nosuch"], "unknown subcommand 'nosuch'"), (["plan", "--bogus", "1"], "--bogus"),
                       (one + ["--tp", "7"], "tp 7 does not divide the heads 4"), (one + ["--recompute", "maybe"], "maybe"),
                       (one + ["--zero", "4"], "--zero"), (one + ["--tp", "0"], "--tp"),
                       (["rank", "--cluster", cluster, "--world", "2", "--batch", "2", "--top", "-1"], "--top"),
                       # NaN passed CLI11's range and failed after the search with exit 1.
                       (["rank", "--cluster", cluster, "--layers", "2", "--hidden", "64", "--heads", "4", "--vocab",
                         "256", "--seq", "32", "--world", "2", "--batch", "2", "--tolerance", "nan"],
                        "--tolerance must be a fraction in [0, 1], got nan"),
                       (["calibrate", "--min-time", "-1"], "--min-time"),
                       # a model file with model flags beside it (the flags were ignored)
                       (["plan", "--cluster", cluster, "--model", "m.json", "--layers", "4", "--batch", "1"], "excludes"),
                       (["validate", "rows.json", "--max-error", "-1"], "--max-error"),
                       # no model: the sizes were planned as 1 (a 0 s, 0 GiB answer)
                       (["plan", "--cluster", cluster, "--layers", "24", "--batch", "8"], "--hidden, --heads, --vocab, --seq"),
                       (["rank", "--cluster", cluster, "--world", "2", "--batch", "8"], "--layers, --hidden"),
                       # a pipeline of 10^6 stages was allocated before the layers were checked
                       (one[:-6] + ["--pp", "1000000", "--mbs", "1", "--batch", "1"], "2 layers cannot fill 1000000 pipeline stages"),
                       (one[:-6] + ["--pp", "2", "--v", "2", "--schedule", "1f1b", "--mbs", "1", "--batch", "2"],
                        "virtual_stages 2 needs the interleaved schedule"),
                       (one + ["--sp"], "sequence parallelism needs tp > 1"),
                       (["calibrate", "--devices-per-node", "0"], "--devices-per-node"),
                       (["calibrate", "--comm-kib", "-1"], "--comm-kib"),
                       (["calibrate", "--mbs", "0"], "--mbs"),
                       (["calibrate", "--tp", "4"], "--tp 4 does not divide the heads 6"),
                       (["calibrate", "--link-ranks", "3"], "--link-ranks 3 is not one of"),
                       (["calibrate", "--out", "/nonexistent/dir/x.json"], "cannot write --out '/nonexistent/dir/x.json'"),
                       (["validate", "rows.json", "--max-mean-error", "-0.5"], "--max-mean-error")]:
        cases.append(("tessera-plan", argv, {"want": want}))


def check(case):
    """One command line: "" when it is refused as it must be, else what went wrong; and its time."""
    flag, value, extra = case
    extra = dict(extra)
    want = extra.pop("want", None)
    run_env = env
    if flag.startswith("env:"):  # an environment variable's value, with the base command line
        run_env = dict(env, **{flag[4:]: value})
        flag, value = "--steps", base["--steps"]
    if flag == "tessera-plan":
        cmd = [plan] + value
        what = f"tessera-plan {' '.join(value)!r}"
        prefix = "tessera-plan: "
    else:
        args = dict(base)
        args.update(extra)
        args[flag] = value
        cmd = [train] + [x for kv in args.items() for x in kv if x is not None]
        what = f"{flag} {value!r}" + (f" with {extra}" if extra else "")
        prefix = "train_gpt: "
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=LIMIT, cwd=work)
    except subprocess.TimeoutExpired:
        return f"{what}: still running after {LIMIT} s", LIMIT, what
    dt = time.time() - t0
    err = r.stderr.rstrip("\n").split("\n") if r.stderr.strip() else []
    if r.returncode != 2:
        return f"{what}: exit code {r.returncode}, expected 2; stderr: {r.stderr.strip()[:300]!r}", dt, what
    if len(err) != 1:
        return f"{what}: {len(err)} lines on stderr, expected 1: {r.stderr[:300]!r}", dt, what
    if not err[0].startswith(prefix) or err[0].startswith(prefix + prefix.rstrip()):
        return f"{what}: the error does not start with {prefix!r} once: {err[0][:200]!r}", dt, what
    if re.search(r"\[[^\]]*\.[ch]pp:\d+\]", err[0]):
        return f"{what}: a usage error with a source location: {err[0][:200]!r}", dt, what
    if want is not None and want not in err[0]:
        return f"{what}: the error does not name {want!r}: {err[0][:200]!r}", dt, what
    if re.search(r"^step ", r.stdout, re.M):
        return f"{what}: training started before the error", dt, what
    return "", dt, what


start = time.time()
with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # 2 processes at a time
    results = list(pool.map(check, cases))
failures = [f for f, _, _ in results if f]

# Flags that do nothing at the layout given: the run trains (exit 0) and prints one note naming
# the flag on stdout; the plain run prints no note.
notes = [({"--zero": "1"}, "note: --zero/--zero1 at dp 1"), ({"--zero1": None}, "note: --zero/--zero1 at dp 1"),
         ({"--compress": "bf16"}, "note: --compress bf16 at dp 1"), ({"--sync-every": "2"}, "note: --sync-every 2 at dp 1"),
         ({"--schedule": "zb-h1"}, "note: --schedule zb-h1 at pp 1"), ({}, None),
         ({"--bucket-mb": "2"}, "note: --bucket-mb 2 at dp 1"),
         ({"--sequence-parallel": None}, "note: --sequence-parallel at tp 1"),
         ({"--dp": "2", "--compress": "powersgd:1000000"}, "note: --compress powersgd:1000000 compresses no gradient"),
         ({"--steps": "3", "--schedule-steps": "2"}, "note: the learning-rate schedule is 2 steps (--schedule-steps), shorter than --steps 3"),
         ({"--dp": "2", "--sync-every": "5"}, "note: --sync-every 5 is more than --steps 1"),
         ({"--max-consecutive-skips": "3"}, "note: --max-consecutive-skips 3 without --on-nonfinite skip"),
         ({"--optimizer": "sgd", "--momentum": "0", "--compress": "topk:0.1,momentum=0.9"},
          "note: --compress topk:0.1,momentum=0.9 at dp 1: there is no dp gradient reduction to compress, so its momentum"),
         ({"--dp": "2", "--optimizer": "sgd", "--momentum": "0", "--compress": "topk:1,momentum=0.9", "--clip": "0"},
          "note: --compress topk:1,momentum=0.9: at fraction 1 every entry is sent"),
         ({"--dp": "2", "--optimizer": "sgd", "--momentum": "0", "--compress": "topk:0.1,momentum=0.9"},
          "note: --clip 1 with --compress topk:0.1,momentum=0.9 clips the summed sparse velocities"),
         ({"--dp": "2", "--optimizer": "sgd", "--momentum": "0", "--zero": "1"},
          "note: --zero 1 with --optimizer sgd --momentum 0: SGD without momentum keeps no optimizer state"),
         ({"--dp": "2", "--compress": "topk:0.3,sparsity_warmup=10"},
          "note: --compress topk:0.3,sparsity_warmup=10: the sparsity warm-up's stages send 1/4"),
         ({"--dp": "2", "--compress": "topk:0.5"},
          "note: --compress topk:0.5 at dp 2: (index, value) pairs of a fraction of 1/2 or more are as many bytes"),
         ({"--dp": "2", "--zero": "3", "--zero3-unit": "stage", "--compress": "topk:0.3"},
          "note: --compress topk:0.3 at dp 2: (index, value) pairs of a fraction of 1/4 or more are as many bytes as ZeRO-3's"),
         ({"--dp": "2", "--sync-every": "2", "--steps": "3"},
          "note: --sync-every 2 does not divide --steps 3: the last 1 step(s) are not synchronized"),
         ({"--outer-lr": "0.5"}, "note: --outer-lr/--outer-momentum without --sync-every"),
         ({"--warmup": "5"}, "note: --warmup 5 is longer than the 1-step"),
         ({"--zero3-unit": "2"}, "note: --zero3-unit 2 without --zero 3"),
         ({"--dp": "2", "--zero": "3", "--zero3-unit": "9"}, "note: --zero3-unit 9 is at least the model's 4 layers"),
         ({"--dp": "2", "--zero": "3", "--compress": "topk:0.1"}, "note: --compress topk:0.1 with ZeRO-3 per-layer units"),
         # (and no "compresses no gradient" note: ZeRO-3's released values have no shape)
         ({"--dp": "2", "--zero": "3", "--compress": "powersgd:2"}, "note: --compress powersgd:2 with ZeRO-3 per-layer units"),
         ({"--plan": "auto", "--world": "1", "--dp": "1", "--zero": "2",
           "--cluster": os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "plan", "clusters",
                                     "this_machine_threads.json")},
          "plan auto: note: the plan overrides flags given on the command line: --zero 2 -> ")]
for extra, want in notes:
    args = dict(base)
    args.update(extra)
    cmd = [train] + [x for kv in args.items() for x in kv if x is not None]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=LIMIT, cwd=work)
    got = [l for l in r.stdout.splitlines() if "note:" in l]
    ok = r.returncode == 0 and (got == [] if want is None else len(got) == 1 and got[0].startswith(want if want.startswith("plan") else "train_gpt: " + want))
    if not ok:
        failures.append(f"{extra}: exit {r.returncode}, notes {got}, expected {want!r}; stderr {r.stderr[:200]!r}")
    cases.append(("note", extra, {}))

# A flag given twice takes its last value (scripts/main_job.sh "$@" after its own flags).
r = subprocess.run([train] + [x for kv in base.items() for x in kv] + ["--steps", "2"], capture_output=True, text=True,
                   env=env, timeout=LIMIT, cwd=work)
if r.returncode != 0 or "trained steps 0..1 " not in r.stdout:
    failures.append(f"--steps 1 ... --steps 2: exit {r.returncode}, expected steps 0..1; {r.stdout[-200:]!r} {r.stderr[:200]!r}")
cases.append(("twice", "--steps", {}))
# Write errors during or after training: --log-json or --loss-csv on a full disk stops the run
# (exit 1, one line naming the file).
for flag in ["--log-json", "--loss-csv"]:
    r = subprocess.run([train] + [x for kv in base.items() for x in kv] + [flag, "/dev/full"], capture_output=True,
                       text=True, env=env, timeout=LIMIT, cwd=work)
    err = r.stderr.strip().splitlines()
    if r.returncode != 1 or len(err) != 1 or f"{flag} /dev/full" not in err[0]:
        failures.append(f"{flag} /dev/full: exit {r.returncode}, stderr {r.stderr[:300]!r}; expected exit 1, one line")
    cases.append((flag, "/dev/full", {}))
# A tampered checkpoint index: a negative step, an optimizer step beyond the step (exit 2, naming it).
ckpt = os.path.join(work, "ckpt")
r = subprocess.run([train] + [x for kv in base.items() for x in kv] + ["--save", ckpt], capture_output=True, text=True,
                   env=env, timeout=LIMIT, cwd=work)
if r.returncode != 0:
    failures.append(f"--save {ckpt}: exit {r.returncode}: {r.stderr[:200]!r}")
else:
    import json
    with open(os.path.join(ckpt, "index.json")) as f:
        index = json.load(f)
    for field, value, name in [("step", -1, "step is -1"), ("optimizer", {"step": 5}, "optimizer.step 5 is beyond its step 1")]:
        bad = dict(index, **{field: value})
        with open(os.path.join(ckpt, "index.json"), "w") as f:
            json.dump(bad, f)
        r = subprocess.run([train] + [x for kv in base.items() for x in kv] + ["--resume", ckpt, "--steps", "3"],
                           capture_output=True, text=True, env=env, timeout=LIMIT, cwd=work)
        err = r.stderr.strip().splitlines()
        if r.returncode != 2 or len(err) != 1 or name not in err[0]:
            failures.append(f"index.json {field} {value}: exit {r.returncode}, stderr {r.stderr[:300]!r}; expected exit 2 "
                            f"naming {name!r}")
        cases.append(("index.json", field, {}))
# tessera-plan's file errors (one line, exit 2 as train_gpt's): each names its file -- a model
# file that is not JSON or lacks a key, a rows file that is not JSON, a cluster file with a key
# of the wrong type (exit 1 before session 9).
if plan:
    files = {"model_bad.json": "{\"layers\": 2,", "model_short.json": "{\"layers\": 2, \"hidden\": 64}",
             "model_half.json": json.dumps({"layers": 2.5, "hidden": 64, "heads": 4, "vocab": 256, "seq": 32}),
             "cluster_half.json": json.dumps(dict(json.load(open(cluster)), devices_per_node=2.5)),
             "model_typo.json": json.dumps({"layers": 2, "hidden": 64, "heads": 4, "vocab": 256, "seq": 32, "kv_head": 2}),
             "model_drop.json": json.dumps({"layers": 2, "hidden": 64, "heads": 4, "vocab": 256, "seq": 32,
                                            "tessera_block": True, "dropout": True}),
             "rows_bad.json": "rows", "cluster_bad.json": json.dumps(dict(json.load(open(cluster)), peak_tflops="fast"))}
    for name, text in files.items():
        with open(os.path.join(work, name), "w") as f:
            f.write(text)
    layout = ["--dp", "1", "--tp", "1", "--pp", "1", "--mbs", "1", "--batch", "1"]
    for argv, name, code in [(["plan", "--cluster", cluster, "--model", "model_bad.json"] + layout, "model_bad.json", 2),
                             (["plan", "--cluster", cluster, "--model", "model_short.json"] + layout, "model_short.json", 2),
                             (["plan", "--cluster", cluster, "--model", "model_half.json"] + layout, "layers must be a whole number", 2),
                             (["plan", "--cluster", cluster, "--model", work] + layout, "cannot read model file", 2),
                             (["plan", "--cluster", cluster, "--model", "model_typo.json"] + layout, "unknown key 'kv_head'", 2),
                             (["plan", "--cluster", cluster, "--model", "model_drop.json"] + layout, "tessera_block has no dropout", 2),
                             (one[:1] + ["--cluster", work] + one[3:], "cannot read '" + work, 2),
                             (one[:1] + ["--cluster", "cluster_half.json"] + one[3:], "devices_per_node must be a whole number", 2),
                             (["validate", "rows_bad.json"], "rows_bad.json", 2),
                             (["validate", work], "cannot read '" + work, 2),
                             (["rank", "--cluster", "cluster_bad.json", "--layers", "2", "--hidden", "64", "--heads", "4",
                               "--vocab", "256", "--seq", "32", "--world", "2", "--batch", "8"], "cluster_bad.json", 2),
                             (one[:1] + ["--cluster", "cluster_bad.json"] + one[3:], "cluster_bad.json", 2)]:
        r = subprocess.run([plan] + argv, capture_output=True, text=True, env=env, timeout=LIMIT, cwd=work)
        err = r.stderr.strip().splitlines()
        if r.returncode != code or len(err) != 1 or name not in err[0] or err[0].count("tessera-plan") != 1:
            failures.append(f"tessera-plan {' '.join(argv)!r}: exit {r.returncode}, stderr {r.stderr[:300]!r}; expected "
                            f"exit {code} and one line naming {name!r}")
        cases.append(("tessera-plan file", name, {}))
    # A schedule at pp 1 plans as 1F1B: said once on stderr, and the plan is printed (exit 0).
    r = subprocess.run([plan, "plan", "--cluster", cluster, "--layers", "2", "--hidden", "64", "--heads", "4", "--vocab",
                        "256", "--seq", "32", "--schedule", "zb-h1"] + layout, capture_output=True, text=True, env=env,
                       timeout=LIMIT, cwd=work)
    if r.returncode != 0 or r.stderr.count("note: --schedule zb-h1 at pp 1") != 1 or "time" not in r.stdout:
        failures.append(f"tessera-plan plan --schedule zb-h1 --pp 1: exit {r.returncode}, stderr {r.stderr[:300]!r}; "
                        f"expected exit 0 and one note")
    cases.append(("tessera-plan note", "--schedule zb-h1 at pp 1", {}))
slowest = max((dt, what) for _, dt, what in results)
elapsed = time.time() - start
for f in failures:
    print("FAIL:", f)
print(f"{len(cases)} invalid or boundary command lines over {len(numeric)} numeric flags, the file flags, "
      f"--inject-fault, --backend mpi{', tessera-plan' if plan else ''} and {len(notes)} note checks, "
      f"{len(cases) - len(failures)} handled right (exit code 2 and one line, or a note), in {elapsed:.1f} s "
      f"(slowest {slowest[0]:.2f} s: {slowest[1]})")
sys.exit(1 if failures else 0)
