#!/usr/bin/env python3
"""Per-hit cost of a probe, UBP beside the alternatives, measured side by side.

    python bench/hits.py [--calls N] [--repeat R] [--json] [--only WHAT]

A loop calls one function N times (bench/loop.c); the program times the loop itself.
µs per hit = (loop time with the probe - loop time without) / N, median of R runs.
Two sites: ``push`` (a function starting with push %rbp, which Linux uprobes emulates)
and ``lea`` (one starting with lea, which Linux uprobes must single-step); ``--sites
push,lea,jmp`` adds ``jmp`` (a short jump: emulated, no memory touched).  Every row
runs pinned (tracer and program on CPU 0: taskset -c 0) and unpinned.

Rows: trap-free counting (``--fast``: no stop at all); trap-free with a no-op and with a
counting handler (the thread meets UBP through a futex, ubp_core.rendezvous: no ptrace
stop, the covered instructions run relocated); each UBP strategy with a no-op
and with a counting handler (UBP's own CPU placement off, so the pinned/unpinned
columns show what it is worth), and boost with the default placement (auto); a minimal
Python
ctypes tracer with one stop per hit (boost-like) and with two (step-like); Linux uprobes
through perf (skipped where perf/tracefs are missing); GDB with a silent breakpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SITES = ("push", "lea", "jmp")  # jmp: opt-in (--sites push,lea,jmp)
#: lea cannot be emulated, a relative jmp cannot be boosted (it leaves the slot)
NOT_APPLICABLE = {("emulate", "lea"), ("boost", "jmp")}


def build(out_dir: str) -> str:
    exe = os.path.join(out_dir, "loop")
    subprocess.run(["gcc", "-O1", "-o", exe, os.path.join(HERE, "loop.c")], check=True)
    return exe


def _ns(output: str) -> int:
    for word in output.split():
        if word.startswith("ns="):
            return int(word[3:])
    raise RuntimeError(f"no timing in {output!r}")


def _prefix(pinned: bool) -> list[str]:
    return ["taskset", "-c", "0"] if pinned else []


def run_cmd(argv: list[str], pinned: bool, timeout: float = 600) -> int:
    r = subprocess.run(_prefix(pinned) + argv, capture_output=True, text=True, timeout=timeout)
    text = r.stdout + r.stderr
    return _ns(text)


def measure(kind: str, exe: str, site: str, calls: int, pinned: bool, **kw) -> int | None:
    """Loop time in ns for one configuration (None: the tool is not available)."""
    prog = [exe, site, str(calls)]
    kw["site"] = site
    if kind == "bare":
        return run_cmd(prog, pinned)
    if kind in ("ubp", "minimal"):
        driver = [sys.executable, os.path.join(HERE, "driver.py"), kind,
                  json.dumps(kw), "--", *prog]
        return run_cmd(driver, pinned)
    if kind == "uprobes":
        return _uprobes(exe, site, prog, pinned)
    if kind == "gdb":
        if shutil.which("gdb") is None:
            return None
        with tempfile.NamedTemporaryFile("w", suffix=".gdb", delete=False) as f:
            f.write(f"set pagination off\nbreak site_{site}\ncommands 1\nsilent\ncontinue\n"
                    "end\nrun\nquit\n")
        try:
            return run_cmd(["gdb", "-q", "-nx", "-batch", "-x", f.name, "--args", *prog], pinned)
        finally:
            os.unlink(f.name)
    raise ValueError(kind)


def _uprobes(exe: str, site: str, prog: list[str], pinned: bool) -> int | None:
    if shutil.which("perf") is None:
        return None
    if not os.path.isdir("/sys/kernel/tracing/events"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"],
                       capture_output=True)
    event = f"ubpbench:{site}"
    subprocess.run(["perf", "probe", "-q", "-d", "ubpbench:*"], capture_output=True)
    r = subprocess.run(["perf", "probe", "-q", "-f", "-x", exe, f"{event}=site_{site}"],
                       capture_output=True, text=True)
    if r.returncode:
        return None
    try:
        return run_cmd(["perf", "stat", "-e", event, "--", *prog], pinned)
    finally:
        subprocess.run(["perf", "probe", "-q", "-d", "ubpbench:*"], capture_output=True)


ROWS = [
    # (label, kind, options)
    # what a user gets without choosing (push: boost under ptrace; lea: boost)
    ("ubp default policy, no-op handler", "ubp", {"strategy": None, "handler": "noop"}),
    ("ubp emulate, no-op handler", "ubp", {"strategy": "emulate", "handler": "noop"}),
    ("ubp emulate, counting", "ubp", {"strategy": "emulate", "handler": "count"}),
    ("ubp boost, no-op handler", "ubp", {"strategy": "boost", "handler": "noop"}),
    ("ubp boost, counting", "ubp", {"strategy": "boost", "handler": "count"}),
    ("ubp ssol, no-op handler", "ubp", {"strategy": "ssol", "handler": "noop"}),
    ("ubp ssol, counting", "ubp", {"strategy": "ssol", "handler": "count"}),
    ("ubp inline, no-op handler", "ubp", {"strategy": "inline", "handler": "noop"}),
    ("ubp boost, no-op, --placement auto", "ubp",
     {"strategy": "boost", "handler": "noop", "placement": "auto"}),
    # no stop at all: a jump to a trampoline that counts; 1000x the calls, so the few
    # nanoseconds it adds stand out of the loop's own noise
    ("ubp trap-free counting (--fast)", "ubp",
     {"strategy": None, "handler": "none", "fast": True, "calls_factor": 1000}),
    # no stop either, but the handler runs in UBP: a futex round trip per hit
    ("ubp trap-free, no-op handler", "ubp", {"strategy": None, "handler": "noop",
                                            "fast": True}),
    ("ubp trap-free, counting", "ubp", {"strategy": None, "handler": "count", "fast": True}),
    ("ubp trap-free, no-op, --placement auto", "ubp",
     {"strategy": None, "handler": "noop", "fast": True, "placement": "auto"}),
    ("minimal ctypes loop, 1 stop", "minimal", {"stops": 1}),
    ("minimal ctypes loop, 2 stops", "minimal", {"stops": 2}),
    ("Linux uprobes (perf)", "uprobes", {}),
    ("gdb, silent breakpoint", "gdb", {}),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--only", action="append", help="rows whose label contains this")
    ap.add_argument("--sites", default="push,lea")
    ap.add_argument("--pinning", default="pinned,unpinned")
    args = ap.parse_args(argv)
    rows = [r for r in ROWS if not args.only or any(o in r[0] for o in args.only)]
    tmp = tempfile.mkdtemp(prefix="ubp-bench-")
    exe = build(tmp)
    results = []
    for pinned in [p == "pinned" for p in args.pinning.split(",")]:
        for site in args.sites.split(","):
            bare = statistics.median(measure("bare", exe, site, args.calls, pinned)
                                     for _ in range(args.repeat))
            for label, kind, opts in rows:
                if (kind == "ubp" and (opts["strategy"], site) in NOT_APPLICABLE) \
                        or (opts.get("fast") and site == "jmp"):
                    continue  # a forced strategy the site refuses; a jump too short to patch
                calls, base = args.calls, bare
                if "calls_factor" in opts:
                    opts = dict(opts)
                    calls = args.calls * opts.pop("calls_factor")
                    base = statistics.median(measure("bare", exe, site, calls, pinned)
                                             for _ in range(args.repeat))
                samples = []
                for _ in range(args.repeat):
                    try:
                        ns = measure(kind, exe, site, calls, pinned, **opts)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        print(f"# {label} {site}: {exc}", file=sys.stderr)
                        ns = None
                    if ns is None:
                        break
                    samples.append(ns)
                if not samples:
                    row = {"row": label, "site": site, "pinned": pinned, "us_per_hit": None,
                           "note": "not available here"}
                else:
                    us = (statistics.median(samples) - base) / calls / 1000
                    row = {"row": label, "site": site, "pinned": pinned,
                           "us_per_hit": round(us, 4), "samples_ns": samples,
                           "bare_ns": base, "calls": calls}
                results.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    us = row["us_per_hit"]
                    shown = (f"{us:8.2f}" if us is not None and us >= 0.1 else
                             f"{us:8.4f}" if us is not None else "       -")
                    print(f"{'pinned' if pinned else 'unpinned':<9} {site:<5} {label:<30} "
                          f"{shown} us/hit", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
