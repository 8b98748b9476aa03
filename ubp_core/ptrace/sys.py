"""ptrace(2), waitpid(2) and friends through ctypes; no compiled code of our own."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

from ..errors import TargetError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_ptrace = _libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

PTRACE_TRACEME = 0
PTRACE_PEEKDATA = 2
PTRACE_POKEDATA = 5
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_ATTACH = 16
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_SETSIGINFO = 0x4203
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_SYSCALL_INFO_ENTRY = 1
PTRACE_SYSCALL_INFO_EXIT = 2
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208

PTRACE_O_TRACESYSGOOD = 0x01
PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEVFORK = 0x04
PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_TRACEVFORKDONE = 0x20
PTRACE_O_TRACEEXIT = 0x40
PTRACE_O_EXITKILL = 0x100000

PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_VFORK_DONE = 5
PTRACE_EVENT_EXIT = 6
PTRACE_EVENT_STOP = 128

NT_PRSTATUS = 1
NT_PRFPREG = 2
NT_X86_XSTATE = 0x202

SYS_tgkill = 234
SYS_rt_tgsigqueueinfo = 297
SI_TKILL = -6
SYS_gettid = 186

WALL = 0x40000000
__WALL = WALL


class SigInfo(ctypes.Structure):
    _fields_ = [
        ("si_signo", ctypes.c_int),
        ("si_errno", ctypes.c_int),
        ("si_code", ctypes.c_int),
        ("_pad0", ctypes.c_int),
        ("si_addr", ctypes.c_uint64),  # also si_pid/si_uid for SI_USER
        ("_rest", ctypes.c_byte * 112),
    ]


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class PtraceError(TargetError):
    def __init__(self, request: str, pid: int, err: int) -> None:
        super().__init__(f"ptrace({request}, {pid}) failed: {os.strerror(err)}")
        self.errno = err
        self.pid = pid


_NAMES = {v: k for k, v in globals().items() if k.startswith("PTRACE_") and isinstance(v, int)
          and not k.startswith("PTRACE_O_") and not k.startswith("PTRACE_EVENT_")}


def ptrace(request: int, pid: int, addr: int | None = 0, data: object = 0) -> int:
    ctypes.set_errno(0)
    res = _ptrace(request, pid, addr, data)
    if res == -1:
        err = ctypes.get_errno()
        if err and request not in (PTRACE_PEEKDATA,):
            raise PtraceError(_NAMES.get(request, str(request)), pid, err)
        if err:
            raise PtraceError("PEEKDATA", pid, err)
    return res


def try_ptrace(request: int, pid: int, addr: int | None = 0, data: object = 0) -> int:
    """ptrace returning -errno instead of raising (for hot paths that handle ESRCH)."""
    ctypes.set_errno(0)
    res = _ptrace(request, pid, addr, data)
    if res == -1:
        err = ctypes.get_errno()
        if err:
            return -err
    return res


def tgkill(tgid: int, tid: int, sig: int) -> None:
    if _syscall(SYS_tgkill, ctypes.c_int(tgid), ctypes.c_int(tid), ctypes.c_int(sig)) < 0:
        err = ctypes.get_errno()
        if err != errno.ESRCH:
            raise OSError(err, os.strerror(err))


def tgsigqueueinfo(tgid: int, tid: int, sig: int, info: SigInfo) -> None:
    """Queue ``sig`` with ``info`` (only user-made si_codes: the kernel refuses others)."""
    if _syscall(SYS_rt_tgsigqueueinfo, ctypes.c_int(tgid), ctypes.c_int(tid),
                ctypes.c_int(sig), ctypes.c_void_p(ctypes.addressof(info))) < 0:
        err = ctypes.get_errno()
        if err != errno.ESRCH:
            raise OSError(err, os.strerror(err))


def traceme() -> None:
    if _ptrace(PTRACE_TRACEME, 0, None, None) < 0:
        os._exit(126)


def getsiginfo(tid: int) -> SigInfo:
    info = SigInfo()
    ptrace(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(info))
    return info


def setsiginfo(tid: int, info: SigInfo) -> None:
    ptrace(PTRACE_SETSIGINFO, tid, 0, ctypes.addressof(info))


def geteventmsg(tid: int) -> int:
    msg = ctypes.c_ulong()
    ptrace(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(msg))
    return msg.value


def getregset(tid: int, note: int, buf: ctypes.Array) -> int:
    iov = IoVec(ctypes.addressof(buf), ctypes.sizeof(buf))
    ptrace(PTRACE_GETREGSET, tid, note, ctypes.addressof(iov))
    return iov.iov_len


def setregset(tid: int, note: int, buf: ctypes.Array, size: int) -> None:
    iov = IoVec(ctypes.addressof(buf), size)
    ptrace(PTRACE_SETREGSET, tid, note, ctypes.addressof(iov))


class SyscallInfo(ctypes.Structure):
    _fields_ = [("op", ctypes.c_uint8), ("_pad", ctypes.c_uint8 * 3), ("arch", ctypes.c_uint32),
                ("instruction_pointer", ctypes.c_uint64), ("stack_pointer", ctypes.c_uint64),
                ("nr_or_rval", ctypes.c_uint64), ("_rest", ctypes.c_uint64 * 7)]


def syscall_op(tid: int) -> int | None:
    """PTRACE_SYSCALL_INFO_ENTRY/EXIT for a thread at a syscall stop (None: unknown)."""
    info = SyscallInfo()
    res = try_ptrace(PTRACE_GET_SYSCALL_INFO, tid, ctypes.sizeof(info), ctypes.addressof(info))
    if res <= 0:
        return None
    return info.op


_mask = ctypes.c_uint64()
_mask_addr = ctypes.addressof(_mask)


def getsigmask(tid: int) -> int:
    """The thread's blocked-signal mask (-1: could not read it)."""
    if _ptrace(PTRACE_GETSIGMASK, tid, 8, _mask_addr) < 0:
        return -1
    return _mask.value


def setsigmask(tid: int, mask: int) -> None:
    value = ctypes.c_uint64(mask)
    ptrace(PTRACE_SETSIGMASK, tid, 8, ctypes.addressof(value))
