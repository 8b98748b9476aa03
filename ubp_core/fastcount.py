"""Trap-free counting probes: a jump to a trampoline that bumps a shared counter.

Where the instructions at a probe site can be relocated, they are replaced by a jump to
a trampoline in an XOL area (read+execute for the program) that adds one to a counter,
runs the relocated instructions and jumps back.  No stop, no system call per hit.

The counters live in a memfd that UBP creates and maps; the program maps the same file
(it opens /proc/<ubp>/fd/N by an injected openat, so both sides share the pages).  UBP
reads them with plain loads while the program runs; a forked child's trampolines count
into the same words, and the counts outlive an exec or the program's exit.

A site qualifies when (the kernel's optprobes apply the same rules):
- the covered instructions (the first ones, at least the jump's size) run the same from
  another address and cannot fault (the plugin's counting_trampoline decides);
- they lie inside one sized function symbol, no direct branch of that function lands
  strictly inside the covered range, and the function has no indirect jump whose
  targets are unknown (a jump table could land there);
- no thread's pc is strictly inside the covered range while the jump is written (all
  threads are stopped for it);
- no trap probe overlaps it.
Otherwise :class:`FastRefused` says why and the caller uses a trap probe.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import DecodeError, MemoryFault, TargetError, UbpError
from .rendezvous import MAILBOX_BYTES

if TYPE_CHECKING:
    from .engine import Engine

PAGE = 4096
COUNTER_BYTES = 1 << 16  # 8192 counters
#: the rendezvous mailbox (ubp_core.rendezvous) follows the counters in the same file
SHARED_BYTES = COUNTER_BYTES + MAILBOX_BYTES
TRAMP_AREA = 16 * PAGE
TRAMP_SIZE = 128  # room for the longest counting trampoline the x86-64 plugin builds (< 100)
RENDEZVOUS_SIZE = 768  # and for a rendezvous trampoline (x86-64: about 600)


class FastRefused(UbpError):
    """This site cannot take a trap-free probe (the message says why)."""


class SharedCounters:
    """Counter words in a memfd mapped by UBP and by every traced program that uses one."""

    def __init__(self, byteorder: str = "little", word: int = 8) -> None:
        self.fd = os.memfd_create("ubp-counters", 0)
        os.ftruncate(self.fd, SHARED_BYTES)
        self.map = mmap.mmap(self.fd, SHARED_BYTES)
        self.byteorder = byteorder
        self.word = word
        self.next = 0

    @property
    def path(self) -> str:
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def alloc(self) -> int:
        if (self.next + 1) * self.word > COUNTER_BYTES:
            raise FastRefused(f"all {COUNTER_BYTES // self.word} counters are in use")
        self.next += 1
        return self.next - 1

    def value(self, index: int) -> int:
        at = index * self.word
        return int.from_bytes(self.map[at:at + self.word], self.byteorder)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@dataclass(eq=False)
class FastSite:
    #: its hits are counted in the shared counter, not here
    hits = 0
    strategy = None
    address: int
    length: int  # bytes covered by the jump and its filler
    original: bytes
    tramp: int
    counter: int  # index in SharedCounters
    text: str  # the covered instructions, for messages
    #: a probe with a handler: its index in the rendezvous server, and its missed-hit
    #: counter (hits that ran without the handler, see ubp_core.rendezvous)
    rendezvous: int | None = None
    missed: int | None = None

    @property
    def end(self) -> int:
        return self.address + self.length


@dataclass(eq=False)
class _Area:
    base: int
    used: int
    counters: int  # where this process sees the shared counters, in reach of base


class FastPatcher:
    """One process's trap-free sites."""

    def __init__(self, engine: Engine, counters: SharedCounters) -> None:
        self.engine = engine
        self.counters = counters
        self.sites: dict[int, FastSite] = {}
        self.areas: list[_Area] = []

    # ------------------------------------------------------------------ queries
    def overlapping(self, start: int, end: int) -> FastSite | None:
        for site in self.sites.values():
            if site.address < end and start < site.end:
                return site
        return None

    def hide(self, address: int, code: bytearray) -> None:
        """Put the original bytes of our patches back into ``code`` read at ``address``."""
        for site in self.sites.values():
            lo, hi = max(site.address, address), min(site.end, address + len(code))
            if lo < hi:
                code[lo - address:hi - address] = site.original[lo - site.address:hi - site.address]

    # ------------------------------------------------------------------ install
    def install(self, address: int, function: tuple[int, int] | None, counter: int,
                rendezvous: tuple[int, int] | None = None) -> FastSite:
        """Patch a jump at ``address``.  ``rendezvous``: (site index, missed counter) for
        a probe whose handler UBP runs at each hit (else the trampoline only counts)."""
        engine, arch = self.engine, self.engine.arch
        need = arch.fast_jump_size
        if need is None:
            raise FastRefused(f"{arch.name} has no trap-free probes")
        if not hasattr(engine.target, "map_shared"):
            raise FastRefused("this target cannot map the counters (live ptrace targets only)")
        if function is None or not function[0] <= address < function[1]:
            raise FastRefused("no sized function symbol contains the site, so nothing proves "
                              "that no branch lands in the bytes the jump would cover")
        start, end = function
        analyses, covered = [], 0
        while covered < need:
            at = address + covered
            if at >= end:
                raise FastRefused(f"the function ends {end - address} byte(s) after the site; "
                                  f"a jump needs {need}")
            try:
                a = engine.analyze(at)
            except (DecodeError, MemoryFault) as exc:
                raise FastRefused(f"cannot decode the instruction at {at:#x}: {exc}") from None
            analyses.append(a)
            covered += a.insn.length
        text = "; ".join(f"{a.insn.mnemonic} {a.insn.op_str}".strip() for a in analyses)
        last = address + covered
        if last > end:
            raise FastRefused("the covered instructions run past the function's end")
        for site in engine.sites.values():
            if address <= site.address < last or site.address < address < site.end:
                raise FastRefused(f"a trap probe at {site.address:#x} lies in the range the "
                                  "jump would cover")
        if self.overlapping(address, last):
            raise FastRefused("another trap-free probe covers these bytes")
        self._check_branches(address, last, start, end)

        size = TRAMP_SIZE if rendezvous is None else RENDEZVOUS_SIZE
        area = self._area(address, size)
        tramp = area.base + area.used
        word = self.counters.word
        counter_addr = area.counters + counter * word
        if rendezvous is None:
            code = arch.counting_trampoline(analyses, tramp, counter_addr)
        else:
            code = arch.rendezvous_trampoline(analyses, tramp, counter_addr,
                                              area.counters + COUNTER_BYTES, rendezvous[0],
                                              area.counters + rendezvous[1] * word)
        if isinstance(code, str):
            raise FastRefused(code)
        if len(code) > size:
            raise FastRefused(f"the trampoline ({len(code)} bytes) is longer than a slot")
        patch = arch.jump_patch(address, tramp, covered)
        if patch is None:
            raise FastRefused("the trampoline is out of the jump's reach")
        original = engine._read_original(address, covered)
        engine.target.write_memory(tramp, code)
        area.used += size
        site = FastSite(address, covered, original, tramp, counter, text,
                        *(rendezvous or (None, None)))
        with engine.target.all_stopped() as tids:
            for tid in tids:
                pc = engine.target.get_regs(tid)[arch.abi.pc]
                if address < pc < last:
                    raise FastRefused(f"thread {tid} is stopped inside the bytes to patch "
                                      f"({pc:#x})")
            engine.target.write_memory(address, patch)
        self.sites[address] = site
        return site

    def _check_branches(self, address: int, last: int, start: int, end: int) -> None:
        engine, arch = self.engine, self.engine.arch
        code = engine._read_original(start, end - start)
        seen = start
        for insn in arch.decode_all(code, start):
            seen = insn.address + insn.length
            try:
                a = engine.analyze(insn.address) if insn.address < last else arch.analyze(insn)
            except (DecodeError, MemoryFault):
                raise FastRefused(f"cannot decode the function at {insn.address:#x}") from None
            targets = arch.branch_targets(a)
            if targets is None:
                raise FastRefused(f"the function has an indirect jump at {insn.address:#x} "
                                  f"({insn.mnemonic} {insn.op_str}) that may land anywhere in it")
            for t in targets:
                if address < t < last:
                    raise FastRefused(f"the instruction at {insn.address:#x} branches to "
                                      f"{t:#x}, inside the bytes the jump would cover")
        if seen < end:
            raise FastRefused(f"the function does not decode past {seen:#x} (data in text?)")

    def _area(self, near: int, size: int) -> _Area:
        arch, target = self.engine.arch, self.engine.target
        reach = arch.branch_reach
        for area in self.areas:
            if area.used + size <= TRAMP_AREA - PAGE and (
                    not reach or abs(area.base - near) < reach - TRAMP_AREA):
                return area
        try:
            base = target.map_xol(near, TRAMP_AREA, reach)
            # the last page holds map_xol's syscall instruction and our path scratch
            counters = target.map_shared(self.counters.path, base, SHARED_BYTES, reach,
                                         scratch=base + TRAMP_AREA - PAGE)
        except TargetError as exc:
            raise FastRefused(str(exc)) from None
        area = _Area(base, 0, counters)
        self.areas.append(area)
        return area

    # ------------------------------------------------------------------ removal
    def remove(self, site: FastSite) -> None:
        """Put the original bytes back (all threads stopped while it is written).

        The trampoline stays: a thread may be running in it, and it jumps back to the
        original code after the covered range, which is unchanged."""
        with self.engine.target.all_stopped():
            self.engine.target.write_memory(site.address, site.original)
        self.sites.pop(site.address, None)

    def remove_all(self) -> None:
        errors = []
        for site in list(self.sites.values()):
            try:
                self.remove(site)
            except (TargetError, MemoryFault) as exc:
                errors.append(exc)
        self.sites.clear()
        if errors:
            raise TargetError(f"could not restore {len(errors)} trap-free site(s): {errors[0]}")

    def clone_for(self, engine: Engine) -> FastPatcher:
        """A forked child: it has the patches, trampolines and (shared) counters too."""
        twin = FastPatcher(engine, self.counters)
        twin.sites = dict(self.sites)
        twin.areas = [_Area(a.base, a.used, a.counters) for a in self.areas]
        return twin
