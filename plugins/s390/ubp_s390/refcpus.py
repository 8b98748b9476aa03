"""How the reference CPUs run s390x code: unicorn (QEMU 5 inside) and qemu-user.

unicorn's s390x needs more help than its other arches, all of it measured here:
- every program exception arrives as interrupt 3 (the breakpoint, a divide by zero, a
  specification exception alike); the program-interruption code is only in the CPU
  state, which is read back through a saved context (its offset found by calibration);
- a program exception in the first instruction of a block at a page start, when the
  page before is unmapped, is reported as an addressing exception (a zero-length block
  makes QEMU look up the previous page); such an exception is classified again by
  running the instruction alone where the page before exists;
- an instruction fetch is checked as a write, so executable pages must be writable;
- unmapped data raises an addressing exception instead of calling the unmapped-memory
  hooks: the pages an instruction touches are mapped before it runs (operands.py);
- EXECUTE re-dispatches its target at the EXECUTE's own address (one more code-hook
  event that is not a new instruction); and it computes a relative target's addresses
  from the EXECUTE, not from the target as the architecture (and qemu 7.2) does;
- chrl/cghrl load a word/doubleword instead of a halfword, and stfle into memory that
  is not there completes without an exception: declared unfaithful (qemu runs them);
- a program exception leaves the pc at the instruction; Linux and qemu-user leave it
  past a suppressed one.  Each CPU is compared with itself, and the engine's out-of-line
  step handles both (the slot address: abort; past it: fix up as completed).
"""

from __future__ import annotations

import ctypes
import functools
import signal
import struct
from typing import TYPE_CHECKING, Any

from ubp_core.types import Analysis, QemuSpec, UnicornSpec

from . import fields as f
from .analysis import EXECUTE
from .operands import Operands

if TYPE_CHECKING:
    from .arch import S390x

# PSW of a 64-bit problem-state program: problem state (bit 15), extended and basic
# addressing mode (bits 31, 32).  DAT stays off: unicorn maps addresses directly.
USER_PSW = (1 << 48) | (1 << 32) | (1 << 31)
CR0_AFP_VX = (1 << 18) | (1 << 17)  # additional FP registers, vector facility
PAGE = 4096

# program-interruption code -> signal, as arch/s390/kernel/traps.c raises them
PGM_SIGNALS = {
    0x01: signal.SIGILL, 0x02: signal.SIGILL, 0x03: signal.SIGILL, 0x04: signal.SIGSEGV,
    0x05: signal.SIGSEGV, 0x06: signal.SIGILL, 0x08: signal.SIGFPE, 0x09: signal.SIGFPE,
    0x0A: signal.SIGFPE, 0x0B: signal.SIGFPE, 0x0C: signal.SIGFPE, 0x0D: signal.SIGFPE,
    0x0E: signal.SIGFPE, 0x0F: signal.SIGFPE, 0x10: signal.SIGSEGV, 0x11: signal.SIGSEGV,
    0x1B: signal.SIGFPE, 0x1D: signal.SIGFPE,
}
PGM_OPERATION, PGM_ADDRESSING, PGM_DATA = 0x01, 0x05, 0x07
EXCP_SVC, EXCP_PGM = 2, 3

SYSCALL_GETPID = 20
ENOSYS = 38


def _uc() -> Any:
    import unicorn
    from unicorn import s390x_const as k

    uc = unicorn.Uc(unicorn.UC_ARCH_S390X, unicorn.UC_MODE_BIG_ENDIAN)
    uc.reg_write(k.UC_S390X_REG_CR0, uc.reg_read(k.UC_S390X_REG_CR0) | CR0_AFP_VX)
    uc.reg_write(k.UC_S390X_REG_PSWM, USER_PSW)
    return uc


def _context_bytes(uc: Any, ctx: Any) -> bytes:
    uc.context_update(ctx)
    return ctypes.string_at(ctx.context, ctx.size)


@functools.cache
def pgm_code_offset() -> int | None:
    """Where the program-interruption code sits in a saved unicorn context.

    Found by running instructions with known exceptions (operation, privileged
    operation, specification, fixed-point divide) and keeping the offset at which the
    saved context holds each code; None when no single offset does.
    """
    import unicorn
    from unicorn import s390x_const as k

    probes = [(b"\x00\x00", 0x01, {}), (bytes.fromhex("b2b20000"), 0x02, {}),
              (bytes.fromhex("b9970012"), 0x06, {}),
              (bytes.fromhex("b9970024"), 0x09, {k.UC_S390X_REG_R4: 0})]
    candidates: set[int] | None = None
    for code, want, regs in probes:
        uc = _uc()
        uc.mem_map(0x10000, 2 * PAGE, unicorn.UC_PROT_ALL)
        uc.mem_write(0x10002, code)
        for reg, value in regs.items():
            uc.reg_write(reg, value)
        blobs: list[bytes] = []
        ctx = uc.context_save()

        def hook(u: Any, intno: int, _data: Any, blobs: list[bytes] = blobs,
                 ctx: Any = ctx) -> None:
            blobs.append(_context_bytes(u, ctx))
            u.emu_stop()

        uc.hook_add(unicorn.UC_HOOK_INTR, hook)
        try:
            uc.emu_start(0x10002, 0x10100)
        except unicorn.UcError:
            return None
        if not blobs:
            return None
        blob = blobs[0]
        found = {o for o in range(0, len(blob) - 3, 4)
                 if struct.unpack_from("=I", blob, o)[0] == want}
        candidates = found if candidates is None else candidates & found
    if not candidates or len(candidates) != 1:
        return None
    return candidates.pop()


