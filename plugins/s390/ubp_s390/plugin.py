"""pluggy registration: found through the ``ubp`` entry-point group, like any plugin."""

from __future__ import annotations

from ubp_core.hookspecs import hookimpl

from .arch import S390x


@hookimpl
def ubp_arch_ops() -> list[S390x]:
    return [S390x()]
