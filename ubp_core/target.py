"""Target: what the engine needs from a thing that runs code.

A live process under ptrace, a program under a GDB stub, an emulator: each implements
this interface and nothing above it knows which one it is talking to.  Every operating
system fact lives in a Target; every instruction fact lives in an ArchOps plugin.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from .archops import ArchOps
from .errors import TargetError
from .types import Regs


class StopKind(str, enum.Enum):
    TRAP = "trap"  #: a breakpoint instruction trapped or a single-step completed
    SIGNAL = "signal"  #: any other signal: a fault of the instruction at pc, or async
    EXITED = "exited"  #: the thread (or, for tid == pid, the process) is gone
    EVENT = "event"  #: a process event the engine does not handle (clone, fork, exec)
    TIMEOUT = "timeout"  #: ran past the budget it was given (reference CPUs)

    def __str__(self) -> str:
        return self.value


@dataclass(slots=True)
class Stop:
    """Why a thread stopped.

    ``fault`` is True only for a signal the instruction at pc raised synchronously
    (a bad access, an invalid opcode, a division by zero); such a signal is raised
    again by re-executing the instruction, an asynchronous one is not.
    """

    tid: int
    kind: StopKind
    signo: int = 0
    fault: bool = False
    fault_addr: int | None = None
    status: int | None = None
    event: str | None = None
    data: Any = None
    #: for a fault on a reference CPU: True when that CPU lacks the instruction, False
    #: when the fault is the instruction's own doing, None when it cannot tell
    unsupported: bool | None = None
    #: the target's own record of a signal (ptrace: its siginfo), handed back to the
    #: target when a held signal is delivered later
    siginfo: Any = None


class Target(ABC):
    """Memory, registers and execution control of something running ``arch`` code."""

    arch: ArchOps
    #: True when the register files this target hands out also read and write
    #: registers as attributes (``regs.rip``): the engine's hit path then avoids
    #: the mapping protocol's method calls
    regs_by_attribute: bool = False
    #: True when a memory access costs a request of its own while running code out of
    #: line does not (ptrace: a system call per access): the default policy then boosts
    #: instructions whose emulation would touch memory (measured in bench/hits.py)
    boost_cheaper_than_memory: bool = False

    @abstractmethod
    def read_memory(self, address: int, size: int) -> bytes:
        """Read target memory; raises :class:`~ubp_core.errors.MemoryFault`."""

    @abstractmethod
    def write_memory(self, address: int, data: bytes) -> None:
        """Write target memory, read-only program text included."""

    @abstractmethod
    def get_regs(self, tid: int) -> Regs:
        """The register file of thread ``tid`` (a fresh or refreshed mapping)."""

    @abstractmethod
    def set_regs(self, tid: int, regs: Regs) -> None:
        """Write back a register file obtained from :meth:`get_regs`."""

    @abstractmethod
    def resume(self, tid: int, *, step: bool = False, signal: int = 0) -> None:
        """Let ``tid`` run (or execute one instruction), delivering ``signal`` if non-zero."""

    def set_regs_and_resume(self, tid: int, regs: Regs) -> None:
        """:meth:`set_regs` then :meth:`resume` (a target may do both in one go: the
        hit path of a boosted or emulated probe ends with this)."""
        self.set_regs(tid, regs)
        self.resume(tid)

    @abstractmethod
    def wait(self, timeout: float | None = None) -> Stop:
        """Block until some thread stops; return why."""

    @abstractmethod
    def map_xol(self, near: int, size: int, reach: int = 0) -> int:
        """Map ``size`` bytes of read+execute memory for XOL slots; return its address.

        The area should lie within ``reach`` bytes of ``near`` (0: anywhere); it must be
        writable through :meth:`write_memory` but not by the program itself.
        """

    def set_extra(self, tid: int, values: dict[str, int]) -> None:
        """Write registers outside the general register file (``"fip"``: x87 last
        instruction pointer).  A target whose CPU does not expose a register ignores it;
        one that cannot write an exposed register raises TargetError."""
        raise TargetError(f"this target cannot write {', '.join(values)}")

    def threads(self) -> list[int]:
        """Thread ids currently known."""
        return []

    def stop_others(self, tid: int) -> None:
        """Stop every thread but ``tid`` (inline stepping).  Single-threaded: no-op."""

    def resume_others(self, tid: int) -> None:
        """Undo :meth:`stop_others`."""

    def close(self) -> None:
        """Release the target (kill a scratch process, close a connection)."""

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
