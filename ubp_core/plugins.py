"""Plugin discovery: one pluggy manager, fed from the ``ubp`` entry-point group."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import pluggy

from . import hookspecs
from .archops import ArchOps
from .errors import UnknownArchError
from .types import ElfIdent


class PluginSet:
    """The installed plugins and the architectures they provide."""

    def __init__(self, extra: Iterable[object] = (), entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        from . import refcpu  # the core's own reference CPUs register like any plugin

        self.pm.register(refcpu)
        if entry_points:
            self.pm.load_setuptools_entrypoints(hookspecs.ENTRY_POINT_GROUP)
        for plugin in extra:
            self.pm.register(plugin)
        self._archs: list[ArchOps] | None = None

    @property
    def archs(self) -> list[ArchOps]:
        if self._archs is None:
            found: list[ArchOps] = []
            for group in self.pm.hook.ubp_arch_ops():
                for arch in group or ():
                    if not isinstance(arch, ArchOps):
                        raise TypeError(f"ubp_arch_ops returned {arch!r}, not an ArchOps")
                    found.append(arch)
            self._archs = found
        return self._archs

    def arch(self, name: str) -> ArchOps:
        """The arch called ``name`` (or one of its aliases)."""
        want = name.lower()
        for arch in self.archs:
            if want == arch.name.lower() or want in (a.lower() for a in arch.aliases):
                return arch
        known = ", ".join(sorted(a.name for a in self.archs)) or "none installed"
        raise UnknownArchError(f"no plugin for architecture {name!r} (installed: {known})")

    def arch_for_elf(self, ident: ElfIdent, what: str = "this ELF file") -> ArchOps:
        for arch in self.archs:
            if arch.handles_elf(ident):
                return arch
        known = ", ".join(sorted(a.name for a in self.archs)) or "none installed"
        raise UnknownArchError(
            f"no installed plugin handles {what} ({ident.machine}, {ident.bits}-bit, "
            f"{ident.byteorder}-endian); installed: {known}"
        )

    def reference_cpus(self, arch: ArchOps) -> list:
        cpus = [c for group in self.pm.hook.ubp_reference_cpus(arch=arch) for c in group or ()]
        cpus.sort(key=lambda c: -c.fidelity)
        return cpus


@functools.cache
def default_plugins() -> PluginSet:
    """The process-wide plugin set built from installed entry points."""
    return PluginSet()


def get_arch(name: str) -> ArchOps:
    return default_plugins().arch(name)
