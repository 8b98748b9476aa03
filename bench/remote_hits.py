#!/usr/bin/env python3
"""Per-hit cost of a probe through the GDB remote protocol, per arch and strategy.

    python bench/remote_hits.py [--calls N] [--repeat R] [--arch A]... [--json]

A loop (the C program below, cross-compiled statically for each arch) calls one
function N times under qemu-user and times the loop itself (clock_gettime, wall clock).
µs per hit = (loop time with the probe - loop time without) / N, median of R runs; the
probe is put on the function's entry by ``ubp trace --qemu --count --strategy S site``
(UBP's start-up is outside the timed loop).  What a hit costs here is mostly packets:
a stop reply, then reading and writing registers and resuming (one round trip each),
two stops for ssol and inline, and for inline two text writes, each made possible by
an injected mprotect pair (qemu-user refuses writes to read-only pages).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

LOOP_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

__attribute__((noinline)) long site(long x)
{
    __asm__ volatile("" ::: "memory");
    return x + 1;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000;
    struct timespec a, b;
    long x = 0;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        x = site(x);
    clock_gettime(CLOCK_MONOTONIC, &b);
    long ns = (b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec);
    printf("calls=%ld ns=%ld check=%ld\n", n, ns, x);
    return x == n ? 0 : 1;
}
"""

ARCHES = {
    "ppc64le": ("powerpc64le-linux-gnu-gcc", "qemu-ppc64le"),
    "ppc64": ("powerpc64-linux-gnu-gcc", "qemu-ppc64"),
    "s390x": ("s390x-linux-gnu-gcc", "qemu-s390x"),
}
STRATEGIES = ("emulate", "boost", "ssol", "inline")


def build(arch: str, out_dir: str) -> str | None:
    cc, qemu = ARCHES[arch]
    if shutil.which(cc) is None or shutil.which(qemu) is None:
        return None
    src = os.path.join(out_dir, "loop.c")
    with open(src, "w") as f:
        f.write(LOOP_C)
    exe = os.path.join(out_dir, f"loop.{arch}")
    subprocess.run([cc, "-O2", "-static", "-o", exe, src], check=True)
    return exe


def loop_ns(cmd: list[str]) -> int | None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    m = re.search(r"calls=(\d+) ns=(\d+)", proc.stdout)
    if proc.returncode != 0 or m is None:
        return None
    return int(m.group(2))


def measure(arch: str, exe: str, calls: int, repeat: int) -> dict[str, float | None]:
    qemu = ARCHES[arch][1]
    base = [loop_ns([qemu, exe, str(calls)]) for _ in range(repeat)]
    base_ns = statistics.median(b for b in base if b is not None)
    row: dict[str, float | None] = {"unprobed_us_per_call": base_ns / calls / 1000}
    for strategy in STRATEGIES:
        runs = []
        for _ in range(repeat):
            ns = loop_ns([sys.executable, "-m", "ubp_core.cli", "trace", "--qemu", "--count",
                          "-o", os.devnull, "--strategy", strategy, "site", "--", exe,
                          str(calls)])
            if ns is not None:
                runs.append(ns)
        row[strategy] = (statistics.median(runs) - base_ns) / calls / 1000 if runs else None
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--arch", action="append", choices=list(ARCHES))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch or list(ARCHES):
            exe = build(arch, tmp)
            if exe is None:
                print(f"{arch}: cross compiler or qemu-user missing; skipped", file=sys.stderr)
                continue
            results[arch] = measure(arch, exe, args.calls, args.repeat)
    if args.json:
        print(json.dumps({"calls": args.calls, "repeat": args.repeat, "us_per_hit": results}))
        return 0
    print(f"µs per hit, median of {args.repeat} runs of {args.calls} calls "
          "(unprobed: µs per call under qemu)")
    print(f"{'arch':<8} {'unprobed':>9} " + " ".join(f"{s:>9}" for s in STRATEGIES))
    for arch, row in results.items():
        cells = " ".join(f"{row[s]:9.1f}" if row[s] is not None else f"{'-':>9}"
                         for s in STRATEGIES)
        print(f"{arch:<8} {row['unprobed_us_per_call']:9.3f} {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
