"""Where the tracer runs relative to the program it traces.

Every hit is a round trip between the traced thread and the tracer.  On one CPU that is
two context switches; on two CPUs each stop also costs a cross-CPU wake-up (an IPI, and
in a VM a VM exit), several times slower here.  So UBP puts itself on the program's CPU
when the program is single-threaded -- it cannot run while one of its threads is stopped
at a probe anyway -- and says so on stderr.  When the program starts a second thread the
pinning would serialise it: UBP gives every thread its original CPUs back (and says so).

Modes: ``auto`` (the above), ``pin`` (tracer and every thread on one CPU, even
multithreaded: the user asked), ``off`` (never touch an affinity).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

log = logging.getLogger("ubp.placement")

MODES = ("auto", "pin", "off")


def _cpu_of(tid: int) -> int | None:
    """The CPU a thread last ran on (field 39 of /proc/TID/stat)."""
    try:
        with open(f"/proc/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[36])
    except (OSError, IndexError, ValueError):
        return None


class Placement:
    def __init__(self, mode: str = "auto") -> None:
        if mode not in MODES:
            raise ValueError(f"placement must be one of {', '.join(MODES)}")
        self.mode = mode
        self.cpu: int | None = None
        self._tracer_mask: set[int] | None = None
        self._saved: dict[int, set[int]] = {}  # tid -> its own mask before we pinned it
        #: UBP's other threads that meet the program (the rendezvous thread of trap-free
        #: handler probes): they go where the tracer goes
        self.companions: set[int] = set()

    @property
    def active(self) -> bool:
        return self.cpu is not None

    def start(self, tids: Iterable[int]) -> None:
        """Pin the tracer and the program's threads to one CPU, if the mode says so."""
        tids = list(tids)
        if self.mode == "off" or (self.mode == "auto" and len(tids) != 1):
            return
        try:
            mine = os.sched_getaffinity(0)
            theirs = os.sched_getaffinity(tids[0])
        except OSError:
            return
        common = sorted(mine & theirs)
        if not common or (len(common) == 1 and len(mine) == 1 and mine == theirs):
            return  # nothing to gain: already one CPU (taskset) or no CPU in common
        where = _cpu_of(tids[0])
        cpu = where if where in common else common[0]
        try:
            for tid in tids:
                self._saved[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, {cpu})
            self._tracer_mask = mine
            os.sched_setaffinity(0, {cpu})
            for tid in self.companions:
                os.sched_setaffinity(tid, {cpu})
        except OSError:
            self.stop()
            return
        self.cpu = cpu
        log.warning("tracer and program pinned to CPU %d (a hit costs several times more "
                    "across CPUs); --placement off to leave CPUs alone", cpu)

    def companion(self, tid: int) -> None:
        """One of UBP's own threads that should run where the tracer runs."""
        self.companions.add(tid)
        if self.cpu is not None:
            try:
                os.sched_setaffinity(tid, {self.cpu})
            except OSError:
                pass

    def thread_started(self, tid: int) -> None:
        """A new thread: ``auto`` gives every thread its CPUs back."""
        if not self.active:
            return
        if self.mode == "pin":
            self._saved.setdefault(tid, set(self._saved_any()))
            return
        self._saved.setdefault(tid, set(self._saved_any()))
        self.stop()
        log.warning("the program started a thread: its CPUs are its own again "
                    "(--placement pin keeps everything on one CPU)")

    def _saved_any(self) -> set[int]:
        return next(iter(self._saved.values()), os.sched_getaffinity(0))

    def stop(self) -> None:
        """Give everybody back their CPUs (at the end, or when threads appear)."""
        for tid, mask in list(self._saved.items()):
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                pass  # the thread is gone
        self._saved.clear()
        if self._tracer_mask is not None:
            for tid in [0, *self.companions]:
                try:
                    os.sched_setaffinity(tid, self._tracer_mask)
                except OSError:
                    pass  # a companion that has ended
            self._tracer_mask = None
        self.cpu = None
