"""ArchOps: everything UBP knows about one instruction set, behind one small interface.

A plugin subclasses :class:`ArchOps` and returns an instance from the
``ubp_arch_ops`` hook (see :mod:`ubp_core.hookspecs`).  The core never names an
architecture; it only calls these methods.  Every method works on bytes, addresses and
register values: no method may touch a process, which is what lets the conformance kit
drive a plugin on a reference CPU.

Hooks on the hit path (``emulate``, ``prepare_xol``, ``post_xol``) are called directly
on this object rather than through pluggy's dispatch: a hit must cost as little as
Python allows, and these calls happen once or twice per hit.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

from .types import (
    Abi,
    Analysis,
    Effect,
    ElfIdent,
    Insn,
    Placement,
    QemuSpec,
    ReadMemory,
    Regs,
    Strategy,
    UnicornSpec,
    XolStep,
)


class ArchOps(ABC):
    """The per-ISA contract.  Class attributes describe the arch; methods are the hooks."""

    #: canonical name, e.g. ``"x86_64"``; used on the command line and in reports
    name: str
    #: other names users type (``"amd64"``)
    aliases: tuple[str, ...] = ()
    #: the ELF files this instance handles (machine, class, byte order)
    elf: ElfIdent
    #: bits in an address / general register
    word_bits: int = 64
    byteorder: str = "little"
    #: the breakpoint instruction, in the target's byte order
    breakpoint: bytes
    #: where the pc points after the breakpoint traps, relative to the breakpoint
    pc_after_trap: int = 0
    #: longest instruction, in bytes
    max_insn_len: int
    #: every instruction starts at a multiple of this
    insn_alignment: int = 1
    #: size of one XOL slot; must hold the longest instruction plus a jump back
    xol_slot_size: int
    #: how far (bytes, either direction) a boost's jump back can reach; 0: any distance
    branch_reach: int = 0
    #: the strategies this plugin can ever claim (the conformance kit holds it to this)
    strategies: frozenset[Strategy] = frozenset(Strategy)
    #: general registers the reference CPUs randomise and compare, pc included
    registers: tuple[str, ...]
    #: the registers handlers and system-call injection need
    abi: Abi

    # ------------------------------------------------------------------ identity
    def handles_elf(self, ident: ElfIdent) -> bool:
        """True when ELF files with this header are this arch's code."""
        return (
            ident.machine == self.elf.machine
            and ident.bits == self.elf.bits
            and ident.byteorder == self.elf.byteorder
        )

    # ------------------------------------------------------------------ decoding
    @abstractmethod
    def decode(self, code: bytes, address: int) -> Insn:
        """Decode the first instruction of ``code`` as if it sat at ``address``.

        Raises :class:`~ubp_core.errors.DecodeError` (and nothing else) when the bytes
        do not start with a valid instruction.
        """

    def decode_all(self, code: bytes, address: int) -> Iterable[Insn]:
        """Decode consecutive instructions; stop silently at the first invalid one.

        The default calls :meth:`decode` repeatedly; plugins override it for speed.
        """
        off = 0
        while off < len(code):
            try:
                insn = self.decode(code[off:off + self.max_insn_len], address + off)
            except Exception:
                return
            yield insn
            off += insn.length

    @abstractmethod
    def analyze(self, insn: Insn) -> Analysis:
        """Decide how ``insn`` may be probed.

        Return an :class:`Analysis` that either refuses (``refusal`` says why, in words a
        user understands) or lists every strategy that runs the instruction correctly,
        with the private ``plan`` the other hooks need.  Must not raise.
        """

    def analyze_in_context(self, analysis: Analysis, read: ReadMemory) -> Analysis:
        """Revise ``analysis`` knowing the code around it (``read`` reads original bytes).

        Some instructions are safe alone but not where they sit: one between a
        load-reserve and its store-conditional must never trap.  The default keeps the
        analysis; ``read`` raises :class:`~ubp_core.errors.MemoryFault` outside the code.
        """
        return analysis

    # ------------------------------------------------------------------ SSOL / inline
    @abstractmethod
    def prepare_xol(self, analysis: Analysis, slot: int, regs: Regs) -> XolStep:
        """Prepare a single-step of the instruction at ``slot``.

        ``regs`` is the thread's register file at the breakpoint (pc already set back to
        the probe address).  Return the bytes for the slot and the registers to write
        before stepping (pc = ``slot`` at least; a scratch register loaded, say).  When
        ``slot`` equals the instruction's own address the step is an inline step.
        """

    @abstractmethod
    def post_xol(self, step: XolStep, regs: Regs, read: ReadMemory) -> Effect:
        """Fix up the thread after the single-step finished.

        ``regs`` is the register file after the step; ``read`` reads target memory.
        Return the changes that make it what executing the instruction in place would
        have produced (pc correction, return address, restoring a scratch register ...).
        """

    @abstractmethod
    def abort_xol(self, step: XolStep, regs: Regs, read: ReadMemory) -> Effect:
        """Undo a step that did not complete (the instruction faulted in the slot).

        Return the changes that make the thread look as if the instruction faulted at
        its original address: pc back to the probe address, scratch registers restored,
        and anything the CPU wrote before faulting that names the slot.
        """

    # ------------------------------------------------------------------ boost
    def boost(self, analysis: Analysis, slot: int) -> bytes | None:
        """Bytes for a boost slot at ``slot``: the instruction then a jump back.

        Return None when this instruction cannot be boosted from that slot (the jump
        back or a pc-relative operand does not reach); the engine then falls back.
        Only called for analyses that list :attr:`Strategy.BOOST`.
        """
        return None

    # ------------------------------------------------------------------ emulation
    def emulate(self, analysis: Analysis, regs: Regs, read: ReadMemory) -> Effect | None:
        """Compute the instruction's effect without executing it.

        Return the register and memory changes, or None when this particular execution
        cannot be emulated faithfully (the memory it needs does not exist, a target
        address would fault): the engine then single-steps the instruction instead, so a
        fault happens for real.  Only called for analyses that list EMULATE.
        """
        return None

    # ------------------------------------------------------------------ ABI helpers
    def return_address(self, regs: Regs, read: ReadMemory) -> int:
        """Return address of a function at its entry breakpoint."""
        if self.abi.return_address:
            return regs[self.abi.return_address]
        raw = read(regs[self.abi.sp], self.word_bits // 8)
        return int.from_bytes(raw, self.byteorder)

    def hijack_return(self, regs: Regs, new: int) -> Effect:
        """At a function's entry: make it return to ``new`` (a return probe's trampoline).

        The default covers the two conventions: the link register named by
        ``abi.return_address``, or a word at the stack pointer (pushed by the call)."""
        if self.abi.return_address:
            return Effect(regs={self.abi.return_address: new})
        raw = new.to_bytes(self.word_bits // 8, self.byteorder)
        return Effect(mem=[(regs[self.abi.sp], raw)])

    def sp_after_return(self, regs: Regs) -> int:
        """The stack pointer right after the function returns, from its entry registers.

        Return probes match returns to calls with it (and drop the frames a longjmp or an
        exception skipped).  Default: the call's pushed word is popped, or nothing is."""
        sp = regs[self.abi.sp]
        return sp if self.abi.return_address else sp + self.word_bits // 8

    def return_value(self, regs: Regs) -> int:
        """A function's (integer) return value at its return."""
        return regs[self.abi.retval]

    # ------------------------------------------------------------------ trap-free probes
    #: bytes a jump from a probe site to a trampoline needs; None: this arch has no
    #: trap-free probes (the core then uses trap probes)
    fast_jump_size: int | None = None

    def branch_targets(self, analysis: Analysis) -> tuple[int, ...] | None:
        """Addresses this instruction may transfer control to (direct branches and
        calls), or None when they are unknown (an indirect jump that may be a jump
        table).  Trap-free probes use it to prove nothing jumps into a patched range."""
        return None

    def counting_trampoline(self, analyses: Sequence[Analysis], tramp: int,
                            counter: int) -> bytes | str:
        """Code placed at ``tramp``: add one to the word at ``counter`` atomically, run
        the instructions of ``analyses`` (consecutive, from the site; together at least
        ``fast_jump_size`` bytes) relocated, then jump to the instruction after them.
        Return a reason string when these instructions cannot be relocated."""
        return f"{self.name} has no trap-free probes"

    def rendezvous_trampoline(self, analyses: Sequence[Analysis], tramp: int, counter: int,
                              mailbox: int, site_id: int, missed: int) -> bytes | str:
        """Like :meth:`counting_trampoline`, but the thread also meets UBP at the mailbox
        (protocol and layout: ubp_core.rendezvous) so a handler runs before the relocated
        instructions: save the registers in ``regs_view`` layout at mailbox+REGS, take
        the PI-futex lock, publish ``site_id``, wake UBP, sleep until ANSWERED or CLOSED,
        load the registers back (on ANSWERED), release the lock.  Where the lock or the
        mailbox cannot be had, add one to the word at ``missed`` and run on.  A reason
        string when this arch or these instructions cannot do it."""
        return f"{self.name} has no trap-free handler probes"

    def rendezvous_regs(self, buffer: Any, offset: int) -> Regs:
        """A register mapping viewing the mailbox's register file at ``offset`` of
        ``buffer`` (writable: a handler's changes go back to the thread)."""
        raise NotImplementedError(f"{self.name} has no trap-free handler probes")

    def jump_patch(self, site: int, tramp: int, length: int) -> bytes | None:
        """``length`` bytes for the site: a jump to ``tramp`` then filler that is never
        executed; None when ``tramp`` is out of the jump's reach."""
        return None

    # ------------------------------------------------------------------ reference CPUs
    def unicorn_spec(self) -> UnicornSpec | None:
        """How to run this arch on unicorn, or None when unicorn cannot."""
        return None

    def qemu_spec(self) -> QemuSpec | None:
        """How to run this arch's programs under qemu-user, or None."""
        return None

    # ------------------------------------------------------------------ conformance
    def conformance_cases(self) -> Sequence[tuple[bytes, str]]:
        """Hand-picked instructions (bytes, note) the kit runs for this arch."""
        return ()

    def random_encoding(self, rng: random.Random) -> bytes:
        """Random bytes likely to start with a valid instruction (for the random corpus)."""
        return rng.randbytes(self.max_insn_len)

    def prepare_case(self, analysis: Analysis, regs: Regs,
                     rng: random.Random) -> Sequence[tuple[int, bytes] | Placement]:
        """Adjust a randomised register file so the case is safe and bounded to run.

        The kit randomises every register; some instructions must not run with random
        inputs on a real CPU (a system call with a random number) or would run for
        ages (a string instruction with a random count).  Adjust ``regs`` in place, and
        return (address, bytes) pairs to place in memory before the run (for instance a
        flags image without the trap flag for an instruction that pops one), or
        :class:`~ubp_core.types.Placement` objects for code the case runs elsewhere
        (the target of an execute-type instruction).
        """
        return ()

    def hardware_hazard(self, analysis: Analysis) -> str | None:
        """Why executing this instruction on real silicon would wreck the scratch
        process the native reference CPU runs it in (None: safe to run)."""
        return None

    def canonical_address(self, address: int) -> bool:
        """True when ``address`` can be mapped by a user program of this arch."""
        return 0 <= address < (1 << self.word_bits)

    # ------------------------------------------------------------------ misc
    def __repr__(self) -> str:
        return f"<ArchOps {self.name}>"
