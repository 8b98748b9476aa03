"""This machine's own CPU as a reference, through a ptrace-driven scratch process.

A tiny program (``/bin/true``) is started under ptrace and stopped at its first
instruction; its own code never runs again.  Instructions are placed in pages mapped
into it by injected ``mmap`` calls and run for real: AVX2, AVX-512 and everything else
the silicon implements, with the kernel's real single-step, signal and fault behaviour.
"""

from __future__ import annotations

import ctypes
import os
import platform
import random
import signal
import sys
import threading
import time

from ..archops import ArchOps
from ..elfinfo import elf_ident_of
from ..errors import MemoryFault, TargetError
from ..ptrace import sys as pt
from ..ptrace.memory import ProcMem
from ..ptrace.process import (
    HOST_ELF_MACHINE,
    MAP_ANONYMOUS,
    MAP_FIXED_NOREPLACE,
    MAP_PRIVATE,
    TF,
    SyscallInjector,
    clear_step_tf,
    getregs,
    prot_bits,
    setregs,
    spawn_traced,
    waitpid,
)
from ..ptrace.regs import UserRegs, set_xstate_extra
from ..target import Stop, StopKind
from ..types import Regs
from . import PAGE, ReferenceCpu, ScratchTarget

SEGV_MAPERR = 1
DEFAULT_TIMEOUT = 2.0
# Standard-format XSAVE components worth randomising: (xfeature bit, offset, size)
XSTATE_PARTS = ((2, 576, 256), (5, 1088, 64), (6, 1152, 512), (7, 1664, 1024))
XMM_OFFSET, XMM_SIZE, XSTATE_BV = 160, 256, 512


def _host_ident():
    try:
        return elf_ident_of(sys.executable)
    except Exception:
        return None


class NativeCpu(ReferenceCpu):
    name = "native"
    fidelity = 100

    @staticmethod
    def handles(arch: ArchOps) -> bool:
        if platform.system() != "Linux" or arch.elf.machine != HOST_ELF_MACHINE:
            return False
        host = _host_ident()
        return host is not None and arch.handles_elf(host)

    def unavailable(self) -> str | None:
        try:
            with open("/proc/sys/kernel/yama/ptrace_scope") as f:
                if f.read().strip() == "3":
                    return "ptrace is disabled (kernel.yama.ptrace_scope = 3)"
        except OSError:
            pass
        return None

    def open(self) -> NativeTarget:
        return NativeTarget(self.arch)

    def cannot_run(self, analysis) -> str | None:
        return self.arch.hardware_hazard(analysis)


