"""The x86-64 ArchOps."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from ubp_core.archops import ArchOps
from ubp_core.errors import DecodeError
from ubp_core.ptrace.regs import UserRegs
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

from . import cases, emulate, fastpatch, fixups
from .analysis import GPR64, Analyzer
from .layout import LayoutError, parse

MASK64 = (1 << 64) - 1
# eflags bits a user program may set and the reference CPUs randomise: CF PF AF ZF SF DF OF
USER_FLAGS = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x400 | 0x800
FLAGS_FIXED = 0x202  # reserved bit 1, IF


def _kernel_entry(raw: bytes) -> int | None:
    """getpid's number in the ABI this instruction enters the kernel with, or None."""
    try:
        lay = parse(raw, len(raw))
    except LayoutError:
        return None
    if lay.vex is None and lay.map == 1 and lay.opcode in (0x05, 0x07):
        return 39  # syscall (sysret faults in user mode)
    if lay.vex is None and ((lay.map == 1 and lay.opcode in (0x34, 0x35))
                            or (lay.map == 0 and lay.opcode in (0xCD, 0xCE))):
        return 20  # sysenter, int n: the 32-bit ABI
    return None


def _unicorn_unfaithful(analysis: Analysis) -> str | None:
    if analysis.kind == "privileged":
        return "unicorn runs at privilege level 0: it executes what faults in a program"
    return None


