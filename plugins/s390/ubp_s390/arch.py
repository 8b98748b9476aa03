"""The s390x ArchOps (z/Architecture, 64-bit, big-endian, Linux)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from capstone import CS_ARCH_SYSZ, CS_MODE_BIG_ENDIAN, Cs

from ubp_core.archops import ArchOps
from ubp_core.errors import DecodeError
from ubp_core.types import (
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

from . import analysis, cases, context, emulate, fixups, refcpus
from . import fields as f

GPRS = tuple(f"r{i}" for i in range(16))
ACRS = tuple(f"acr{i}" for i in range(16))
# s390x Linux system-call numbers (arch/s390/kernel/syscalls/syscall.tbl); mmap (90)
# is old_mmap there: one argument, a pointer to the six values
SYSCALLS = {"exit": 1, "getpid": 20, "mmap": 90, "munmap": 91, "mprotect": 125,
            "gettid": 236, "tgkill": 241, "exit_group": 248}


MMAP_MIN = 0x10000
EXECUTE_TARGET = ("an EXECUTE nearby runs this instruction: a breakpoint here is what "
                  "the EXECUTE would run")


class S390x(ArchOps):
    name = "s390x"
    aliases = ("s390", "z", "zarch", "systemz")
    elf = ElfIdent("EM_S390", 64, "big")
    word_bits = 64
    byteorder = "big"
    # GDB's breakpoint: under ptrace Linux turns its operation exception into SIGTRAP
    # (uprobes' 0x0002 stays SIGILL for a user-space tracer).  The exception
    # suppresses the instruction, so the pc is reported past it.
    breakpoint = b"\x00\x01"
    pc_after_trap = 2
    max_insn_len = 6
    insn_alignment = 2
    xol_slot_size = 16  # 6-byte instruction + 6-byte brcl back, rounded up
    branch_reach = 1 << 32  # brcl: a signed 32-bit count of halfwords
    strategies = frozenset(Strategy)
    registers = ("pswm", "pswa", *GPRS, *ACRS)
    abi = Abi(
        pc="pswa", sp="r15", args=("r2", "r3", "r4", "r5", "r6"), retval="r2",
        return_address="r14", flags="pswm", syscall_insn=b"\x0a\x00", syscall_nr="r1",
        syscall_args=("r2", "r3", "r4", "r5", "r6", "r7"), syscall_ret="r2",
        syscall_numbers=SYSCALLS, mmap_block=True,
    )

    def __init__(self) -> None:
        self._cs = Cs(CS_ARCH_SYSZ, CS_MODE_BIG_ENDIAN)
        self._execute_targets = context.ExecuteTargets()

    # ------------------------------------------------------------------ decoding
    def decode(self, code: bytes, address: int) -> Insn:
        code = bytes(code[:6])
        if len(code) < 2:
            raise DecodeError(f"no s390x instruction at {address:#x}: {code.hex()}")
        if address % 2:
            raise DecodeError(f"{address:#x} is odd: s390x instructions are halfword aligned")
        n = f.insn_length(code[0])
        if len(code) < n:
            raise DecodeError(f"truncated s390x instruction at {address:#x}: {code.hex()}")
        raw = code[:n]
        if raw in analysis.BREAKPOINTS:
            return Insn(address, raw, ".word", f"{raw.hex()} (breakpoint)")
        for addr, size, mnemonic, op_str in self._cs.disasm_lite(raw, address, 1):
            if size != n:  # capstone and the length bits disagree: not a real encoding
                break
            return Insn(addr, raw, mnemonic, op_str)
        raise DecodeError(f"no valid s390x instruction at {address:#x}: {raw.hex()}")

    def decode_all(self, code: bytes, address: int) -> Iterable[Insn]:
        off = 0
        while off + 2 <= len(code):
            try:
                insn = self.decode(code[off:off + 6], address + off)
            except DecodeError:
                return
            yield insn
            off += insn.length

    def analyze(self, insn: Insn) -> Analysis:
        return analysis.analyze(insn)

    def analyze_in_context(self, found: Analysis, read: ReadMemory) -> Analysis:
        if found.refusal is not None:
            return found
        if self._execute_targets.executed_from(found.address, read) is None:
            return found
        return Analysis(found.insn, frozenset(), EXECUTE_TARGET, "execute-target")

    # ------------------------------------------------------------------ strategies
    def prepare_xol(self, analysis: Analysis, slot: int, regs: Regs) -> XolStep:
        return fixups.prepare(analysis, slot, regs)

    def post_xol(self, step: XolStep, regs: Regs, read: ReadMemory) -> Effect:
        return fixups.post(step, regs, read)

    def abort_xol(self, step: XolStep, regs: Regs, read: ReadMemory) -> Effect:
        return fixups.abort(step, regs, read)

    def boost(self, analysis: Analysis, slot: int) -> bytes | None:
        return fixups.boost(analysis, slot)

    def emulate(self, analysis: Analysis, regs: Regs, read: ReadMemory) -> Effect | None:
        return emulate.emulate(analysis, regs, read)

    # ------------------------------------------------------------------ reference CPUs
    def unicorn_spec(self) -> UnicornSpec | None:
        spec = getattr(self, "_unicorn_spec", None)
        if spec is None:
            spec = self._unicorn_spec = refcpus.unicorn_spec(self)
        return spec

    def qemu_spec(self) -> QemuSpec | None:
        return refcpus.qemu_spec(self)

    def hardware_hazard(self, analysis: Analysis) -> str | None:
        return cases.hazard(analysis)

    def canonical_address(self, address: int) -> bool:
        # what every reference CPU can give a program: Linux keeps the first 64 KiB
        # unmapped (mmap_min_addr), and qemu-user maps the guest into the 47-bit user
        # space of its x86-64 host (s390x Linux itself goes up to 2**53)
        return MMAP_MIN <= address < 1 << 47

    # ------------------------------------------------------------------ conformance
    def conformance_cases(self) -> Sequence[tuple[bytes, str]]:
        return cases.CASES

    def random_encoding(self, rng: random.Random) -> bytes:
        return cases.random_encoding(rng)

    def prepare_case(self, analysis: Analysis, regs: Regs,
                     rng: random.Random) -> Sequence[tuple[int, bytes] | Placement]:
        return cases.prepare(analysis, regs, rng)
