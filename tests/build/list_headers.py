#!/usr/bin/env python3
"""Lists tessera's public headers, for the header self-containment check (tests/build).

    list_headers.py INCLUDE_DIR GROUP
        prints the headers of GROUP, one per line, as include paths ("tessera/core/error.hpp").
    list_headers.py INCLUDE_DIR --check [--mpi] [--nccl] [--cuda] -- CONFIGURED...
        compares the headers on disk with CONFIGURED (the list Meson saw at configure time);
        exits 1 naming the difference, since Meson globs only when it configures.

Groups: "mpi" holds every header under a folder named mpi/ and any header named mpi.hpp;
"nccl" and "cuda" likewise for nccl and cuda (the device layer's host-side headers; its
.cuh kernel headers need nvcc and are checked by tests/cuda); "core" holds the rest. Headers under a folder named detail/ are
implementation details and are left out (they are checked through the headers that include
them).
"""
from __future__ import annotations

import pathlib
import sys

GROUPS = ("core", "mpi", "nccl", "cuda")


def group_of(rel: pathlib.PurePosixPath) -> str | None:
    folders = rel.parts[:-1]
    if "detail" in folders:
        return None
    for backend in ("mpi", "nccl", "cuda"):
        if backend in folders or rel.name == backend + ".hpp":
            return backend
    return "core"


def headers(include_dir: pathlib.Path, groups) -> list[str]:
    found = []
    for path in sorted((include_dir / "tessera").rglob("*.hpp")):
        rel = pathlib.PurePosixPath(path.relative_to(include_dir).as_posix())
        if group_of(rel) in groups:
            found.append(str(rel))
    return found


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[2] in GROUPS:
        print("\n".join(headers(pathlib.Path(argv[1]), {argv[2]})))
        return 0
    if len(argv) >= 4 and argv[2] == "--check" and "--" in argv:
        sep = argv.index("--")
        flags, configured = argv[3:sep], set(argv[sep + 1:])
        groups = {"core"} | {f[2:] for f in flags if f in ("--mpi", "--nccl", "--cuda")}
        on_disk = set(headers(pathlib.Path(argv[1]), groups))
        added, removed = sorted(on_disk - configured), sorted(configured - on_disk)
        for h in added:
            print(f"new header, not yet checked: {h}")
        for h in removed:
            print(f"header gone since configure: {h}")
        if added or removed:
            print("Meson lists the headers when it configures: run `meson setup --reconfigure "
                  "<builddir>` (or `meson setup --wipe`) and test again.")
            return 1
        print(f"{len(on_disk)} public headers on disk, all in the self-containment check "
              f"(groups: {', '.join(sorted(groups))})")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