class _Watchdog(threading.Thread):
    """Stops a runaway scratch process (an instruction that jumps to itself)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name=f"ubp-watchdog-{pid}")
        self.pid = pid
        self.cond = threading.Condition()
        self.deadline: float | None = None
        self.fired = False
        self.done = False

    def arm(self, seconds: float) -> None:
        with self.cond:
            self.deadline = time.monotonic() + seconds
            self.cond.notify()

    def disarm(self) -> bool:
        """Disarm; True when it already fired (a SIGSTOP is on its way)."""
        with self.cond:
            self.deadline = None
            fired, self.fired = self.fired, False
            return fired

    def stop(self) -> None:
        with self.cond:
            self.done = True
            self.cond.notify()

    def run(self) -> None:
        with self.cond:
            while not self.done:
                if self.deadline is None:
                    self.cond.wait()
                    continue
                left = self.deadline - time.monotonic()
                if left > 0:
                    self.cond.wait(left)
                    continue
                self.deadline = None
                self.fired = True
                try:
                    pt.tgkill(self.pid, self.pid, signal.SIGSTOP)
                except OSError:
                    pass


class NativeTarget(ScratchTarget):
    def __init__(self, arch: ArchOps) -> None:
        self.arch = arch
        self.abi = arch.abi
        program = "/bin/true" if os.path.exists("/bin/true") else sys.executable
        self._old_affinity = os.sched_getaffinity(0)
        cpus = sorted(self._old_affinity)
        self.cpu = cpus[os.getpid() % len(cpus)]
        self.pid = spawn_traced([program], settle=True)
        self.tid = self.pid
        try:
            # tracer and tracee on one CPU: every ptrace stop is a cheap local switch
            os.sched_setaffinity(self.pid, {self.cpu})
            os.sched_setaffinity(0, {self.cpu})
            self.mem = ProcMem(self.pid)
            entry = getregs(self.pid)[self.abi.pc]
            self.mem.write(entry, self.abi.syscall_insn)
            self.inject = SyscallInjector(self.pid, entry, self.abi)
            self.stub = self.inject("mmap", 0, PAGE, prot_bits("rx"),
                                    MAP_PRIVATE | MAP_ANONYMOUS, (1 << 64) - 1, 0)
            self.mem.write(self.stub, self.abi.syscall_insn)
            self.inject.insn_addr = self.stub
        except BaseException:
            self.close()
            raise
        self._regions: dict[int, str] = {}
        self._lazy: list[int] = []
        self._stale_sigstop = False
        self._mode: tuple[bool, int] | None = None
        self._regs = UserRegs()
        self._pristine = getregs(self.pid)
        self._tf_before = 0
        self._xbuf = (ctypes.c_uint8 * 16384)()
        self._xsize = pt.getregset(self.pid, pt.NT_X86_XSTATE, self._xbuf)
        self._xfeatures = int.from_bytes(bytes(self._xbuf[464 + 8:464 + 16]), "little")
        self.watchdog = _Watchdog(self.pid)
        self.watchdog.start()
        self.timeout = DEFAULT_TIMEOUT

    # ------------------------------------------------------------------ memory
    def read_memory(self, address: int, size: int) -> bytes:
        return self.mem.read(address, size)

    def write_memory(self, address: int, data: bytes) -> None:
        self.mem.write(address, data)

    def _mmap(self, address: int, size: int, prot: str) -> None:
        try:
            got = self.inject("mmap", address, size, prot_bits(prot),
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                              (1 << 64) - 1, 0)
        except OSError as exc:
            raise TargetError(f"cannot map {size:#x} bytes at {address:#x}: {exc}") from None
        if got != address:
            self.inject("munmap", got, size)
            raise TargetError(f"cannot map at {address:#x}: the kernel chose {got:#x}")

    def map_region(self, address: int, size: int, prot: str) -> None:
        start = address & ~(PAGE - 1)
        end = (address + size + PAGE - 1) & ~(PAGE - 1)
        for page in range(start, end, PAGE):
            if page in self._lazy:
                self.inject("munmap", page, PAGE)
                self._lazy.remove(page)
            have = self._regions.get(page)
            if have == prot:
                continue
            if have is not None:
                self.inject("mprotect", page, PAGE, prot_bits(prot))
            else:
                self._mmap(page, PAGE, prot)
            self._regions[page] = prot

    def _unmap_page(self, page: int) -> None:
        self.inject("munmap", page, PAGE)

    def _map_lazy(self, address: int) -> bool:
        page = address & ~(PAGE - 1)
        if self.filler is None or not self.lazy_budget_left():
            return False
        if page in self._regions or page in self._lazy or not self.arch.canonical_address(page):
            return False
        try:
            self._mmap(page, PAGE, "rw")
        except TargetError:
            return False
        self.mem.write(page, self.filler(page))
        self._lazy.append(page)
        return True

    # ------------------------------------------------------------------ registers
    def get_regs(self, tid: int) -> Regs:
        return getregs(self.pid, self._regs)

    def set_regs(self, tid: int, regs: Regs) -> None:
        if regs is not self._regs:
            # a register file built from scratch starts a new run: segment selectors as
            # the process began (an instruction may have changed them, sysenter even
            # returns in 32-bit mode), and no system call to restart
            for sel in ("cs", "ss", "ds", "es", "fs", "gs"):
                self._regs[sel] = self._pristine[sel]
            self._regs.update(dict(regs.items()))
            self._regs["orig_rax"] = (1 << 64) - 1
        setregs(self.pid, self._regs)

    def set_extra(self, tid: int, values: dict[str, int]) -> None:
        set_xstate_extra(self.pid, self._xbuf, values)

    def get_ext_state(self) -> bytes | None:
        n = pt.getregset(self.pid, pt.NT_X86_XSTATE, self._xbuf)
        state = bytearray(self._xbuf[:n])
        # The header's XSTATE_BV says which components the CPU tracked as in use, not
        # what they hold: the kernel already expands init components to their values
        # in this (UABI) layout, and CPUs differ in when a component leaves its init
        # state (AVX-512 on an AMD EPYC here).  Compare contents, not the bookkeeping.
        state[XSTATE_BV:XSTATE_BV + 64] = bytes(64)
        return bytes(state)

    def set_ext_state(self, state: bytes) -> None:
        ctypes.memmove(self._xbuf, state, len(state))
        pt.setregset(self.pid, pt.NT_X86_XSTATE, self._xbuf, len(state))

    def random_ext_state(self, rng: random.Random) -> bytes | None:
        n = pt.getregset(self.pid, pt.NT_X86_XSTATE, self._xbuf)
        state = bytearray(self._xbuf[:n])  # with its header: this one is written back
        state[XMM_OFFSET:XMM_OFFSET + XMM_SIZE] = rng.randbytes(XMM_SIZE)
        bv = int.from_bytes(state[XSTATE_BV:XSTATE_BV + 8], "little") | 0x2
        for bit, off, size in XSTATE_PARTS:
            if self._xfeatures >> bit & 1 and off + size <= len(state):
                state[off:off + size] = rng.randbytes(size)
                bv |= 1 << bit
        state[XSTATE_BV:XSTATE_BV + 8] = bv.to_bytes(8, "little")
        return bytes(state)

    # ------------------------------------------------------------------ execution
    def resume(self, tid: int, *, step: bool = False, signal: int = 0) -> None:
        self._mode = (step, signal)
        if step:
            self._tf_before = self._regs["eflags"] & TF
        pt.ptrace(pt.PTRACE_SINGLESTEP if step else pt.PTRACE_CONT, self.pid, 0, signal)

    def wait(self, timeout: float | None = None) -> Stop:
        if self._mode is None:
            raise TargetError("wait() without resume()")
        step, _ = self._mode
        if not step:
            self.watchdog.arm(timeout or self.timeout)
        try:
            return self._wait(step)
        finally:
            if not step and self.watchdog.disarm():
                self._stale_sigstop = True

    def _wait(self, step: bool) -> Stop:
        pid = self.pid
        while True:
            ws = waitpid(pid)
            if ws is None or ws.exited:
                return Stop(pid, StopKind.EXITED, status=ws.status if ws else None)
            sig = ws.stopsig
            if sig == signal.SIGSTOP:
                if self.watchdog.disarm() or not self._stale_sigstop:
                    self._mode = None
                    return Stop(pid, StopKind.TIMEOUT)
                self._stale_sigstop = False  # a late watchdog signal: swallow it
                pt.ptrace(pt.PTRACE_SINGLESTEP if step else pt.PTRACE_CONT, pid, 0, 0)
                if not step:
                    self.watchdog.arm(self.timeout)
                continue
            if sig == signal.SIGTRAP:
                self._mode = None
                return Stop(pid, StopKind.TRAP, sig)
            info = pt.getsiginfo(pid)
            fault = info.si_code > 0
            addr = info.si_addr if fault and sig in (signal.SIGSEGV, signal.SIGBUS) else None
            if sig == signal.SIGSEGV and info.si_code == SEGV_MAPERR and addr is not None:
                pc = getregs(pid, self._regs)[self.abi.pc]
                if addr != pc and self._map_lazy(addr):
                    self._consume_injection_signals()
                    pt.ptrace(pt.PTRACE_SINGLESTEP if step else pt.PTRACE_CONT, pid, 0, 0)
                    continue
            self._mode = None
            if step:
                clear_step_tf(pid, self._regs, self._tf_before)
            return Stop(pid, StopKind.SIGNAL, sig, fault=fault, fault_addr=addr)

    def _consume_injection_signals(self) -> None:
        if any(sig == signal.SIGSTOP for sig, _info in self.inject.suppressed):
            self._stale_sigstop = False
            self.watchdog.disarm()
        self.inject.suppressed.clear()

    def close(self) -> None:
        wd = getattr(self, "watchdog", None)
        if wd is not None:
            wd.stop()
        try:
            os.kill(self.pid, signal.SIGKILL)
            waitpid(self.pid)
        except (ProcessLookupError, AttributeError):
            pass
        mem = getattr(self, "mem", None)
        if mem is not None:
            mem.close()
        try:
            os.sched_setaffinity(0, self._old_affinity)
        except (OSError, AttributeError):
            pass


__all__ = ["MemoryFault", "NativeCpu", "NativeTarget"]
