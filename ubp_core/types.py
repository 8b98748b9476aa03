"""Small data types shared by the core, the plugins and the targets.

Plugins receive and return only these (plus bytes, ints and register mappings), so a
plugin never needs to know what kind of target it is working for.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Register file as handed to plugins and handlers: register name -> unsigned value.
Regs = MutableMapping[str, int]
#: ``read(address, size) -> bytes``; raises :class:`ubp_core.errors.MemoryFault`.
ReadMemory = Callable[[int, int], bytes]


class Strategy(str, enum.Enum):
    """How the instruction covered by a breakpoint is executed."""

    EMULATE = "emulate"  #: the tracer computes the effect; one stop per hit
    BOOST = "boost"  #: copy + jump back in an XOL slot; one stop per hit
    SSOL = "ssol"  #: single-step a copy in an XOL slot, then fix up; two stops
    INLINE = "inline"  #: put the original back, step it in place; two stops

    def __str__(self) -> str:
        return self.value


#: Default preference: no single-step where it is proven unnecessary.
POLICY_ORDER: tuple[Strategy, ...] = (Strategy.EMULATE, Strategy.BOOST, Strategy.SSOL)


@dataclass(frozen=True, slots=True)
class Insn:
    """One decoded instruction."""

    address: int
    raw: bytes
    mnemonic: str
    op_str: str

    @property
    def length(self) -> int:
        return len(self.raw)

    @property
    def text(self) -> str:
        return f"{self.mnemonic} {self.op_str}".strip()


@dataclass(frozen=True, slots=True)
class Analysis:
    """A plugin's verdict on one instruction at one address.

    Either ``refusal`` is set (and ``strategies`` is empty) or ``strategies`` holds every
    strategy that executes the instruction correctly.  ``kind`` is a short, stable
    classification used in reports (``"rel-branch"``, ``"rip-relative"``, ...).
    ``plan`` is private to the plugin: what its prepare/post/boost/emulate hooks need.
    ``volatile`` names registers whose value after the instruction is not reproducible
    (a time stamp counter, a hardware random number): the conformance kit does not
    compare them.  ``faults`` is True for instructions whose defined behaviour is to
    raise (ud2): a fault from them is their semantics, not a CPU's inability.
    ``ssol_reach``/``ssol_near`` bound where its single-step slot may be (a pc-relative
    operand that is re-based rather than rewritten must still reach its target).
    """

    insn: Insn
    strategies: frozenset[Strategy]
    refusal: str | None = None
    kind: str = "plain"
    plan: Any = None
    volatile: frozenset[str] = frozenset()
    faults: bool = False
    #: an SSOL slot must lie within ``ssol_reach`` bytes of ``ssol_near`` (the
    #: instruction itself when None); 0: anywhere
    ssol_reach: int = 0
    ssol_near: int | None = None
    #: emulating it reads or writes the program's memory (a stack push, a return
    #: address): one more request to the target per hit, which boosting does not make
    emulation_touches_memory: bool = False

    @property
    def accepted(self) -> bool:
        return self.refusal is None

    @property
    def address(self) -> int:
        return self.insn.address

    def ssol_slot_ok(self, slot: int) -> bool:
        if not self.ssol_reach:
            return True
        near = self.insn.address if self.ssol_near is None else self.ssol_near
        return abs(slot - near) < self.ssol_reach - 4096


@dataclass(slots=True)
class XolStep:
    """Per-step state, created by ``prepare_xol`` and handed to ``post_xol``/``abort_xol``.

    ``code`` is written at ``slot`` before the step; ``regs`` are written to the
    thread (they always include the pc).  ``state`` belongs to the plugin (a saved
    scratch register, for instance).  The engine never reads ``state``.
    """

    analysis: Analysis
    slot: int
    code: bytes
    regs: dict[str, int]
    state: dict[str, Any] = field(default_factory=dict)
    #: post_xol would only move the pc by :attr:`correction` (the common case): the
    #: engine may do that itself.  With ``state`` empty and ``regs`` only the pc, the
    #: step may also be reused for every later step of this instruction in this slot.
    pc_only: bool = False

    @property
    def correction(self) -> int:
        return self.analysis.insn.address - self.slot


@dataclass(slots=True, init=False)
class Effect:
    """Register and memory changes a plugin asks the engine to apply.

    ``step_again`` (post_xol only): the instruction has not finished (an x86 ``rep``
    iteration); step once more in the same slot without running handlers.
    ``extra`` sets registers outside the general register file (the x87 last
    instruction pointer, say) through :meth:`~ubp_core.target.Target.set_extra`.
    """

    regs: dict[str, int]
    mem: list[tuple[int, bytes]]
    step_again: bool
    extra: dict[str, int]

    # written out: made once per emulated hit, and the generated __init__ with its
    # default factories costs 0.6 us, as much as the emulation itself
    def __init__(self, regs: dict[str, int] | None = None,
                 mem: list[tuple[int, bytes]] | None = None, step_again: bool = False,
                 extra: dict[str, int] | None = None) -> None:
        self.regs = {} if regs is None else regs
        self.mem = [] if mem is None else mem
        self.step_again = step_again
        self.extra = {} if extra is None else extra


@dataclass(frozen=True, slots=True)
class ElfIdent:
    """What an ELF header says about the code inside."""

    machine: str  #: pyelftools e_machine string, e.g. ``"EM_X86_64"``
    bits: int  #: 32 or 64 (ELF class)
    byteorder: str  #: ``"little"`` or ``"big"``
    flags: int = 0  #: e_flags (ppc64 ABI version lives here)


@dataclass(frozen=True, slots=True)
class Abi:
    """The registers a handler needs, and how to make a system call (Linux ABI).

    ``return_address`` names the link register on arches that have one; None means
    the return address is on the stack at ``sp`` on function entry.
    ``syscall_numbers`` gives at least ``mmap``, ``munmap``, ``mprotect`` and
    ``getpid`` for this arch's Linux ABI.
    """

    pc: str
    sp: str
    args: tuple[str, ...]
    retval: str
    return_address: str | None
    flags: str | None
    syscall_insn: bytes
    syscall_nr: str
    syscall_args: tuple[str, ...]
    syscall_ret: str
    syscall_numbers: Mapping[str, int]
    #: mmap is the old one-argument-block call on some ABIs; None when it is direct
    mmap_name: str = "mmap"
    #: (register, bit) the kernel sets when a system call fails, leaving a positive
    #: errno in ``syscall_ret``; None: failures return -errno
    syscall_error: tuple[str, int] | None = None
    #: mmap takes one argument: the address of a block holding its six (s390's
    #: old_mmap, the only mmap of s390x Linux)
    mmap_block: bool = False


@dataclass(frozen=True, slots=True)
class UnicornSpec:
    """How to run this arch on unicorn (a reference CPU).

    ``registers`` maps every register name of the plugin's register file to unicorn's
    constant.  ``interrupts`` maps an interrupt number to the Linux signal it raises;
    ``breakpoint_interrupt`` is the one the breakpoint instruction raises.
    ``setup`` (optional) is called with the fresh ``Uc`` (to enable an FPU, say);
    ``on_syscall`` (optional) completes a system-call instruction the way the kernel
    would for the register state (unicorn does not model the kernel).
    """

    arch: int
    mode: int
    registers: Mapping[str, int]
    breakpoint_interrupt: int
    interrupts: Mapping[int, int]
    setup: Callable[[Any], None] | None = None
    on_syscall: Callable[[Any], None] | None = None
    syscall_hook: int | None = None  #: UC_HOOK_INSN instruction id, or None for intr
    #: vector/extra registers randomised and compared: name -> (unicorn constant, bytes)
    vectors: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    #: says why unicorn cannot run an instruction faithfully (None: it can); such
    #: cases are left to another reference CPU or reported unverified
    unfaithful: Callable[[Any], str | None] | None = None
    #: where unicorn leaves the pc after the breakpoint interrupt, relative to the
    #: breakpoint (the hardware's value is ArchOps.pc_after_trap)
    pc_after_breakpoint: int = 0
    #: the interrupt a system-call instruction raises when it has no UC_HOOK_INSN id
    #: (``syscall_hook``): ``on_syscall`` completes it inside the interrupt hook,
    #: moving the pc past the instruction, and the run goes on
    syscall_interrupt: int | None = None
    #: when one interrupt number stands for several events (every program exception
    #: of s390x is one interrupt), called in the interrupt hook with the ``Uc`` and the
    #: number: the signal the event raises (SIGTRAP: the breakpoint), or None when
    #: unicorn cannot execute the instruction (the case goes to another CPU)
    interrupt_signal: Callable[[Any, int], int | None] | None = None
    #: for an arch whose unicorn raises a CPU exception on unmapped memory instead of
    #: calling the unmapped-memory hooks: called with the ``Uc`` and the pc before each
    #: instruction, the (address, size) ranges it is about to touch, which then appear
    #: the way unmapped memory appears elsewhere
    accesses: Callable[[Any, int], Sequence[tuple[int, int]]] | None = None
    #: True when a code-hook event at ``address`` right after one at ``previous`` is
    #: not a new instruction but the one an execute-type instruction runs (unicorn
    #: reports s390x EXECUTE's target at the EXECUTE's own address): a step goes on
    executes_target: Callable[[Any, int, int], bool] | None = None
    #: unicorn's MMU for this arch checks an instruction fetch as a write: executable
    #: pages are mapped writable too
    exec_needs_write: bool = False


@dataclass(frozen=True, slots=True)
class Placement:
    """Bytes ``ArchOps.prepare_case`` asks to find in memory before a conformance run.

    ``code``: the bytes are instructions the case runs from there (the target of an
    execute-type instruction), so their page is mapped executable, filled like the
    case's own page, and restored before every run.
    """

    address: int
    data: bytes
    code: bool = False


@dataclass(frozen=True, slots=True)
class QemuSpec:
    """How to run this arch's Linux programs under qemu-user with a GDB stub."""

    binary: str  #: e.g. ``"qemu-ppc64le"``
    gdb_arch: str  #: the architecture name in the stub's target description
    sysroot: str | None = None  #: where the arch's libraries live (``-L``)
    #: CPU model (``-cpu``): the newest the plugin's instructions need
    cpu: str | None = None
    #: C cross compiler that builds the reference-CPU harness for this arch
    cc: str | None = None
    #: stub registers outside ArchOps.registers that the reference CPU randomises and
    #: compares (floating point, vector): read and written one by one, so each costs
    ext_registers: tuple[str, ...] = ()
    #: says why this qemu cannot run an instruction faithfully (None: it can)
    unfaithful: Callable[[Any], str | None] | None = None
