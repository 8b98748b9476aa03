"""Live Linux processes under ptrace as Targets.

One :class:`Hub` per tracer owns ``waitpid(-1)``: every thread of every traced process
(children followed across fork included) reports there, and the hub hands each stop to
the :class:`PtraceTarget` of its process.  A target keeps, per thread, whether it is
stopped (ptrace requests only work then) and a queue of stops not yet handed out.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..archops import ArchOps
from ..errors import MemoryFault, TargetError
from ..procmaps import free_gap_near, read_maps
from ..target import Stop, StopKind, Target
from ..types import Regs
from . import sys as pt
from .memory import ProcMem
from .process import (
    MAP_ANONYMOUS,
    MAP_FIXED_NOREPLACE,
    MAP_PRIVATE,
    MAP_SHARED,
    TF,
    SyscallInjector,
    WaitStatus,
    clear_step_tf,
    getregs,
    prot_bits,
    setregs,
    task_state,
    waitpid,
)
from .regs import UserRegs, set_xstate_extra

_ptrace = pt._ptrace  # the hit path calls ptrace(2) directly
_TRUE = shutil.which("true") or "/bin/true"  # a program that exits at once (Hub.nudge)

SYNC_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE,
                          signal.SIGTRAP})
JOB_STOPS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
OPTIONS = (pt.PTRACE_O_TRACECLONE | pt.PTRACE_O_TRACEFORK | pt.PTRACE_O_TRACEVFORK
           | pt.PTRACE_O_TRACEEXEC | pt.PTRACE_O_TRACESYSGOOD)
PTRACE_SYSCALL = 24
EVENTS = {pt.PTRACE_EVENT_CLONE: "clone", pt.PTRACE_EVENT_FORK: "fork",
          pt.PTRACE_EVENT_VFORK: "vfork", pt.PTRACE_EVENT_EXEC: "exec",
          pt.PTRACE_EVENT_VFORK_DONE: "vfork-done", pt.PTRACE_EVENT_EXIT: "exit"}


@dataclass(slots=True)
class Thread:
    tid: int
    stopped: bool = False
    frozen: bool = False  # stopped by us on behalf of another thread (inline step)
    stepping: bool = False
    tf_before: int = 0
    regs: UserRegs = field(default_factory=UserRegs)
    regs_valid: bool = False
    #: resume with PTRACE_SYSCALL: the dynamic linker is mapping libraries and every
    #: mmap is a chance to arm probes before the new code runs
    watch_syscalls: bool = False
    in_syscall: bool = False
    #: re-block SIGTRAP at every trap (a vfork child runs with every signal blocked and
    #: reads its mask to reset dispositions: posix_spawn)
    guard_mask: bool = False
    trap: Stop = field(init=False)  # reused for every trap of this thread (hit path)
    regs_addr: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.trap = Stop(self.tid, StopKind.TRAP, signal.SIGTRAP)
        self.regs_addr = ctypes.addressof(self.regs)


# Every signal a thread can block, but SIGTRAP: what a mask blocking all signals looks
# like after a breakpoint or step trap (the kernel unblocks a trap signal it forces)
_ALL_BUT_TRAP = ((1 << 64) - 1) & ~(1 << (signal.SIGKILL - 1)) & ~(1 << (signal.SIGSTOP - 1)) \
    & ~(1 << (signal.SIGTRAP - 1))
_TRAP_BIT = 1 << (signal.SIGTRAP - 1)


def reblock_sigtrap(tid: int) -> None:
    """Undo the kernel's unblocking of SIGTRAP when a trap hit a thread that blocked
    every signal.  glibc blocks every signal around clone (pthread_create, fork,
    posix_spawn) and restores its mask afterwards, which erases the damage in the
    thread itself; what must not happen is a child inheriting the unblocked mask.  So
    this runs at clone/fork/vfork events, for the parent and the child, not per hit."""
    mask = pt.getsigmask(tid)
    if mask != -1 and mask & _ALL_BUT_TRAP == _ALL_BUT_TRAP and not mask & _TRAP_BIT:
        pt.setsigmask(tid, mask | _TRAP_BIT)


def _in_trace_stop(tid: int) -> bool:
    return task_state(tid) == "t"


def sigtrap_pending(tid: int) -> bool:
    """SIGTRAP is pending for this thread alone (a breakpoint it hit whose stop an
    interrupt overtook: the kernel reports a pending interrupt before dequeuing)."""
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("SigPnd:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGTRAP - 1)))
    except (OSError, ValueError, IndexError):
        pass
    return False


_TRAP_STATUS = (signal.SIGTRAP << 8) | 0x7F  # stopped by SIGTRAP, no ptrace event


class Hub:
    """waitpid(-1) for every traced task, routed to its process's target."""

    def __init__(self) -> None:
        self.targets: dict[int, PtraceTarget] = {}  # tid -> target
        self.orphans: dict[int, WaitStatus] = {}  # stops of tids not yet announced
        self.all: list[PtraceTarget] = []  # every target with threads or queued stops
        #: (target, tid) of an inline step in flight: only its stops may come next
        self.inline: tuple[PtraceTarget, int] | None = None
        #: set when the session wants out: the hit path then returns to it
        self.leave = False
        #: pids of the tracer's own short-lived children started by :meth:`nudge`
        self._wakers: set[int] = set()
        self._wake_lock = threading.Lock()

    def adopt(self, tid: int, target: PtraceTarget) -> None:
        self.targets[tid] = target
        if target not in self.all:
            self.all.append(target)
        early = self.orphans.pop(tid, None)
        if early is not None:
            target._on_status(early)

    def forget(self, tid: int) -> None:
        self.targets.pop(tid, None)

    def wake(self) -> None:
        """Make a blocked :meth:`pump` return (safe from a signal handler): interrupt
        every thread believed running, so each reports a stop."""
        for target in list(self.all):
            for th in list(target.threads_.values()):
                if not th.stopped:
                    pt.try_ptrace(pt.PTRACE_INTERRUPT, th.tid, 0, 0)

    def nudge(self) -> None:
        """Make the tracer thread leave :meth:`next_stop`, from any thread.

        ptrace requests work only from the tracer thread, and a signal handler is the
        caller's to own, but ``waitpid(-1)`` in the tracer thread also reports the exit of
        a child of any thread of the tracer: start one that exits at once."""
        self.leave = True
        with self._wake_lock:  # the hub must not see the child's exit before its pid
            try:
                pid = os.posix_spawn(_TRUE, [_TRUE], {})
            except OSError:
                return  # (no program to start) the hit path still sees ``leave``
            self._wakers.add(pid)

    def _woken(self, tid: int) -> bool:
        """True (and forgotten) when ``tid`` was a child started by :meth:`nudge`."""
        with self._wake_lock:
            if tid in self._wakers:
                self._wakers.discard(tid)
                return True
        return False

    def reap_wakers(self) -> None:
        """Collect the nudge children the hub has not seen exit (no zombie left)."""
        with self._wake_lock:
            for pid in self._wakers:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
            self._wakers.clear()

    def pump(self, block: bool = True) -> bool:
        """Collect one wait status and route it; False when nothing was there."""
        ws = waitpid(-1, 0 if block else os.WNOHANG)
        if ws is None:
            return False
        target = self.targets.get(ws.tid)
        if target is None:
            if self._woken(ws.tid):
                return True
            self.orphans[ws.tid] = ws  # a new clone child can report before its parent
            return True
        target._on_status(ws)
        return True

    def next_stop(self, only: tuple[PtraceTarget, int] | None = None
                  ) -> tuple[PtraceTarget | None, Stop | None] | None:
        """The next stop of any traced process (None: nothing is traced any more; a
        None stop: the hub handled a hit and the caller asked to be told, or a nudge).

        ``only``: (target, tid) whose stop must come next; the others wait in queues.
        """
        if only is not None:
            target, tid = only
            while True:
                for s in target.queue:
                    if s.tid == tid:
                        target.queue.remove(s)
                        return target, s
                if tid not in target.threads_ or not self.pump():
                    return None
        waitpid, targets = os.waitpid, self.targets
        while True:
            for target in self.all:
                if target.queue:
                    return target, target.queue.popleft()
            self.all = [t for t in self.all if t.threads_]
            if not self.all:
                return None
            # The hit path: one waitpid and, for a plain trap, straight to the engine:
            # no allocation, no queue, no Stop handed up the stack
            while True:
                try:
                    tid, status = waitpid(-1, pt.WALL)
                except ChildProcessError:
                    return None
                except InterruptedError:
                    status = None
                    break
                target = targets.get(tid)
                if status != _TRAP_STATUS or target is None:
                    break
                th = target.threads_.get(tid)
                if th is None:
                    break
                th.stopped = True
                th.regs_valid = False
                th.stepping = False
                if th.guard_mask:
                    reblock_sigtrap(tid)
                on_trap = target.on_trap
                if on_trap is None:
                    return target, th.trap
                # every trap needs the registers: read them here, once
                if _ptrace(pt.PTRACE_GETREGS, tid, 0, th.regs_addr) < 0:
                    return target, th.trap  # gone (killed): the slow path says how
                th.regs_valid = True
                if not on_trap(tid, th.regs):
                    return target, th.trap
                if self.leave or self.inline is not None:
                    # asked to stop, or an inline step began: only its thread's stops
                    # may come next, which the caller's next_stop(inline) enforces
                    return target, None
                if target.queue:
                    status = None  # the engine queued stops (held for a step): serve them
                    break
            if status is None:
                continue
            ws = WaitStatus(tid, status)
            if target is None:
                if self._woken(tid):
                    return None, None  # a nudge: the caller looks at why
                self.orphans[tid] = ws  # a new clone child can report before its parent
                continue
            target._on_status(ws)