class UnicornS390:
    """The callbacks of the s390x UnicornSpec (one per plugin instance)."""

    def __init__(self, arch: S390x) -> None:
        from unicorn import s390x_const as k

        self.arch = arch
        self.k = k
        self.operands = Operands()
        self._ctx: Any = None
        self._offset = pgm_code_offset()

    # ------------------------------------------------------------------ setup
    def setup(self, uc: Any) -> None:
        k = self.k
        uc.reg_write(k.UC_S390X_REG_CR0, uc.reg_read(k.UC_S390X_REG_CR0) | CR0_AFP_VX)
        uc.reg_write(k.UC_S390X_REG_PSWM, USER_PSW)

    def _pc(self, uc: Any) -> int:
        return uc.reg_read(self.k.UC_S390X_REG_PC)

    @staticmethod
    def _read(uc: Any, address: int, size: int) -> bytes | None:
        try:
            return bytes(uc.mem_read(address & f.MASK64, size))
        except Exception:
            return None

    def _insn(self, uc: Any, pc: int) -> bytes | None:
        head = self._read(uc, pc, 2)
        if head is None:
            return None
        n = f.insn_length(head[0])
        return head if n == 2 else self._read(uc, pc, n)

    # ------------------------------------------------------------------ interrupts
    def interrupt_signal(self, uc: Any, intno: int) -> int | None:
        """The signal for an interrupt: SIGTRAP for the breakpoint, None when unicorn
        lacks the instruction (operation exception on a valid encoding)."""
        pc = self._pc(uc)
        raw = self._insn(uc, pc)
        if raw is not None and raw[:2] == self.arch.breakpoint:
            return signal.SIGTRAP
        if intno != EXCP_PGM:
            return signal.SIGILL
        code, ilen = self._pgm_code(uc)
        if code == PGM_ADDRESSING and ilen == 2 and raw is not None and not pc % PAGE \
                and self._read(uc, pc - 1, 1) is None:
            code = self._reclassify(uc, raw)
        if code is None:
            return signal.SIGILL
        if code == PGM_OPERATION and raw is not None and self._valid(raw):
            return None
        if code == PGM_DATA:
            dxc = (uc.reg_read(self.k.UC_S390X_REG_FPC) >> 8) & 0xFF
            return signal.SIGFPE if dxc else signal.SIGILL
        return PGM_SIGNALS.get(code, signal.SIGILL)

    def _valid(self, raw: bytes) -> bool:
        try:
            self.arch.decode(raw, 0x1000)
        except Exception:
            return False
        return True

    def _pgm_code(self, uc: Any) -> tuple[int | None, int]:
        if self._offset is None:
            return None, 0
        if self._ctx is None:
            self._ctx = uc.context_save()
        blob = _context_bytes(uc, self._ctx)
        code, ilen = struct.unpack_from("=II", blob, self._offset)
        return code, ilen

    def _reclassify(self, uc: Any, raw: bytes) -> int | None:
        """Run the instruction alone, with the page before it mapped, on a fresh CPU
        with the same registers: the program exception it raises at translation."""
        import unicorn

        probe = _uc()
        probe.context_restore(uc.context_save())
        probe.mem_map(0x10000, 2 * PAGE, unicorn.UC_PROT_ALL)
        probe.mem_write(0x11000, raw)
        got: list[int | None] = []

        def hook(u: Any, intno: int, _data: Any) -> None:
            got.append(self._pgm_code(u)[0] if intno == EXCP_PGM else None)
            u.emu_stop()

        probe.hook_add(unicorn.UC_HOOK_INTR, hook)
        try:
            probe.emu_start(0x11000, 0x11000 + len(raw))
        except unicorn.UcError:
            return None
        return got[0] if got else None

    # ------------------------------------------------------------------ system calls
    def on_syscall(self, uc: Any) -> None:
        """What Linux does for svc: the result in r2, the pc past the instruction."""
        k = self.k
        pc = self._pc(uc)
        raw = self._insn(uc, pc) or b"\x0a\x00"
        nr = raw[1] if raw[0] == 0x0A and raw[1] else uc.reg_read(k.UC_S390X_REG_R1)
        result = 4242 if nr == SYSCALL_GETPID else -ENOSYS
        uc.reg_write(k.UC_S390X_REG_R2, result & f.MASK64)
        uc.reg_write(k.UC_S390X_REG_PC, pc + f.insn_length(raw[0]))

    # ------------------------------------------------------------------ memory
    def accesses(self, uc: Any, pc: int) -> list[tuple[int, int]]:
        raw = self._insn(uc, pc)
        if raw is None:
            return []
        k = self.k

        def reg(n: int) -> int:
            return uc.reg_read(k.UC_S390X_REG_R0 + n)

        return self.operands.ranges(raw, pc, reg, lambda a, n: self._read(uc, a, n))

    def executes_target(self, uc: Any, previous: int, address: int) -> bool:
        """A code-hook event at an EXECUTE's own address is its target being run."""
        if previous != address:
            return False
        raw = self._insn(uc, address)
        return raw is not None and f.key(raw) in EXECUTE


