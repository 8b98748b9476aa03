"""The PowerPC ArchOps: one class, three instances (ppc64le, ppc64, ppc32)."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable, Sequence

from capstone import (
    CS_ARCH_PPC,
    CS_MODE_32,
    CS_MODE_64,
    CS_MODE_BIG_ENDIAN,
    CS_MODE_LITTLE_ENDIAN,
    Cs,
)

from ubp_core.archops import ArchOps
from ubp_core.errors import DecodeError, MemoryFault
from ubp_core.types import (
    Abi,
    Analysis,
    Effect,
    ElfIdent,
    Insn,
    QemuSpec,
    ReadMemory,
    Regs,
    Strategy,
    UnicornSpec,
    XolStep,
)

from . import analysis as an
from . import cases, emulate, fixups, prefixed, refcpus
from .encoding import opcode

TRAP_WORD = 0x7FE00008  # tw 31,0,0: the unconditional trap
SC_WORD = 0x44000002
GPRS = tuple(f"r{i}" for i in range(32))
SYSCALLS = {"mmap": 90, "munmap": 91, "mprotect": 125, "getpid": 20, "gettid": 207,
            "tgkill": 250, "exit_group": 234}
CR_SO0 = 0x10000000  # CR0[SO]: the kernel's "system call failed" flag
XER_BITS = 0xE00C007F  # SO OV CA OV32 CA32 and the string byte count


# XO-form arithmetic (primary 31, 9-bit extended opcode) that capstone 5 only knows
# without the overflow-enable (OE) bit
XO_ARITH = {8: "subfc", 10: "addc", 40: "subf", 104: "neg", 136: "subfe", 138: "adde",
            200: "subfze", 202: "addze", 232: "subfme", 234: "addme", 233: "mulld",
            235: "mullw", 266: "add", 393: "divdeu", 395: "divweu", 425: "divde",
            427: "divwe", 457: "divdu", 459: "divwu", 489: "divd", 491: "divw"}


def fallback_name(w: int) -> tuple[str, str] | None:
    """(mnemonic, operands) of valid words capstone 5 does not decode."""
    op = opcode(w)
    if op == 17 and w & 3 == 1 and not w & 0x03FFF01C:
        return "scv", str((w >> 5) & 0x7F)
    if op == 19 and (w >> 1) & 0x3FF == 560 and not w & 0x0000E000:
        return "bctar" + ("l" if w & 1 else ""), f"{(w >> 21) & 31}, {(w >> 16) & 31}"
    if op == 31 and w & 0x400 and (w >> 1) & 0x1FF in XO_ARITH:
        rt_, ra_, rb_ = (w >> 21) & 31, (w >> 16) & 31, (w >> 11) & 31
        return XO_ARITH[(w >> 1) & 0x1FF] + "o" + ("." if w & 1 else ""), f"r{rt_}, r{ra_}, r{rb_}"
    return None


class PowerPC(ArchOps):
    """Shared by the three variants; they differ in word size, byte order and ELF class."""

    max_insn_len = 8  # ISA 3.1 prefixed instructions
    insn_alignment = 4
    xol_slot_size = 16  # 8-byte instruction + 4-byte b back, 16-aligned: never crosses 64
    branch_reach = 1 << 25  # b: signed 26-bit displacement
    pc_after_trap = 0
    strategies = frozenset(Strategy)
    registers = (*GPRS, "pc", "lr", "ctr", "cr", "xer")

    def __init__(self) -> None:
        order = self.byteorder
        self.breakpoint = TRAP_WORD.to_bytes(4, order)
        mode = (CS_MODE_64 if self.word_bits == 64 else CS_MODE_32) | (
            CS_MODE_LITTLE_ENDIAN if order == "little" else CS_MODE_BIG_ENDIAN)
        self._cs = Cs(CS_ARCH_PPC, mode)
        self._mask = (1 << self.word_bits) - 1
        self._analyzer = an.Analyzer(self.word_bits, order)
        self._ctx = emulate.Context(self.word_bits, order)
        self._fmt = "<" if order == "little" else ">"
        self.abi = Abi(
            pc="pc", sp="r1", args=tuple(f"r{i}" for i in range(3, 11)), retval="r3",
            return_address="lr", flags="cr", syscall_insn=SC_WORD.to_bytes(4, order),
            syscall_nr="r0", syscall_args=tuple(f"r{i}" for i in range(3, 9)),
            syscall_ret="r3", syscall_numbers=SYSCALLS, syscall_error=("cr", CR_SO0),
        )

    # ------------------------------------------------------------------ decoding
    def _word(self, code: bytes, off: int = 0) -> int:
        return int.from_bytes(code[off:off + 4], self.byteorder)

    def decode(self, code: bytes, address: int) -> Insn:
        code = bytes(code[:8])
        if len(code) < 4:
            raise DecodeError(f"{len(code)} byte(s) at {address:#x}: PowerPC instructions "
                              "are 4 or 8 bytes")
        w = self._word(code)
        op = opcode(w)
        if op == 1:
            if len(code) < 8:
                raise DecodeError(f"a prefix at {address:#x} without its suffix")
            p = prefixed.decode(w, self._word(code, 4))
            if p is None:
                raise DecodeError(f"invalid prefixed instruction at {address:#x}: {code.hex()}")
            text = p.text()
            mnemonic, _, ops = text.partition(" ")
            return Insn(address, code, mnemonic, ops)
        if op == 0:
            raise DecodeError(f"no PowerPC instruction has primary opcode 0 ({code[:4].hex()} "
                              f"at {address:#x})")
        for addr, size, mnemonic, op_str in self._cs.disasm_lite(code[:4], address, 1):
            return Insn(addr, code[:size], mnemonic, op_str)
        name = fallback_name(w)
        if name is not None:
            return Insn(address, code[:4], *name)
        raise DecodeError(f"no valid PowerPC instruction at {address:#x}: {code[:4].hex()}")

    def decode_all(self, code: bytes, address: int) -> Iterable[Insn]:
        off = 0
        while off + 4 <= len(code):
            try:
                insn = self.decode(code[off:off + 8], address + off)
            except DecodeError:
                return
            yield insn
            off += insn.length

    def analyze(self, insn: Insn) -> Analysis:
        return self._analyzer.analyze(insn)

    def analyze_in_context(self, analysis: Analysis, read: ReadMemory) -> Analysis:
        """Refuse an instruction between a load-reserve and its store-conditional."""
        if analysis.refusal is not None:
            return analysis

        def read_words(address: int, count: int, keep_end: bool = False) -> list[int]:
            # the code may start or end inside the window: trim from the far side
            while count > 0:
                try:
                    raw = read(address, 4 * count)
                except MemoryFault:
                    count -= 1
                    if keep_end:
                        address += 4
                    continue
                return list(struct.unpack(f"{self._fmt}{len(raw) // 4}I", raw))
            return []

        if an.in_atomic_sequence(analysis.address, read_words):
            return Analysis(analysis.insn, frozenset(), an.INSIDE_ATOMIC, "atomic-sequence")
        return analysis

    # ------------------------------------------------------------------ strategies
    def prepare_xol(self, analysis: Analysis, slot: int, regs: Regs) -> XolStep:
        return fixups.prepare(analysis, slot, regs, self._ctx)

    def post_xol(self, step: XolStep, regs: Regs, read: ReadMemory) -> Effect:
        return fixups.post(step, regs, read, self._ctx)

    def abort_xol(self, step: XolStep, regs: Regs, read: ReadMemory) -> Effect:
        return fixups.abort(step, regs, read, self._ctx)

    def boost(self, analysis: Analysis, slot: int) -> bytes | None:
        return fixups.boost(analysis, slot, self._ctx)

    def emulate(self, analysis: Analysis, regs: Regs, read: ReadMemory) -> Effect | None:
        return emulate.emulate(analysis, regs, read, self._ctx)

    # ------------------------------------------------------------------ reference CPUs
    def unicorn_spec(self) -> UnicornSpec | None:
        return refcpus.unicorn_spec(self)

    def qemu_spec(self) -> QemuSpec | None:
        return refcpus.qemu_spec(self)

    # ------------------------------------------------------------------ conformance
    def conformance_cases(self) -> Sequence[tuple[bytes, str]]:
        return cases.cases(self.byteorder, self.word_bits)

    def random_encoding(self, rng: random.Random) -> bytes:
        return cases.random_encoding(rng, self.byteorder)

    #: the top of a program's address space (mmap's lowest address is 64 KiB)
    user_top = 1 << 47

    def canonical_address(self, address: int) -> bool:
        return 0x10000 <= address < self.user_top

    def prepare_case(self, analysis: Analysis, regs: Regs,
                     rng: random.Random) -> Sequence[tuple[int, bytes]]:
        regs["xer"] &= XER_BITS
        regs["cr"] &= 0xFFFFFFFF
        w = self._word(analysis.insn.raw)
        if opcode(w) == 17:
            # never a random system call on a real CPU: getpid
            regs["r0"] = SYSCALLS["getpid"]
        return ()


class PPC64LE(PowerPC):
    name = "ppc64le"
    aliases = ("powerpc64le", "ppc64el")
    elf = ElfIdent("EM_PPC64", 64, "little")
    word_bits = 64
    byteorder = "little"


class PPC64(PowerPC):
    name = "ppc64"
    aliases = ("powerpc64", "ppc64be")
    elf = ElfIdent("EM_PPC64", 64, "big")
    word_bits = 64
    byteorder = "big"


class PPC32(PowerPC):
    name = "ppc32"
    aliases = ("powerpc", "ppc")
    elf = ElfIdent("EM_PPC", 32, "big")
    word_bits = 32
    byteorder = "big"
    user_top = 0xC0000000