class PtraceTarget(Target):
    """One traced process (all its threads)."""

    regs_by_attribute = True  # UserRegs: a register is an attribute too (the fast way)
    regs_class = UserRegs  # its fields' own descriptors set the pc without a Python frame
    # emulating push costs a /proc/PID/mem write: 21.4 vs 15.8 us/hit boosted, pinned
    boost_cheaper_than_memory = True

    def __init__(self, pid: int, arch: ArchOps, hub: Hub, *, spawned: bool) -> None:
        self.pid = pid
        self.arch = arch
        self.hub = hub
        self.spawned = spawned
        self.mem = ProcMem(pid)
        self.threads_: dict[int, Thread] = {}
        self.queue: deque[Stop] = deque()
        self.exited: int | None = None  # wait status of the whole process once gone
        self.syscall_insn: int | None = None
        self._xbuf = (ctypes.c_uint8 * 16384)()
        self.xol_areas: list[tuple[int, int]] = []
        #: the engine's trap handler ((tid, regs) -> consumed?), called by the hub
        self.on_trap: Callable[[int, Regs], bool] | None = None

    # ------------------------------------------------------------------ threads
    def add_thread(self, tid: int, stopped: bool = False) -> Thread:
        th = self.threads_.get(tid)
        if th is None:
            th = self.threads_[tid] = Thread(tid, stopped)
            self.hub.adopt(tid, self)
        return th

    def threads(self) -> list[int]:
        return list(self.threads_)

    def any_stopped(self) -> int | None:
        for th in self.threads_.values():
            if th.stopped:
                return th.tid
        return None

    # ------------------------------------------------------------------ statuses
    def _on_status(self, ws: WaitStatus) -> None:
        tid = ws.tid
        th = self.threads_.get(tid) or self.add_thread(tid)
        if ws.exited:
            self.threads_.pop(tid, None)
            self.hub.forget(tid)
            if tid == self.pid:
                self.exited = ws.status
            self.queue.append(Stop(tid, StopKind.EXITED, status=ws.status))
            return
        th.stopped = True
        th.regs_valid = False
        sig = ws.stopsig
        event = ws.event
        if event:
            if event == pt.PTRACE_EVENT_STOP:
                kind = "group-stop" if sig in JOB_STOPS else "interrupt"
                self.queue.append(Stop(tid, StopKind.EVENT, sig, event=kind))
                return
            name = EVENTS.get(event, str(event))
            data = pt.geteventmsg(tid) if event != pt.PTRACE_EVENT_STOP else None
            self.queue.append(Stop(tid, StopKind.EVENT, sig, event=name, data=data))
            return
        if sig == signal.SIGTRAP | 0x80:
            op = pt.syscall_op(tid)
            if op is None:  # kernels before 5.3: entry and exit stops alternate
                th.in_syscall = not th.in_syscall
            else:
                th.in_syscall = op == pt.PTRACE_SYSCALL_INFO_ENTRY
            self.queue.append(Stop(tid, StopKind.EVENT, signal.SIGTRAP, event="syscall",
                                   data="entry" if th.in_syscall else "exit"))
            return
        if sig == signal.SIGTRAP:
            if th.stepping:
                th.stepping = False
            if th.guard_mask:
                reblock_sigtrap(tid)
            self.queue.append(Stop(tid, StopKind.TRAP, sig))
            return
        info = pt.getsiginfo(tid)
        fault = info.si_code > 0 and sig in SYNC_SIGNALS
        addr = info.si_addr if fault else None
        if th.stepping:
            th.stepping = False
            clear_step_tf(tid, th.regs, th.tf_before)
            th.regs_valid = True
        self.queue.append(Stop(tid, StopKind.SIGNAL, sig, fault=fault, fault_addr=addr,
                               data=info.si_code, siginfo=info))

    def wait(self, timeout: float | None = None) -> Stop:
        while not self.queue:
            if self.exited is not None and not self.threads_:
                return Stop(self.pid, StopKind.EXITED, status=self.exited)
            self.hub.pump()
        return self.queue.popleft()

    # ------------------------------------------------------------------ memory
    def read_memory(self, address: int, size: int) -> bytes:
        return self.mem.read(address, size)

    def write_memory(self, address: int, data: bytes) -> None:
        self.mem.write(address, data)

    def reopen_memory(self) -> None:
        """A new program image (exec): /proc/PID/mem opened before it reads the old."""
        self.mem.close()
        self.mem = ProcMem(self.pid)

    # ------------------------------------------------------------------ registers
    def _thread(self, tid: int) -> Thread:
        th = self.threads_.get(tid)
        if th is None:
            raise TargetError(f"thread {tid} is not traced (it exited?)")
        if not th.stopped:
            raise TargetError(f"thread {tid} is running; it must be stopped first")
        return th

    def get_regs(self, tid: int) -> Regs:
        th = self.threads_.get(tid)
        if th is None or not th.stopped:
            self._thread(tid)  # raises the right error
        if not th.regs_valid:
            if _ptrace(pt.PTRACE_GETREGS, tid, 0, th.regs_addr) < 0:
                getregs(tid, th.regs)  # raises with errno
            th.regs_valid = True
        return th.regs

    def set_regs(self, tid: int, regs: Regs) -> None:
        th = self.threads_.get(tid)
        if th is None or not th.stopped:
            self._thread(tid)
        if regs is not th.regs:
            th.regs.update(dict(regs.items()))
        if _ptrace(pt.PTRACE_SETREGS, tid, 0, th.regs_addr) < 0:
            setregs(tid, th.regs)  # raises with errno
        th.regs_valid = True

    def set_regs_and_resume(self, tid: int, regs: Regs) -> None:
        # the end of every boosted/emulated hit: one Python frame for both requests
        th = self.threads_.get(tid)
        if th is None or not th.stopped or regs is not th.regs:
            self.set_regs(tid, regs)
            self.resume(tid)
            return
        if _ptrace(pt.PTRACE_SETREGS, tid, 0, th.regs_addr) < 0:
            setregs(tid, th.regs)  # raises with errno
        request = PTRACE_SYSCALL if th.watch_syscalls else pt.PTRACE_CONT
        if _ptrace(request, tid, 0, 0) < 0:
            err = ctypes.get_errno()
            if err != errno.ESRCH:
                raise TargetError(f"cannot resume thread {tid}: {os.strerror(err)}")
        th.stopped = False
        th.regs_valid = False

    def set_extra(self, tid: int, values: dict[str, int]) -> None:
        self._thread(tid)
        set_xstate_extra(tid, self._xbuf, values)

    # ------------------------------------------------------------------ execution
    def resume(self, tid: int, *, step: bool = False, signal: int = 0) -> None:
        th = self.threads_.get(tid)
        if th is None or not th.stopped:
            th = self._thread(tid)
        if step:
            th.tf_before = th.regs.eflags & TF if th.regs_valid else 0
            th.stepping = True
            request = pt.PTRACE_SINGLESTEP
        else:
            request = PTRACE_SYSCALL if th.watch_syscalls else pt.PTRACE_CONT
        if _ptrace(request, tid, 0, signal) < 0:
            err = ctypes.get_errno()
            if err != errno.ESRCH:
                raise TargetError(f"cannot resume thread {tid}: {os.strerror(err)}")
        th.stopped = False
        th.regs_valid = False

    def watch_syscalls(self, tid: int, on: bool) -> None:
        th = self.threads_.get(tid)
        if th is not None:
            if on and not th.watch_syscalls:
                th.in_syscall = False
            th.watch_syscalls = on

    def syscall_number(self, tid: int) -> int:
        """The system call a thread stopped at a syscall stop is making."""
        return self.get_regs(tid)["orig_rax"]

    def listen(self, tid: int) -> None:
        """Leave a thread in its group-stop (job control) until SIGCONT."""
        th = self._thread(tid)
        pt.try_ptrace(pt.PTRACE_LISTEN, tid, 0, 0)
        th.stopped = False

    def interrupt(self, tid: int) -> None:
        pt.try_ptrace(pt.PTRACE_INTERRUPT, tid, 0, 0)

    def stop_thread(self, tid: int) -> list[Stop]:
        """Interrupt a running thread and wait until it is stopped.

        Returns the stops it reported on the way other than our interrupt (a breakpoint
        it reached meanwhile, a signal) for the caller to handle after.
        """
        th = self.threads_.get(tid)
        if th is None or th.stopped:
            return []
        self.interrupt(tid)
        return [s for s in self._await_stop(tid)
                if not (s.kind is StopKind.EVENT and s.event == "interrupt")]

    def take_pending_trap(self, tid: int) -> list[Stop]:
        """Let a stopped thread with SIGTRAP pending report it (it stops again at once,
        before running any code); returns the stops it made."""
        th = self.threads_.get(tid)
        if th is None or not th.stopped:
            return []
        self.resume(tid)
        return self._await_stop(tid)

    def _await_stop(self, tid: int) -> list[Stop]:
        """Wait until a thread just asked to stop is stopped; take its queued stops."""
        deadline = time.monotonic() + 0.5
        while tid in self.threads_ and not self.threads_[tid].stopped:
            if self.hub.pump(block=False):
                continue
            if time.monotonic() > deadline and _in_trace_stop(tid):
                # stopped, but its wait status is gone (taken by an interrupted waitpid)
                th = self.threads_[tid]
                th.stopped = True
                th.regs_valid = False
                break
            time.sleep(0.0005)
        mine = [s for s in self.queue if s.tid == tid]
        for s in mine:
            self.queue.remove(s)
        return mine

    def stop_others(self, tid: int) -> None:
        self.hub.inline = (self, tid)
        for other in list(self.threads_):
            if other == tid:
                continue
            th = self.threads_.get(other)
            if th is None or th.stopped:
                continue
            pending = self.stop_thread(other)
            th = self.threads_.get(other)
            if th is None:
                continue
            th.frozen = True
            # what it reported on the way is handled once the step is over
            self.queue.extend(pending)
            if pending:
                th.frozen = False  # its own stop keeps it stopped until handled

    def resume_others(self, tid: int) -> None:
        self.hub.inline = None
        for th in list(self.threads_.values()):
            if th.frozen and th.stopped:
                th.frozen = False
                self.resume(th.tid)

    def set_fault_addr(self, tid: int, address: int) -> None:
        """Rewrite si_addr of the signal a thread is stopped with (delivered on resume)."""
        info = pt.getsiginfo(tid)
        info.si_addr = address
        pt.setsiginfo(tid, info)

    def restore_siginfo(self, tid: int, info: pt.SigInfo) -> None:
        """Make ``info`` the siginfo of the signal the thread is next resumed with."""
        pt.setsiginfo(tid, info)

    def queue_signal(self, tid: int, signo: int, info: pt.SigInfo | None = None) -> None:
        """Send ``signo`` again; with its original siginfo where the kernel lets a
        process send that (sigqueue, timers, mq: negative si_code), else plainly."""
        if info is not None and info.si_code < 0 and info.si_code != pt.SI_TKILL:
            try:
                pt.tgsigqueueinfo(self.pid, tid, signo, info)
                return
            except OSError:
                pass
        pt.tgkill(self.pid, tid, signo)

    # ------------------------------------------------------------------ system calls
    def _find_syscall_insn(self) -> int:
        """An existing system-call instruction of the program (any executable page)."""
        pattern = self.arch.abi.syscall_insn
        for m in read_maps(self.pid):
            if not m.executable or m.path in ("[vsyscall]",):
                continue
            try:
                data = self.mem.read(m.start, min(m.end - m.start, 1 << 22))
            except MemoryFault:
                continue
            at = data.find(pattern)
            while at >= 0 and at % self.arch.insn_alignment:
                at = data.find(pattern, at + 1)
            if at >= 0:
                return m.start + at
        raise TargetError("no system-call instruction found in the program to inject through")

    def inject(self, name: str, *args: int, tid: int | None = None) -> int:
        """Make a stopped thread of the program run one system call for us."""
        if tid is None:
            tid = self.any_stopped()
        if tid is None:
            tid = self.pid if self.pid in self.threads_ else next(iter(self.threads_))
            self.stop_thread(tid)
            resume_after = True
        else:
            resume_after = False
        if self.syscall_insn is None:
            self.syscall_insn = self._find_syscall_insn()
        th = self._thread(tid)
        injector = SyscallInjector(tid, self.syscall_insn, self.arch.abi)
        try:
            return injector(name, *args)
        finally:
            th.regs_valid = False
            for sig, info in injector.suppressed:
                self.queue_signal(tid, sig, info)
            if resume_after:
                self.resume(tid)

    def _mmap_near(self, what: str, near: int, size: int, reach: int, prot: str,
                   flags: int, fd: int) -> int:
        """An injected mmap of ``size`` bytes at a free range within ``reach`` of
        ``near`` (MAP_FIXED_NOREPLACE: a range taken meanwhile is tried again)."""
        maps = read_maps(self.pid)
        for _ in range(8):
            where = free_gap_near(maps, near, size, reach)
            if where is None:
                raise TargetError(f"no free {size:#x}-byte range within {reach:#x} of {near:#x}")
            try:
                got = self.inject("mmap", where, size, prot_bits(prot),
                                  flags | MAP_FIXED_NOREPLACE, fd, 0)
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    maps = read_maps(self.pid)
                    continue
                raise TargetError(f"cannot map {what} in process {self.pid}: {exc}") from None
            if got != where:
                self.inject("munmap", got, size)
                raise TargetError(f"the kernel placed {what} at {got:#x}, not {where:#x}")
            return got
        raise TargetError(f"could not place {what}: the address space keeps changing")

    def map_xol(self, near: int, size: int, reach: int = 0) -> int:
        """Map an XOL area: read+execute only, filled through /proc/PID/mem.

        The program never gets a writable and executable page from us.  It is placed
        within ``reach`` of ``near`` (a rel32 on x86-64) so a jump back fits and
        pc-relative operands can be re-based.
        """
        got = self._mmap_near("an XOL area", near, size, reach, "rx",
                              MAP_PRIVATE | MAP_ANONYMOUS, (1 << 64) - 1)
        self.xol_areas.append((got, size))
        # our own system-call instruction for later injections, at the area's end
        insn = self.arch.abi.syscall_insn
        self.write_memory(got + size - len(insn), insn)
        self.syscall_insn = got + size - len(insn)
        return got

    def map_shared(self, path: str, near: int, size: int, reach: int, scratch: int) -> int:
        """Map the file at ``path`` read+write and shared into the program, within
        ``reach`` of ``near``; ``scratch`` is program memory UBP may write the path into
        (an XOL area of ours).  The program's descriptor is closed again at once."""
        raw = path.encode() + b"\0"
        old = self.read_memory(scratch, len(raw))
        self.write_memory(scratch, raw)
        try:
            fd = self.inject("openat", (1 << 64) - 100, scratch, os.O_RDWR | os.O_CLOEXEC, 0)
        except OSError as exc:
            raise TargetError(f"the program cannot open UBP's shared counters ({path}): "
                              f"{exc.strerror}") from None
        finally:
            self.write_memory(scratch, old)
        try:
            return self._mmap_near("UBP's shared counters", near, size, reach, "rw",
                                   MAP_SHARED, fd)
        finally:
            self.inject("close", fd)

    @contextmanager
    def all_stopped(self) -> Iterator[list[int]]:
        """Every thread stopped for the duration; the ones stopped here are resumed
        after.  For code changes a running thread must not see half-written."""
        held = first = None
        if any(not th.stopped for th in self.threads_.values()):
            tid = self.any_stopped()
            if tid is None:
                # nobody is stopped (UBP is letting go): stop one; what it reports on
                # the way is handled later by the event loop
                tid = next(iter(self.threads_))
                pending = self.stop_thread(tid)
                self.queue.extend(pending)
                if not any(s.tid == tid for s in pending):
                    first = tid
            self.stop_others(tid)
            held = tid
        try:
            yield list(self.threads_)
        finally:
            if held is not None:
                self.resume_others(held)
            if first is not None and first in self.threads_:
                self.resume(first)

    # ------------------------------------------------------------------ lifetime
    def detach_all(self, signals: dict[int, int] | None = None) -> None:
        """Detach every (stopped) thread; ``signals`` maps tid -> signal to deliver."""
        signals = signals or {}
        for tid in list(self.threads_):
            pt.try_ptrace(pt.PTRACE_DETACH, tid, 0, signals.get(tid, 0))
            self.threads_.pop(tid, None)
            self.hub.forget(tid)
        self.mem.close()

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        self.mem.close()
