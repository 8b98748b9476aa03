"""The pluggy hooks through which plugins extend UBP.

Every arch plugin -- the three in this repository exactly like a third party's -- is a
module or object implementing some of these hooks, registered under the entry-point
group ``ubp`` (see :mod:`ubp_core.plugins`).  The per-instruction hooks an arch
implements are the methods of :class:`ubp_core.archops.ArchOps`, documented there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .archops import ArchOps
    from .refcpu import ReferenceCpu

PROJECT = "ubp"
ENTRY_POINT_GROUP = "ubp"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def ubp_arch_ops() -> Sequence[ArchOps]:
    """Return the :class:`ArchOps` instances this plugin provides.

    One instance per (ELF machine, class, byte order) it handles: a PowerPC plugin
    returns one each for ppc64le, ppc64 and ppc32.  Called once per plugin manager.
    """


@hookspec
def ubp_reference_cpus(arch: ArchOps) -> Sequence[ReferenceCpu]:
    """Return reference CPUs able to execute ``arch``'s instructions here.

    A reference CPU makes fresh scratch :class:`~ubp_core.target.Target` objects on
    which the conformance kit executes instructions in place and through the engine.
    Return an empty sequence when this plugin's CPUs cannot run ``arch`` (or are not
    available on this machine).  Results from every plugin are concatenated, ordered
    by each CPU's ``fidelity`` (highest first).
    """