class X86_64(ArchOps):
    name = "x86_64"
    aliases = ("amd64", "x86-64", "x64")
    elf = ElfIdent("EM_X86_64", 64, "little")
    word_bits = 64
    byteorder = "little"
    breakpoint = b"\xcc"
    pc_after_trap = 1
    max_insn_len = 15
    insn_alignment = 1
    xol_slot_size = 32  # 15-byte instruction + 5-byte jmp back, rounded up
    branch_reach = 1 << 31
    strategies = frozenset(Strategy)
    registers = (*GPR64, "rip", "eflags", "fs_base", "gs_base")
    abi = Abi(
        pc="rip", sp="rsp", args=("rdi", "rsi", "rdx", "rcx", "r8", "r9"), retval="rax",
        return_address=None, flags="eflags", syscall_insn=b"\x0f\x05", syscall_nr="rax",
        syscall_args=("rdi", "rsi", "rdx", "r10", "r8", "r9"), syscall_ret="rax",
        syscall_numbers={"mmap": 9, "mprotect": 10, "munmap": 11, "getpid": 39,
                         "gettid": 186, "tgkill": 234, "exit_group": 231,
                         "openat": 257, "close": 3},
    )

    def __init__(self) -> None:
        self._cs = Cs(CS_ARCH_X86, CS_MODE_64)
        self._analyzer = Analyzer()

    # ------------------------------------------------------------------ decoding
    def decode(self, code: bytes, address: int) -> Insn:
        for addr, size, mnemonic, op_str in self._cs.disasm_lite(bytes(code[:15]), address, 1):
            return Insn(addr, bytes(code[:size]), mnemonic, op_str)
        raise DecodeError(f"no valid x86-64 instruction at {address:#x}: {bytes(code[:15]).hex()}")

    def decode_all(self, code: bytes, address: int) -> Iterable[Insn]:
        off = 0
        for addr, size, mnemonic, op_str in self._cs.disasm_lite(code, address):
            yield Insn(addr, code[off:off + size], mnemonic, op_str)
            off += size

    def analyze(self, insn: Insn) -> Analysis:
        return self._analyzer.analyze(insn)

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

    # ------------------------------------------------------------------ trap-free probes
    fast_jump_size = fastpatch.JUMP_SIZE

    def branch_targets(self, analysis: Analysis) -> tuple[int, ...] | None:
        return fastpatch.branch_targets(analysis)

    def counting_trampoline(self, analyses: Sequence[Analysis], tramp: int,
                            counter: int) -> bytes | str:
        return fastpatch.counting_trampoline(analyses, tramp, counter)

    def rendezvous_trampoline(self, analyses: Sequence[Analysis], tramp: int, counter: int,
                              mailbox: int, site_id: int, missed: int) -> bytes | str:
        return fastpatch.rendezvous_trampoline(analyses, tramp, counter, mailbox, site_id,
                                               missed)

    def rendezvous_regs(self, buffer: Any, offset: int) -> Regs:
        return UserRegs.from_buffer(buffer, offset)

    def jump_patch(self, site: int, tramp: int, length: int) -> bytes | None:
        return fastpatch.jump_patch(site, tramp, length)

    # ------------------------------------------------------------------ reference CPUs
    def hardware_hazard(self, analysis: Analysis) -> str | None:
        raw = analysis.insn.raw
        try:
            lay = parse(raw, len(raw))
        except LayoutError:
            return None
        if lay.vex is None and lay.map == 1 and lay.opcode == 0x34:
            return ("sysenter returns a 64-bit process in 32-bit mode to a vDSO address "
                    "that does not exist")
        return None

    def canonical_address(self, address: int) -> bool:
        return 0 < address < (1 << 47)

    def unicorn_spec(self) -> UnicornSpec | None:
        try:
            from unicorn import UC_ARCH_X86, UC_MODE_64, x86_const
        except ImportError:
            return None
        regs = {name: getattr(x86_const, f"UC_X86_REG_{name.upper()}") for name in GPR64}
        regs.update(rip=x86_const.UC_X86_REG_RIP, eflags=x86_const.UC_X86_REG_EFLAGS,
                    fs_base=x86_const.UC_X86_REG_FS_BASE, gs_base=x86_const.UC_X86_REG_GS_BASE)
        import signal

        def on_syscall(uc: object) -> None:
            # what Linux does around a system call: rcx = next rip, r11 = rflags
            rip = uc.reg_read(x86_const.UC_X86_REG_RIP)  # type: ignore[attr-defined]
            flags = uc.reg_read(x86_const.UC_X86_REG_EFLAGS)  # type: ignore[attr-defined]
            nr = uc.reg_read(x86_const.UC_X86_REG_RAX)  # type: ignore[attr-defined]
            uc.reg_write(x86_const.UC_X86_REG_RCX, rip + 2)  # type: ignore[attr-defined]
            uc.reg_write(x86_const.UC_X86_REG_R11, flags)  # type: ignore[attr-defined]
            result = 4242 if nr == 39 else (-38 & MASK64)  # getpid, else ENOSYS
            uc.reg_write(x86_const.UC_X86_REG_RAX, result)  # type: ignore[attr-defined]

        return UnicornSpec(
            arch=UC_ARCH_X86, mode=UC_MODE_64, registers=regs, breakpoint_interrupt=3,
            interrupts={0: signal.SIGFPE, 1: signal.SIGTRAP, 4: signal.SIGSEGV,
                        5: signal.SIGSEGV, 6: signal.SIGILL, 13: signal.SIGSEGV,
                        14: signal.SIGSEGV, 16: signal.SIGFPE, 17: signal.SIGBUS,
                        19: signal.SIGFPE},
            on_syscall=on_syscall, syscall_hook=x86_const.UC_X86_INS_SYSCALL,
            vectors={f"xmm{i}": (getattr(x86_const, f"UC_X86_REG_XMM{i}"), 16)
                     for i in range(16)},
            pc_after_breakpoint=1,
            unfaithful=_unicorn_unfaithful,
        )

    def qemu_spec(self) -> QemuSpec | None:
        return QemuSpec(binary="qemu-x86_64", gdb_arch="i386:x86-64")

    # ------------------------------------------------------------------ conformance
    def conformance_cases(self) -> Sequence[tuple[bytes, str]]:
        return cases.CASES

    def random_encoding(self, rng: random.Random) -> bytes:
        return cases.random_encoding(rng)

    def prepare_case(self, analysis: Analysis, regs: Regs,
                     rng: random.Random) -> Sequence[tuple[int, bytes]]:
        regs["eflags"] = (regs["eflags"] & USER_FLAGS) | FLAGS_FIXED
        for seg in ("fs_base", "gs_base"):
            if not self.canonical_address(regs[seg]):
                regs[seg] &= (1 << 46) - 1
        op = getattr(analysis.plan, "op", "")
        kernel_entry = _kernel_entry(analysis.insn.raw)
        if kernel_entry is not None:
            # never a random system call on a real CPU: getpid, whichever ABI it enters
            regs["rax"] = kernel_entry
        if op in ("rep", "loop") or getattr(analysis.plan, "rep", False):
            regs["rcx"] = rng.randrange(0, 9)
        if op == "popf":
            # a program that pops TF=1 single-steps itself: not what a probe test is about
            image = (rng.getrandbits(16) & USER_FLAGS) | FLAGS_FIXED
            return [(regs["rsp"], image.to_bytes(8, "little"))]
        return ()
