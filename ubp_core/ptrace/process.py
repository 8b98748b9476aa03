"""Starting, stopping and waiting for traced processes; system-call injection."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import time
from dataclasses import dataclass

from ..errors import TargetError
from . import sys as pt
from .memory import ProcMem
from .regs import UserRegs

HOST_ELF_MACHINE = "EM_X86_64"  # the register layout in regs.py is this machine's

PROT = {"r": 1, "w": 2, "x": 4}
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED, MAP_FIXED_NOREPLACE = (
    0x01, 0x02, 0x20, 0x10, 0x100000)


def task_state(tid: int) -> str | None:
    """A task's state letter from /proc/TID/stat (R, S, t, T, Z, ...); None: gone."""
    try:
        with open(f"/proc/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def reap_traced_threads(pid: int) -> None:
    """Collect the exited non-leader threads of a process this tracer traces: they are
    zombies only their tracer can reap (waitpid with __WALL), and the leader cannot be
    reaped before them."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            if int(tid) != pid:
                os.waitpid(int(tid), os.WNOHANG | pt.WALL)
    except (OSError, ValueError):
        pass


def task_ids(pid: int) -> list[int]:
    """The thread ids of a process (FileNotFoundError: no such process)."""
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def prot_bits(prot: str) -> int:
    return sum(PROT[c] for c in prot)


@dataclass(slots=True)
class WaitStatus:
    tid: int
    status: int

    @property
    def exited(self) -> bool:
        return os.WIFEXITED(self.status) or os.WIFSIGNALED(self.status)

    @property
    def stopped(self) -> bool:
        return os.WIFSTOPPED(self.status)

    @property
    def stopsig(self) -> int:
        return os.WSTOPSIG(self.status)

    @property
    def event(self) -> int:
        return (self.status >> 16) & 0xFF


def waitpid(pid: int, flags: int = 0) -> WaitStatus | None:
    while True:
        try:
            tid, status = os.waitpid(pid, flags | pt.__WALL)
        except InterruptedError:
            continue
        except ChildProcessError:
            return None
        if tid == 0:
            return None
        return WaitStatus(tid, status)


def wait_alive(tid: int) -> WaitStatus | None:
    """waitpid(tid), or None once the thread is dead.  A plain waitpid on a thread
    whose process has died can wait for ever: a leader's exit is not reported before
    its other threads are reaped, and those wait in their exit stops for this very
    tracer (seen: a program killed by a stray SIGTRAP during an injection)."""
    delay = 0.0
    while True:
        ws = waitpid(tid, os.WNOHANG)
        if ws is not None:
            return ws
        if task_state(tid) in (None, "Z", "X"):
            return None
        time.sleep(delay)
        delay = min(max(delay * 2, 0.0001), 0.01)


def _leave_execve(pid: int) -> None:
    """Step the first instruction so the thread is no longer inside execve.

    At the exec event the kernel has yet to store execve's return value in the result
    register; a system call injected there would have its number overwritten by 0.
    """
    pt.ptrace(pt.PTRACE_SINGLESTEP, pid, 0, 0)
    ws = waitpid(pid)
    if ws is None or ws.exited or ws.stopsig != signal.SIGTRAP:
        raise TargetError("the new program did not survive its first instruction")


def spawn_traced(argv: list[str], env: dict[str, str] | None = None,
                 options: int = 0, settle: bool = False) -> int:
    """fork + exec ``argv`` under ptrace; return the pid, stopped right after exec.

    The child is seized (PTRACE_SEIZE, so PTRACE_INTERRUPT works) while it is stopped
    before exec, so no instruction of the new program runs untraced.  ``settle`` steps
    one instruction past the exec so system calls can be injected at once.
    """
    pid = os.fork()
    if pid == 0:  # child: stop until the parent has seized us, then exec
        try:
            # the program gets the signal dispositions a shell would give it, not the
            # ones Python set for itself (SIGPIPE and SIGXFSZ ignored survive exec)
            for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            os.kill(os.getpid(), signal.SIGSTOP)
            if env is None:
                os.execvp(argv[0], argv)
            else:
                os.execvpe(argv[0], argv, env)
        except BaseException:
            os._exit(127)
    ws = waitpid(pid, os.WUNTRACED)
    if ws is None or not ws.stopped:
        raise TargetError(f"could not start {argv[0]}")
    pt.ptrace(pt.PTRACE_SEIZE, pid, 0, options | pt.PTRACE_O_TRACEEXEC)
    os.kill(pid, signal.SIGCONT)
    # expect: SIGCONT-related stops, then the exec event (or an early exit)
    while True:
        ws = waitpid(pid)
        if ws is None or ws.exited:
            raise TargetError(f"could not execute {argv[0]} (not found or not executable)")
        if ws.stopsig == signal.SIGTRAP and ws.event == pt.PTRACE_EVENT_EXEC:
            if settle:
                _leave_execve(pid)
            return pid
        if ws.event == pt.PTRACE_EVENT_STOP:
            pt.ptrace(pt.PTRACE_CONT, pid, 0, 0)
            continue
        sig = ws.stopsig
        pt.ptrace(pt.PTRACE_CONT, pid, 0, 0 if sig in (signal.SIGSTOP, signal.SIGCONT) else sig)


def getregs(tid: int, regs: UserRegs | None = None) -> UserRegs:
    regs = regs if regs is not None else UserRegs()
    pt.ptrace(pt.PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def setregs(tid: int, regs: UserRegs) -> None:
    pt.ptrace(pt.PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))


TF = 0x100


def clear_step_tf(tid: int, regs: UserRegs, tf_before: int) -> None:
    """A single-step that ended in a signal stop leaves the trap flag in the thread's
    flags (Linux no longer counts it as the debugger's); were the signal delivered so,
    the program would trap after every instruction once its handler returns."""
    getregs(tid, regs)
    if regs["eflags"] & TF and not tf_before:
        regs["eflags"] &= ~TF
        setregs(tid, regs)


class SyscallInjector:
    """Make a stopped thread execute one system call through a syscall instruction.

    The thread's registers are saved and restored around it, so the program never sees
    the call.  ``insn_addr`` must hold the arch's system-call instruction.
    """

    def __init__(self, tid: int, insn_addr: int, abi) -> None:
        self.tid = tid
        self.insn_addr = insn_addr
        self.abi = abi
        #: signals that arrived during an injection; the caller re-delivers them
        self.suppressed: list[tuple[int, pt.SigInfo]] = []  # (signal, its siginfo)

    def __call__(self, name: str, *args: int) -> int:
        tid = self.tid
        saved = getregs(tid)
        work = UserRegs.from_buffer_copy(saved)
        work[self.abi.pc] = self.insn_addr
        work[self.abi.syscall_nr] = self.abi.syscall_numbers[name]
        work["orig_rax"] = 0xFFFFFFFFFFFFFFFF  # not restarting a previous system call
        for reg, value in zip(self.abi.syscall_args, args):
            work[reg] = value
        setregs(tid, work)
        pt.ptrace(pt.PTRACE_SINGLESTEP, tid, 0, 0)
        while True:
            ws = wait_alive(tid)
            if ws is None or ws.exited:
                raise TargetError(f"thread {tid} died during an injected {name}()")
            if ws.event:
                # an event stop before anything ran (an interrupt still pending from an
                # earlier stop_thread, a group stop): not our step's trap, step again.
                # Taken for it, the call's number would read back as its result.
                pt.ptrace(pt.PTRACE_SINGLESTEP, tid, 0, 0)
                continue
            if ws.stopsig == signal.SIGTRAP:
                break
            # another signal arrived first: hold it for the caller, step on
            self.suppressed.append((ws.stopsig, pt.getsiginfo(tid)))
            pt.ptrace(pt.PTRACE_SINGLESTEP, tid, 0, 0)
        result = getregs(tid)[self.abi.syscall_ret]
        setregs(tid, saved)
        if result >= (1 << 64) - 4095:
            err = (1 << 64) - result
            raise OSError(err, f"injected {name}(): {os.strerror(err)}")
        return result


def errno_name(err: int) -> str:
    return errno.errorcode.get(err, str(err))


def release_child(child: int, originals: list[tuple[int, bytes]]) -> None:
    """A traced forked child UBP does not keep: the original bytes back in its copy of
    the text (only the forking thread exists in it, inside fork(), not in a patched
    range), then detach once it has reported its initial stop."""
    mem = ProcMem(child)
    try:
        for address, original in originals:
            mem.write(address, original)
    finally:
        mem.close()
    ws = None
    while ws is None or not ws.stopped:
        ws = waitpid(child)
        if ws is None or ws.exited:
            return
    pt.try_ptrace(pt.PTRACE_DETACH, child, 0, 0)
