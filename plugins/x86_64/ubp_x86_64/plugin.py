"""pluggy registration: found through the ``ubp`` entry-point group, like any plugin."""

from __future__ import annotations

from ubp_core.hookspecs import hookimpl

from .arch import X86_64


@hookimpl
def ubp_arch_ops() -> list[X86_64]:
    return [X86_64()]
