"""System-call injection through any Target: borrow a thread, make one call, give it back.

The thread's pc is pointed at a system-call instruction the program already has, the
call number and arguments go into the ABI's registers, one single-step runs it, and
every register is put back.  Works through a GDB stub (qemu-user refuses writes to
read-only text, and has no other way to map memory) as through any other Target.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from ..archops import ArchOps
from ..errors import TargetError
from ..target import StopKind, Target

PROT = {"r": 1, "w": 2, "x": 4}
# Linux's generic mmap flags (the same on every arch UBP targets so far; an ABI that
# differs would carry its own numbers in Abi.syscall_numbers next to the calls)
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20


def prot_bits(prot: str) -> int:
    return sum(PROT[c] for c in prot)


class SyscallInjector:
    """Makes system calls on behalf of thread ``tid`` through the instruction at ``insn``."""

    def __init__(self, target: Target, arch: ArchOps, tid: int, insn: int,
                 scratch: int | Callable[[int], int] | None = None) -> None:
        self.target = target
        self.arch = arch
        self.abi = arch.abi
        self.tid = tid
        self.insn = insn
        #: writable memory of the program for arguments passed in memory (64 bytes),
        #: or a function of the thread that gives it (saved and restored around the call)
        self.scratch = scratch
        self.mask = (1 << arch.word_bits) - 1
        self.pc_after: int | None = None

    def raw(self, name: str, *args: int) -> tuple[int, bool]:
        """(result register, error?) of one call; every register restored afterwards."""
        abi = self.abi
        t = self.target
        try:
            nr = abi.syscall_numbers[name]
        except KeyError:
            raise TargetError(f"the {self.arch.name} plugin gives no number for {name}") from None
        if len(args) > len(abi.syscall_args):
            raise TargetError(f"{name} needs {len(args)} arguments; the ABI passes "
                              f"{len(abi.syscall_args)}")
        saved = t.get_regs(self.tid)
        regs = dict(saved)
        regs[abi.pc] = self.insn
        regs[abi.syscall_nr] = nr
        for reg, value in zip(abi.syscall_args, args):
            regs[reg] = value & self.mask
        if abi.syscall_error is not None:
            flag_reg, bit = abi.syscall_error
            regs[flag_reg] &= ~bit  # not every emulator clears it on success
        t.set_regs(self.tid, regs)
        try:
            t.resume(self.tid, step=True)
            stop = t.wait()
            if stop.kind is not StopKind.TRAP:
                raise TargetError(f"injected {name} ended with {stop.kind} (signal {stop.signo})")
            after = t.get_regs(self.tid)
        finally:
            t.set_regs(self.tid, saved)
        value = after[abi.syscall_ret]
        # qemu-user's stub stops one instruction late after a system call (its CPU loop
        # runs the call, then the next instruction, then honours the step): the result
        # registers are read all the same, so the instruction after the one borrowed
        # must leave them alone (libc's syscall() returns or branches on the error flag)
        self.pc_after = after[abi.pc]
        if abi.syscall_error is not None:
            flag_reg, bit = abi.syscall_error
            return value, bool(after[flag_reg] & bit)
        signed = value - (1 << self.arch.word_bits) if value >> (self.arch.word_bits - 1) else value
        if -4096 < signed < 0:
            return -signed, True
        return value, False

    def __call__(self, name: str, *args: int) -> int:
        """The call's result; raises OSError with the errno the call failed with."""
        value, failed = self.raw(name, *args)
        if failed:
            raise OSError(value, f"{name}: {os.strerror(value) if value < 4096 else value}")
        return value

    # ------------------------------------------------------------------ conveniences
    def mmap(self, address: int, size: int, prot: str) -> int:
        """Anonymous private memory, at ``address`` if the kernel agrees (a hint)."""
        args = (address, size, prot_bits(prot), MAP_PRIVATE | MAP_ANONYMOUS, self.mask, 0)
        if not self.abi.mmap_block:
            return self(self.abi.mmap_name, *args)
        if self.scratch is None:
            raise TargetError(f"{self.arch.name}'s mmap takes its arguments in memory, and "
                              "this injector has no scratch memory for them")
        size_of = self.arch.word_bits // 8
        block = b"".join((v & self.mask).to_bytes(size_of, self.arch.byteorder) for v in args)
        scratch = self.scratch(self.tid) if callable(self.scratch) else self.scratch
        old = self.target.read_memory(scratch, len(block))
        self.target.write_memory(scratch, block)
        try:
            return self(self.abi.mmap_name, scratch)
        finally:
            self.target.write_memory(scratch, old)  # it was the program's memory

    def mmap_exactly(self, address: int, size: int, prot: str) -> bool:
        """Map at ``address`` or nothing at all (never over an existing mapping)."""
        try:
            got = self.mmap(address, size, prot)
        except OSError as exc:
            if exc.errno in (errno.ENOMEM, errno.EINVAL, errno.EPERM, errno.EEXIST):
                return False
            raise
        if got != address:
            self("munmap", got, size)
            return False
        return True

    def mprotect(self, address: int, size: int, prot: str) -> None:
        self("mprotect", address, size, prot_bits(prot))

    def munmap(self, address: int, size: int) -> None:
        self("munmap", address, size)
