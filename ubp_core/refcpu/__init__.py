"""Reference CPUs: scratch targets on which instructions run for real.

The conformance kit executes an instruction in place and through the engine on the same
reference CPU and compares.  A reference CPU hands out :class:`ScratchTarget` objects:
ordinary :class:`~ubp_core.target.Target` implementations (the engine runs on them
unchanged) with a few extras a test bench needs -- fixed regions, memory that appears
with deterministic content wherever the instruction touches it, and the vector state.

This module is itself registered as a pluggy plugin by the core, exactly like the arch
plugins: it provides unicorn (any arch with a UnicornSpec) and this machine's own CPU
(through a ptrace-driven scratch process) as reference CPUs.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from ..archops import ArchOps
from ..hookspecs import hookimpl
from ..target import Target
from ..types import Analysis

PAGE = 4096


class ScratchTarget(Target):
    """A single-threaded target with test-bench extras.  ``tid`` is its only thread."""

    tid: int = 1
    #: fill for pages that appear on first touch; set by the kit per case
    filler: Callable[[int], bytes] | None = None
    #: most pages that may appear in one run (a runaway string op stops here)
    lazy_limit: int = 64

    @abstractmethod
    def map_region(self, address: int, size: int, prot: str) -> None:
        """Map a fixed region (``prot`` from "r", "w", "x"); raises TargetError if taken."""

    @abstractmethod
    def _unmap_page(self, page: int) -> None:
        """Remove one page (fixed or lazily mapped) from the target."""

    # fixed regions and lazily mapped pages, kept by the subclasses' map operations
    _regions: dict[int, object]
    _lazy: list[int]

    def unmap_region(self, address: int, size: int) -> None:
        """Remove a region mapped by :meth:`map_region`."""
        for page in range(address & ~(PAGE - 1), address + size, PAGE):
            if self._regions.pop(page, None) is not None:
                self._unmap_page(page)

    def regions(self) -> list[int]:
        return list(self._regions)

    def lazy_pages(self) -> list[int]:
        """Pages that appeared on first touch (mapped read+write, not executable)."""
        return list(self._lazy)

    def drop_lazy_pages(self) -> None:
        """Unmap every lazily mapped page."""
        for page in self._lazy:
            self._unmap_page(page)
        self._lazy.clear()
        self.lazy_at_start = 0

    #: lazily mapped pages present when the current case started
    lazy_at_start: int = 0

    def begin_case(self) -> None:
        """Start counting the page budget; every run of one case shares it, so each run
        of a runaway instruction stops at the same depth."""
        self.lazy_at_start = len(self._lazy)

    def refill_lazy_pages(self) -> None:
        """Start of a run: every lazily mapped page gets its filler content again."""
        assert self.filler is not None
        for page in self._lazy:
            self.write_memory(page, self.filler(page))

    def lazy_budget_left(self) -> bool:
        return len(self._lazy) - self.lazy_at_start < self.lazy_limit

    def get_ext_state(self) -> bytes | None:
        """Vector/FPU state as an opaque comparable blob (None: not supported)."""
        return None

    def set_ext_state(self, state: bytes) -> None:
        """Restore a blob from :meth:`get_ext_state` or :meth:`random_ext_state`."""

    def random_ext_state(self, rng: random.Random) -> bytes | None:
        """A valid randomised vector state, or None when not supported."""
        return None

    def map_xol(self, near: int, size: int, reach: int = 0) -> int:
        from ..errors import TargetError

        raise TargetError("a scratch target has only the XOL areas the kit maps")


class ReferenceCpu(ABC):
    """A source of scratch targets for one arch."""

    name: str
    #: how faithfully it reproduces the real CPU (real silicon 100, qemu 80, unicorn 50)
    fidelity: int

    def __init__(self, arch: ArchOps) -> None:
        self.arch = arch

    @abstractmethod
    def unavailable(self) -> str | None:
        """None when usable here, else why not (shown to the user)."""

    @abstractmethod
    def open(self) -> ScratchTarget:
        """A fresh scratch target."""

    def cannot_run(self, analysis: Analysis) -> str | None:
        """Why this CPU cannot run this instruction faithfully, or None."""
        return None

    def __repr__(self) -> str:
        return f"<ReferenceCpu {self.name} for {self.arch.name}>"


@hookimpl
def ubp_reference_cpus(arch: ArchOps) -> Sequence[ReferenceCpu]:
    from .native import NativeCpu
    from .qemu import QemuCpu
    from .unicorn_cpu import UnicornCpu

    cpus: list[ReferenceCpu] = []
    if NativeCpu.handles(arch):
        cpus.append(NativeCpu(arch))
    if arch.qemu_spec() is not None:
        cpus.append(QemuCpu(arch))
    if arch.unicorn_spec() is not None:
        cpus.append(UnicornCpu(arch))
    return cpus
