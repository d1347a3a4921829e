#!/usr/bin/env python3
"""Compiles one source file and checks the outcome.

With no --expect the file must compile. Otherwise compilation must fail with exactly one
error, and the compiler's output must contain every expected text (the static_assert's
sentence, and the instantiation that names the culprit layers).

usage: check.py --source FILE [--expect TEXT]... -- COMPILER ARGS...
"""
import argparse
import re
import subprocess
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", required=True)
    ap.add_argument("--expect", action="append", default=[])
    ap.add_argument("compiler", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = [c for c in a.compiler if c != "--"] + [a.source]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = r.stdout
    if not a.expect:
        if r.returncode != 0:
            print(f"expected {a.source} to compile; it did not:\n{out}")
            return 1
        return 0
    if r.returncode == 0:
        print(f"expected {a.source} to fail to compile; it compiled")
        return 1
    for text in a.expect:
        if text not in out:
            print(f"the compiler's output lacks {text!r}:\n{out}")
            return 1
    errors = [line for line in out.splitlines() if re.search(r"\berror\b:", line)]
    if len(errors) != 1:
        print(f"expected exactly one error, got {len(errors)}:\n{out}")
        return 1
    print(errors[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
