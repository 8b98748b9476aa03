"""Shared by the powerpc tests (no tests here): the three variants, their libcs and compilers."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ubp_core.conformance.kit import select_cpus

VARIANTS = {
    # name -> (libc of that variant, cross compiler)
    "ppc64le": ("/usr/powerpc64le-linux-gnu/lib/libc.so.6", "powerpc64le-linux-gnu-gcc"),
    "ppc64": ("/usr/powerpc64-linux-gnu/lib/libc.so.6", "powerpc64-linux-gnu-gcc"),
    "ppc32": ("/usr/powerpc-linux-gnu/lib/libc.so.6", "powerpc-linux-gnu-gcc"),
}
PROGS = os.path.join(os.path.dirname(__file__), "progs", "powerpc")


def arch_of(plugins, name: str):
    return plugins.arch(name)


def libc_of(name: str) -> str:
    path = VARIANTS[name][0]
    if not os.path.exists(path):
        pytest.skip(f"{path} not installed (Debian libc6-*-cross)")
    return path


def qemu_cpu(plugins, arch):
    for cpu in select_cpus(plugins, arch, ["qemu"]):
        return cpu
    pytest.skip(f"no qemu reference CPU for {arch.name} here (qemu-user and the cross gcc)")


def compile_c(name: str, source: str, out_dir, *flags: str) -> str:
    cc = VARIANTS[name][1]
    if shutil.which(cc) is None:
        pytest.skip(f"{cc} not installed")
    out = os.path.join(str(out_dir), f"{os.path.basename(source)}.{name}")
    subprocess.run([cc, *flags, "-o", out, os.path.join(PROGS, source)], check=True)
    return out
