"""Shared fixtures: the installed plugins and the reference CPUs available here."""

from __future__ import annotations

import pytest

from ubp_core.conformance.kit import select_cpus
from ubp_core.plugins import default_plugins

LIBC_X86 = "/lib/x86_64-linux-gnu/libc.so.6"


@pytest.fixture(scope="session")
def libc_x86():
    import os

    if not os.path.exists(LIBC_X86):
        pytest.skip(f"{LIBC_X86} not found")
    return LIBC_X86


@pytest.fixture(scope="session")
def plugins():
    return default_plugins()


@pytest.fixture(scope="session")
def x86(plugins):
    return plugins.arch("x86_64")


def cpu_named(plugins, arch, name):
    for cpu in select_cpus(plugins, arch, [name]):
        return cpu
    pytest.skip(f"reference CPU {name} is not available here")


@pytest.fixture(scope="session", params=["native", "unicorn"])
def x86_cpu(request, plugins, x86):
    return cpu_named(plugins, x86, request.param)


@pytest.fixture(scope="session")
def native_cpu(plugins, x86):
    return cpu_named(plugins, x86, "native")