def unicorn_spec(arch: S390x) -> UnicornSpec | None:
    try:
        from unicorn import UC_ARCH_S390X, UC_MODE_BIG_ENDIAN
        from unicorn import s390x_const as k
    except ImportError:
        return None
    regs = {f"r{i}": k.UC_S390X_REG_R0 + i for i in range(16)}
    regs.update({f"acr{i}": getattr(k, f"UC_S390X_REG_A{i}") for i in range(16)})
    regs.update(pswm=k.UC_S390X_REG_PSWM, pswa=k.UC_S390X_REG_PC)
    # the layout of qemu's stub (QEMU_EXT), so both CPUs start a case from the same
    # state: fpc, f0-f15 (the left halves of v0-v15), then v16-v31 whole
    vectors: dict[str, tuple[int, int]] = {"fpc": (k.UC_S390X_REG_FPC, 4)}
    vectors.update({f"f{i}": (getattr(k, f"UC_S390X_REG_F{i}"), 8) for i in range(16)})
    for i in range(16, 32):
        vectors[f"v{i}"] = (getattr(k, f"UC_S390X_REG_F{i}"), 8)
        vectors[f"v{i}:low"] = (getattr(k, f"UC_S390X_REG_F{i}_HI"), 8)
    cb = UnicornS390(arch)
    return UnicornSpec(
        arch=UC_ARCH_S390X, mode=UC_MODE_BIG_ENDIAN, registers=regs,
        breakpoint_interrupt=EXCP_PGM, interrupts={EXCP_PGM: signal.SIGILL},
        setup=cb.setup, on_syscall=cb.on_syscall, syscall_interrupt=EXCP_SVC,
        vectors=vectors, unfaithful=_unicorn_unfaithful, pc_after_breakpoint=0,
        interrupt_signal=cb.interrupt_signal, accesses=cb.accesses,
        executes_target=cb.executes_target, exec_needs_write=True,
    )


def _unicorn_unfaithful(analysis: Analysis) -> str | None:
    from .cases import execute_target_kind

    if getattr(analysis.plan, "op", None) in ("chrl", "cghrl"):
        return ("unicorn 2.1.4 (QEMU 5) loads a word (chrl) or a doubleword (cghrl) "
                "where the instruction compares with a halfword")
    if analysis.insn.raw[:2] == b"\xb2\xb0":
        return ("unicorn 2.1.4 (QEMU 5) completes stfle whose operand is not mapped: the "
                "facility list is stored nowhere and no exception is raised")
    if analysis.kind == "execute" and execute_target_kind(analysis.insn) == "relative":
        return ("unicorn 2.1.4 (QEMU 5) computes the relative addresses of an executed "
                "instruction from the EXECUTE, not from the target as the architecture "
                "(and qemu 7.2) does")
    return None


# qemu-user's stub names.  v0l-v15l (the right halves of v0-v15) are left out: qemu
# 7.2's stub does not write them back as sent
QEMU_EXT = ("fpc", *(f"f{i}" for i in range(16)), *(f"v{i}" for i in range(16, 32)))


def qemu_spec(arch: S390x) -> QemuSpec:
    return QemuSpec(binary="qemu-s390x", gdb_arch="s390:64-bit", cpu="max",
                    cc="s390x-linux-gnu-gcc", ext_registers=QEMU_EXT,
                    unfaithful=_qemu_unfaithful)


def _qemu_unfaithful(analysis: Analysis) -> str | None:
    raw = analysis.insn.raw
    if analysis.kind in ("larl", "rel-long", "execute") and raw[0] in (0xC0, 0xC4, 0xC6) \
            and abs(2 * f.i32(raw)) >= 1 << 31:
        return ("qemu 7.2 computes a relative-long address 2 GiB or more away in 32 bits "
                "(fixed in qemu 8.0)")
    return None
