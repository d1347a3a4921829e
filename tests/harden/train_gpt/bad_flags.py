#!/usr/bin/env python3
"""train_gpt's command line under a generated sweep of invalid and boundary values.

Every numeric flag that `train_gpt --help` lists gets values no flag accepts (non-numeric,
empty, overflowing, NaN and infinities, a fraction for an integer, one past each end of the
declared range) and its largest declared value where that cannot fit in memory (model and
batch sizes). Every file flag gets a missing file, a directory, and an unwritable path for
outputs. Each run must end within the time bound with exit code 2 and exactly one line on
stderr naming the flag or value, and must not start training. Usage: bad_flags.py TRAIN_GPT
"""
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
import time

train = os.path.abspath(sys.argv[1])
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

def check(case):
    """One command line: "" when it is refused as it must be, else what went wrong; and its time."""
    flag, value, extra = case
    args = dict(base)
    args.update(extra)
    args[flag] = value
    cmd = [train] + [x for kv in args.items() for x in kv]
    what = f"{flag} {value!r}" + (f" with {extra}" if extra else "")
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=LIMIT, cwd=work)
    except subprocess.TimeoutExpired:
        return f"{what}: still running after {LIMIT} s", LIMIT, what
    dt = time.time() - t0
    err = r.stderr.rstrip("\n").split("\n") if r.stderr.strip() else []
    if r.returncode != 2:
        return f"{what}: exit code {r.returncode}, expected 2; stderr: {r.stderr.strip()[:300]!r}", dt, what
    if len(err) != 1:
        return f"{what}: {len(err)} lines on stderr, expected 1: {r.stderr[:300]!r}", dt, what
    if not err[0].startswith("train_gpt: "):
        return f"{what}: the error does not start with 'train_gpt: ': {err[0][:200]!r}", dt, what
    if re.search(r"^step ", r.stdout, re.M):
        return f"{what}: training started before the error", dt, what
    return "", dt, what


start = time.time()
with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # 2 processes at a time
    results = list(pool.map(check, cases))
failures = [f for f, _, _ in results if f]
slowest = max((dt, what) for _, dt, what in results)
elapsed = time.time() - start
for f in failures:
    print("FAIL:", f)
print(f"{len(cases)} invalid or boundary command lines over {len(numeric)} numeric flags and the file flags, "
      f"{len(cases) - len(failures)} refused with one line and exit code 2, in {elapsed:.1f} s "
      f"(slowest {slowest[0]:.2f} s: {slowest[1]})")
sys.exit(1 if failures else 0)
