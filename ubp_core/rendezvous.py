"""Trap-free probes with a handler: the thread meets UBP through a futex, not a stop.

A trap-free site (ubp_core.fastcount) jumps to a trampoline instead of trapping.  For a
probe with a handler, the trampoline (built by the arch plugin) saves the thread's
registers into a mailbox in memory shared with UBP, wakes UBP's rendezvous thread with
a futex and sleeps until UBP has run the handler; then it takes the registers back (a
handler may change them as at a trap probe, except the pc -- the thread always goes on
with the relocated instructions -- and the stack pointer, which the trampoline keeps),
runs the relocated instructions and jumps back.  Per hit that is a few futex calls and
two context switches, and no ptrace stop, no register read by system call, no signal
delivery: cheaper than the one stop of a boosted or emulated trap probe.

The mailbox (one page after the shared counters)::

    +0   lock   PI futex word: 0 free, else the owner's tid (| FUTEX_WAITERS)
    +4   state  IDLE / REQUEST (a thread waits) / ANSWERED / CLOSED (UBP is leaving)
    +8   site   which site the waiting thread hit (an index UBP gave the trampoline)
    +12  tid    the waiting thread (copied from the lock word)
    +64  regs   the arch's register file (x86-64: struct user_regs_struct)

Threads take the lock one at a time (UBP runs one handler at a time anyway).  A
thread that hits a probe again while it owns the lock -- a signal handler interrupted
its rendezvous -- gets EDEADLK from the kernel and runs on without the handler, counted
as missed; so does every thread once UBP has closed the mailbox.  UBP leaves by putting
the original bytes back (all threads stopped), then closing: a thread still asleep in
the trampoline wakes, runs the relocated instructions and goes back to the program.

Handlers of these probes run on UBP's rendezvous thread.  UBP serialises them with the
handlers of trap probes (one lock), so a handler never runs concurrently with another.
What such a handler can do: read and change registers, read memory (through
/proc/PID/mem, from any thread); what it cannot: anything that needs a ptrace request
(adding or removing probes: call :meth:`Session.stop` or defer to the main thread).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import mmap

    from .archops import ArchOps
    from .engine import Engine, Probe

log = logging.getLogger("ubp.rendezvous")

LOCK, STATE, SITE, TID, REGS = 0, 4, 8, 12, 64
IDLE, REQUEST, ANSWERED, CLOSED = 0, 1, 2, 3
MAILBOX_BYTES = 4096

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "ppc64le": 221, "s390x": 238}
FUTEX_WAIT, FUTEX_WAKE = 0, 1
#: how long the rendezvous thread sleeps between looks at "should I stop?"
IDLE_WAIT_NS = 100_000_000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _futex_nr() -> int:
    machine = os.uname().machine
    if machine not in _SYS_FUTEX:
        raise OSError(f"no futex system call number known for {machine}")
    return _SYS_FUTEX[machine]


@dataclass(eq=False, slots=True)
class RendezvousSite:
    """What UBP needs when a thread arrives from one site's trampoline."""

    engine: Engine
    probe: Probe
    handler: Callable[[Any], object]


class RendezvousServer:
    """UBP's side of the mailbox: a thread that runs the handlers."""

    def __init__(self, shared: mmap.mmap, offset: int, arch: ArchOps, lock: threading.Lock,
                 engine_for: Callable[[int, Engine], Engine]) -> None:
        self._anchor = (ctypes.c_char * MAILBOX_BYTES).from_buffer(shared, offset)
        base = ctypes.addressof(self._anchor)
        self.state = ctypes.c_uint32.from_address(base + STATE)
        self.site = ctypes.c_uint32.from_address(base + SITE)
        self.tid = ctypes.c_uint32.from_address(base + TID)
        self.regs = arch.rendezvous_regs(shared, offset + REGS)
        self._pc = arch.abi.pc
        self._state_addr = base + STATE
        self.lock = lock
        self.engine_for = engine_for
        self.sites: list[RendezvousSite | None] = []
        self.errors: list[tuple[Probe, BaseException]] = []
        self.served = 0
        self._nr = _futex_nr()
        from .engine import Hit  # engine -> fastcount -> this module: import it late

        self._hit = Hit
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def native_id(self) -> int | None:
        return self._thread.native_id if self._thread is not None else None

    def add(self, site: RendezvousSite) -> int:
        """Register a site; the returned index goes into its trampoline."""
        self.sites.append(site)
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="ubp-rendezvous",
                                            daemon=True)
            self._thread.start()
        return len(self.sites) - 1

    def forget(self, index: int) -> None:
        """The site's patch is gone; a thread already on its way is still answered."""
        entry = self.sites[index]
        if entry is not None:
            self.sites[index] = RendezvousSite(entry.engine, entry.probe, _no_handler)

    def _serve(self) -> None:
        # the hit path, on this side: every ctypes argument costs ~0.1 us here, so each
        # call passes only what its futex operation reads
        state, nr, addr, dispatch = self.state, self._nr, ctypes.c_void_p(self._state_addr), \
            self._dispatch
        idle = _Timespec(0, IDLE_WAIT_NS)
        idle_ref = ctypes.byref(idle)
        while True:
            if self._closing:
                state.value = CLOSED
                _syscall(nr, addr, FUTEX_WAKE, 0x7FFFFFFF)
                return
            seen = state.value
            if seen == REQUEST:
                dispatch()
                state.value = ANSWERED
                _syscall(nr, addr, FUTEX_WAKE, 1)
                continue
            _syscall(nr, addr, FUTEX_WAIT, seen, idle_ref)

    def _dispatch(self) -> None:
        # the hit path: about 1 us of Python per hit, most of it the Hit and the lock
        entry = self.sites[self.site.value]
        if entry is None:
            return
        self.served += 1
        tid, engine, regs = self.tid.value, entry.engine, self.regs
        if tid not in engine.target.threads_:
            engine = self.engine_for(tid, engine)
        with self.lock:
            try:
                entry.handler(self._hit(engine, tid, entry.probe, regs))
            except BaseException as exc:  # nothing may end this thread
                self.errors.append((entry.probe, exc))
                log.warning("handler of probe %s raised %r", entry.probe.label, exc)
        if regs[self._pc] != entry.probe.address:
            # the trampoline goes on at the relocated instructions whatever the pc says
            regs[self._pc] = entry.probe.address
            exc = ValueError("a trap-free probe's handler cannot move the pc (use a trap "
                             "probe for that)")
            self.errors.append((entry.probe, exc))
            log.warning("probe %s: %s", entry.probe.label, exc)

    def close(self, timeout: float = 5.0) -> None:
        """Answer every thread still waiting, and every later arrival, with CLOSED."""
        if self._thread is None or self._closing:
            return
        self._closing = True
        _syscall(self._nr, ctypes.c_void_p(self._state_addr), FUTEX_WAKE, 0x7FFFFFFF)
        self._thread.join(timeout)


def _no_handler(hit: Any) -> None:
    return None
