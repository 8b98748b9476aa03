"""Build the live test programs (C, compiled here with the machine's gcc)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

SRC = os.path.join(os.path.dirname(__file__), "progs", "live")
PROGRAMS = {
    "threads": ["-lpthread"], "forks": [], "signals": ["-lpthread"], "faults": [],
    "dlo": ["-ldl"], "spin": ["-lpthread"], "returns": ["-lpthread"],
}


def build_all(out_dir: str) -> dict[str, str]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    paths = {}
    for name, libs in PROGRAMS.items():
        path = os.path.join(out_dir, name)
        subprocess.run([cc, "-O1", "-g", "-o", path, os.path.join(SRC, f"{name}.c"), *libs],
                       check=True)
        paths[name] = path
    lib = os.path.join(out_dir, "libplugin.so")
    subprocess.run([cc, "-O1", "-shared", "-fPIC", "-o", lib, os.path.join(SRC, "plugin.c")],
                   check=True)
    paths["libplugin"] = lib
    return paths


def ubp(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``ubp ARGS`` run as a user would, output captured."""
    return subprocess.run([sys.executable, "-m", "ubp_core.cli", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)


def bare(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The program alone, for comparison."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
