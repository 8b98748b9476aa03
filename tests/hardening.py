"""Shared pieces of the hardening campaign (tests/test_hardening_*.py).

The programs in tests/progs/hardening/ are built here with the machine's gcc; every one
counts or records what it does itself, so a test compares the program's own account
with UBP's and with an unprobed run of the same program.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable

import pytest

from ubp_core.elfinfo import ElfImage
from ubp_core.plugins import default_plugins
from ubp_core.procmaps import read_maps
from ubp_core.types import Strategy

SRC = os.path.join(os.path.dirname(__file__), "progs", "hardening")
PROGRAMS = {"hammer": ["-lpthread"], "many": ["-lpthread"], "sigstorm": ["-lpthread", "-lrt"],
            "faulty": [], "jobs": ["-lpthread"]}


def build(out_dir: str, names: Iterable[str] | None = None) -> dict[str, str]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    paths = {}
    for name in names or PROGRAMS:
        path = os.path.join(out_dir, name)
        subprocess.run([cc, "-O1", "-g", "-o", path, os.path.join(SRC, f"{name}.c"),
                        *PROGRAMS[name]], check=True)
        paths[name] = path
    return paths


def ubp(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ubp_core.cli", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)


def bare(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def trace_json(*args: str, **kw) -> tuple[subprocess.CompletedProcess, dict]:
    out = ubp("trace", "--json", *args, **kw)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("{")]
    assert lines, out.stderr
    return out, json.loads(lines[-1])


def instructions(path: str, function: str) -> list[tuple[int, str, frozenset[Strategy]]]:
    """(offset, text, strategies the plugin allows) of every instruction of a function."""
    arch = default_plugins().arch("x86_64")
    with ElfImage(path) as img:
        sym = next(s for s in img.functions() if s.name == function)
        code = img.read(sym.address, sym.size)
    out = []
    for insn in arch.decode_all(code, sym.address):
        an = arch.analyze(insn)
        out.append((insn.address - sym.address, insn.text, frozenset(an.strategies)))
    return out


def sites_for(path: str, functions: Iterable[str], strategy: Strategy) -> list[str]:
    """Probe specs (``func+off``) of every instruction that allows ``strategy``."""
    specs = []
    for fn in functions:
        for off, _text, strategies in instructions(path, fn):
            if strategy in strategies:
                specs.append(f"{fn}+{off:#x}" if off else fn)
    return specs


def writable_executable(pid: int) -> list[str]:
    """Mappings of a process that are both writable and executable."""
    return [f"{m.start:#x}-{m.end:#x} {m.perms} {m.path}" for m in read_maps(pid)
            if "w" in m.perms and "x" in m.perms]


def thread_states(pid: int) -> dict[int, str]:
    """tid -> the state letter of /proc/PID/task/TID/stat (R, S, T, t, Z ...)."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                out[int(t)] = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            pass
    return out


def wait_for(cond, timeout: float = 10.0, every: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return bool(cond())


def tracer_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("TracerPid")).split()[1])
