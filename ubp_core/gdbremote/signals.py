"""GDB's own signal numbers (``gdb/signals.def``) versus this host's.

Stop replies and ``C``/``S`` packets carry GDB's numbering, which matches Linux only
for the first six signals; the engine works with the host's :mod:`signal` constants.
"""

from __future__ import annotations

import signal

_GDB_NAMES = {
    1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT",
    8: "SIGFPE", 9: "SIGKILL", 10: "SIGBUS", 11: "SIGSEGV", 12: "SIGSYS", 13: "SIGPIPE",
    14: "SIGALRM", 15: "SIGTERM", 16: "SIGURG", 17: "SIGSTOP", 18: "SIGTSTP",
    19: "SIGCONT", 20: "SIGCHLD", 21: "SIGTTIN", 22: "SIGTTOU", 23: "SIGIO",
    24: "SIGXCPU", 25: "SIGXFSZ", 26: "SIGVTALRM", 27: "SIGPROF", 28: "SIGWINCH",
    30: "SIGUSR1", 31: "SIGUSR2", 32: "SIGPWR",
}
# GDB numbers the real-time signals from 45 (SIG32 .. SIG63 are 45+0 .. 45+31, except
# that SIG32 is 77 in newer tables); the host's SIGRTMIN..SIGRTMAX follow in order.
_RT_BASE_GDB = 45

TO_HOST: dict[int, int] = {}
for _num, _name in _GDB_NAMES.items():
    _sig = getattr(signal, _name, None)
    if _sig is not None:
        TO_HOST[_num] = int(_sig)
FROM_HOST: dict[int, int] = {v: k for k, v in TO_HOST.items()}


def to_host(gdb_signo: int) -> int:
    """The host signal number for a GDB signal number (0 stays 0)."""
    if gdb_signo in TO_HOST:
        return TO_HOST[gdb_signo]
    if 33 <= gdb_signo - _RT_BASE_GDB + 32 <= 63:
        return gdb_signo - _RT_BASE_GDB + 32
    return gdb_signo


def from_host(signo: int) -> int:
    """The GDB signal number for a host signal number (0 stays 0)."""
    if signo in FROM_HOST:
        return FROM_HOST[signo]
    if 33 <= signo <= 63:
        return signo - 32 + _RT_BASE_GDB
    return signo
