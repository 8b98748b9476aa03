"""Independent hit counts from the kernel's own uprobes (perf probe + perf stat)."""

from __future__ import annotations

import functools
import operator
import os
import re
import shutil
import subprocess

import pytest


def _tracefs() -> bool:
    if os.path.isdir("/sys/kernel/tracing/events"):
        return True
    if os.geteuid() != 0:
        return False
    subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"],
                   capture_output=True)
    return os.path.isdir("/sys/kernel/tracing/events")


def uprobe_counts(binary: str, functions: list[str], argv: list[str],
                  need_all: bool = True) -> dict[str, int]:
    """Hits of each function's entry during a run of ``argv``, counted by the kernel's
    uprobes (perf stat follows children).  The probe goes at the symbol's address, as
    UBP's does; by name perf would also probe every inlined copy (debug info)."""
    from ubp_core.elfinfo import ElfImage

    with ElfImage(binary) as img:
        where = {}
        for sym in img.symbols:
            where.setdefault(sym.name, sym.address)
    if shutil.which("perf") is None or not _tracefs():
        pytest.skip("perf or tracefs not available")
    group = "ubptest"
    subprocess.run(["perf", "probe", "-q", "-d", f"{group}:*"], capture_output=True)
    events = {}
    try:
        for i, fn in enumerate(functions):
            name = f"{group}:f{i}"
            if fn not in where:
                continue
            r = subprocess.run(["perf", "probe", "-q", "-f", "-x", binary,
                                f"{name}={where[fn]:#x}"], capture_output=True, text=True)
            if r.returncode:
                if need_all:
                    pytest.skip(f"perf probe {fn} failed: {r.stderr.strip()}")
                continue
            events[name] = fn
        if not events:
            pytest.skip("perf could place no probe")
        r = subprocess.run(["perf", "stat", "-x", ",",
                            *functools.reduce(operator.iadd, (["-e", e] for e in events), []), "--", *argv],
                           capture_output=True, text=True, timeout=300)
        counts = {}
        for line in r.stderr.splitlines():
            m = re.match(r"^(\d+),[^,]*,(\S+?),", line)
            if m and m.group(2) in events:
                counts[events[m.group(2)]] = int(m.group(1))
        return counts
    finally:
        for e in events:
            subprocess.run(["perf", "probe", "-q", "-d", e], capture_output=True)
