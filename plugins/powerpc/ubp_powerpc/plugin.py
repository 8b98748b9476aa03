"""pluggy registration: found through the ``ubp`` entry-point group, like any plugin."""

from __future__ import annotations

from ubp_core.hookspecs import hookimpl

from .arch import PPC32, PPC64, PPC64LE, PowerPC


@hookimpl
def ubp_arch_ops() -> list[PowerPC]:
    return [PPC64LE(), PPC64(), PPC32()]
