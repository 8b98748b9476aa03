"""The engine: probe table, breakpoints, XOL slots and the hit path.

One engine drives one target.  It knows no opcode (every instruction fact comes from
the ArchOps plugin) and no operating-system call (every process fact comes from the
Target).  The caller owns the event loop: it waits for stops and hands each one to
:meth:`Engine.handle`, which either consumes it (the thread has been resumed) or
returns False so the caller deals with it (a signal for the program, an exit ...).
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import signal as _signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import policy
from .archops import ArchOps
from .errors import MemoryFault, ProbeError, RefusedError, TargetError
from .fastcount import FastPatcher
from .returns import ReturnProbe, Returns, hijack
from .target import Stop, StopKind, Target
from .types import Analysis, Effect, Regs, Strategy, XolStep
from .xol import XolAllocator

log = logging.getLogger("ubp.engine")

Handler = Callable[["Hit"], Any]


class Hit:
    """What a handler receives: the thread, the probe, and its registers (read/write).

    Writing a register through ``regs`` (or :meth:`set`) changes the thread; setting
    the pc elsewhere skips the probed instruction.
    """

    __slots__ = ("engine", "frame", "probe", "regs", "tid")

    def __init__(self, engine: Engine, tid: int, probe: Probe, regs: Regs) -> None:
        self.engine = engine
        self.tid = tid
        self.frame = None  # a return probe's call (see ubp_core.returns)
        self.probe = probe
        self.regs = regs

    @property
    def pc(self) -> int:
        return self.regs[self.engine.arch.abi.pc]

    @property
    def sp(self) -> int:
        return self.regs[self.engine.arch.abi.sp]

    def arg(self, n: int) -> int:
        """The n-th integer argument (0-based) by the arch's calling convention."""
        args = self.engine.arch.abi.args
        if not 0 <= n < len(args):
            raise IndexError(f"{self.engine.arch.name} passes {len(args)} arguments in registers")
        return self.regs[args[n]]

    @property
    def args(self) -> list[int]:
        return [self.regs[r] for r in self.engine.arch.abi.args]

    @property
    def retval(self) -> int:
        return self.engine.arch.return_value(self.regs)

    @property
    def duration(self) -> float | None:
        """At a return probe: seconds since the call's entry."""
        return None if self.frame is None else (time.monotonic_ns() - self.frame.t0) / 1e9

    @property
    def call_args(self) -> tuple[int, ...]:
        """At a return probe: the integer arguments the call was made with."""
        return () if self.frame is None else self.frame.args

    @property
    def return_address(self) -> int:
        return self.engine.arch.return_address(self.regs, self.engine.target.read_memory)

    def set(self, reg: str, value: int) -> None:
        self.regs[reg] = value & ((1 << 64) - 1)

    def read(self, address: int, size: int) -> bytes:
        return self.engine.target.read_memory(address, size)

    def read_str(self, address: int, limit: int = 256) -> bytes:
        """A NUL-terminated string from target memory, at most ``limit`` bytes."""
        out = bytearray()
        while len(out) < limit:
            chunk_len = min(64, limit - len(out), 4096 - ((address + len(out)) & 4095))
            try:
                chunk = self.read(address + len(out), chunk_len)
            except MemoryFault:
                break
            nul = chunk.find(b"\0")
            if nul >= 0:
                out += chunk[:nul]
                break
            out += chunk
        return bytes(out)


@dataclass(eq=False, slots=True)
class Probe:
    """A handler attached to an address."""

    id: int
    address: int
    handler: Handler | None
    requested: Strategy | None
    label: str
    enabled: bool = True
    hits: int = 0
    site: Site | None = field(default=None, repr=False)
    returns: ReturnProbe | None = field(default=None, repr=False)  # entry of a return probe

    @property
    def strategy(self) -> Strategy | None:
        return self.site.strategy if self.site else None


@dataclass(eq=False, slots=True)
class Site:
    """One breakpoint: the original bytes, the analysis, the chosen strategy, its probes."""

    address: int
    original: bytes
    analysis: Analysis
    strategy: Strategy
    probes: list[Probe] = field(default_factory=list)
    boost_slot: int | None = None
    inserted: bool = False
    handlers: tuple[Probe, ...] = ()  # enabled probes, cached for the hit path
    #: prepared out-of-line steps that depend on nothing but the slot, by slot
    steps: dict[int, XolStep] = field(default_factory=dict)

    def refresh(self) -> None:
        self.handlers = tuple(p for p in self.probes if p.enabled)

    @property
    def end(self) -> int:
        return self.address + self.analysis.insn.length


@dataclass(slots=True)
class ThreadState:
    step: XolStep | None = None
    site: Site | None = None
    inline: bool = False
    boost_step: bool = False  # single-stepping a boost slot to defer a signal
    deferred: list[int] = field(default_factory=list)
    #: the siginfo of each deferred signal (None where the target gives none), so it
    #: reaches the program intact: sigqueue's value, a timer's overrun count ...
    held: list[Any] = field(default_factory=list)


def _setattr_pc(name: str, regs: Regs, value: int) -> None:
    setattr(regs, name, value)


def _setitem_pc(name: str, regs: Regs, value: int) -> None:
    regs[name] = value


ASYNC_DEFAULT_IGNORED = frozenset({_signal.SIGCHLD, _signal.SIGWINCH, _signal.SIGURG})


class Engine:
    """Probes on one target."""

    def __init__(self, target: Target, arch: ArchOps | None = None, *,
                 xol: XolAllocator | None = None, handler_errors: str = "log",
                 inline_freeze: bool = True) -> None:
        self.target = target
        self.arch = arch or target.arch
        self.xol = xol or XolAllocator(target, self.arch.xol_slot_size, self.arch.branch_reach)
        self.sites: dict[int, Site] = {}
        self.probes: dict[int, Probe] = {}
        self.threads: dict[int, ThreadState] = {}
        self.boost_slots: dict[int, Site] = {}
        self.removed: dict[int, int] = {}  # address -> instruction length, for late traps
        self.handler_errors = handler_errors  # "log" or "raise"
        #: stop the other threads while an inline step has the breakpoint out (without
        #: it they can run past the probe unseen: kept only to show that difference)
        self.inline_freeze = inline_freeze
        self.errors: list[tuple[Probe, BaseException]] = []
        self.total_hits = 0
        #: the thread whose inline step is in flight: until it is over, only its stops
        #: may be handled (the breakpoint is out and the others are held)
        self.inline_tid: int | None = None
        self.returns = Returns(self)
        #: set when handlers also run on another thread (trap-free handler probes,
        #: ubp_core.rendezvous): every handler call then takes it
        self.handler_lock: threading.Lock | None = None
        #: trap-free counting sites (ubp_core.fastcount), made on first use
        self.fast: FastPatcher | None = None
        self.cloned: dict[int, object] = {}
        self._ids = itertools.count(1)
        self._slot_code: dict[int, bytes] = {}
        self._pc = self.arch.abi.pc
        self._emulate = self.arch.emulate
        self._read = target.read_memory
        self._bp = self.arch.breakpoint
        self._pc_after = self.arch.pc_after_trap
        if getattr(target, "regs_by_attribute", False):
            self._getpc = operator.attrgetter(self._pc)
            field = getattr(getattr(target, "regs_class", None), self._pc, None)
            # a ctypes field's own setter: a C call, no Python frame on the hit path
            self._setpc = (field.__set__ if hasattr(field, "__set__")
                           else functools.partial(_setattr_pc, self._pc))
        else:
            self._getpc = operator.itemgetter(self._pc)
            self._setpc = functools.partial(_setitem_pc, self._pc)

    # ------------------------------------------------------------------ analysis
    def read_instruction(self, address: int) -> bytes:
        """The original bytes at ``address`` (as if no breakpoint were there)."""
        size = self.arch.max_insn_len
        while True:
            try:
                code = bytearray(self.target.read_memory(address, size))
                break
            except MemoryFault:
                # the instruction may end right before an unmapped page
                page_left = 4096 - (address & 4095)
                if size <= page_left or size <= 1:
                    raise
                size = page_left
        return self._hide_breakpoints(address, code)

    def _hide_breakpoints(self, address: int, code: bytearray) -> bytes:
        # only sites starting within a breakpoint's length before the range can overlap
        # it: look those addresses up (scanning every site made arming n probes O(n^2))
        sites = self.sites
        if len(code) < len(sites):
            near = (sites.get(a) for a in range(address - len(self._bp) + 1,
                                                  address + len(code)))
        else:
            near = iter(sites.values())
        for site in near:
            if site is None:
                continue
            lo = max(site.address, address)
            hi = min(site.address + len(site.original), address + len(code))
            for a in range(lo, hi):
                code[a - address] = site.original[a - site.address]
        if self.fast is not None:
            self.fast.hide(address, code)
        return bytes(code)

    def analyze(self, address: int) -> Analysis:
        """Decode and analyse the original instruction at ``address``."""
        if address % self.arch.insn_alignment:
            raise ProbeError(f"{address:#x} is not aligned to {self.arch.insn_alignment} bytes, "
                             f"so it is not an instruction boundary on {self.arch.name}")
        code = self.read_instruction(address)
        insn = self.arch.decode(code, address)
        return self.arch.analyze_in_context(self.arch.analyze(insn), self._read_original)

    def _read_original(self, address: int, size: int) -> bytes:
        """Code as the program has it, our breakpoints hidden (context for analysis)."""
        return self._hide_breakpoints(address, bytearray(self.target.read_memory(address, size)))

    # ------------------------------------------------------------------ probes
    def add_probe(self, address: int, handler: Handler | None = None, *,
                  strategy: Strategy | str | None = None, label: str | None = None,
                  analysis: Analysis | None = None) -> Probe:
        """Attach ``handler`` at ``address``; the breakpoint goes in at once.

        Raises RefusedError when the instruction cannot be probed (or not with the
        requested strategy) and ProbeError for an address that cannot hold a probe; in
        both cases the target is left untouched.
        """
        requested = Strategy(strategy) if strategy is not None else None
        site = self.sites.get(address)
        if site is not None:
            if requested is not None and requested is not site.strategy:
                raise ProbeError(
                    f"{address:#x} is already probed with strategy {site.strategy.value}; "
                    f"a second probe there cannot use {requested.value}")
        else:
            self._check_overlap(address)
            if analysis is None:
                analysis = self.analyze(address)
            site = self._make_site(address, analysis, requested)
        probe = Probe(next(self._ids), address, handler, requested,
                      label or f"{address:#x}", site=site)
        site.probes.append(probe)
        site.refresh()
        self.probes[probe.id] = probe
        if not site.inserted:
            self._insert(site)
        return probe

    def _check_overlap(self, address: int) -> None:
        if self.fast is not None:
            fs = self.fast.overlapping(address, address + 1)
            if fs is not None:
                raise ProbeError(f"{address:#x} is inside the trap-free probe at "
                                 f"{fs.address:#x} ({fs.text})")
        reach = self.arch.max_insn_len
        near = (self.sites.get(a) for a in range(address - reach + 1, address + reach))
        for site in (s for s in near if s is not None):
            if site.address < address < site.end:
                raise ProbeError(
                    f"{address:#x} is inside the instruction probed at {site.address:#x} "
                    f"({site.analysis.insn.text}); not an instruction boundary")
            if address < site.address < address + self.arch.max_insn_len:
                # the new instruction may cover an existing breakpoint; check its length
                code = self.read_instruction(address)
                insn = self.arch.decode(code, address)
                if site.address < address + insn.length:
                    raise ProbeError(
                        f"the instruction at {address:#x} ({insn.text}) covers the probe at "
                        f"{site.address:#x}; {site.address:#x} is not an instruction boundary")

    def _make_site(self, address: int, analysis: Analysis, requested: Strategy | None) -> Site:
        tries = policy.candidates(analysis, requested,
                                  prefer_boost=self.target.boost_cheaper_than_memory)
        original = self.read_instruction(address)[:len(self._bp)]
        for strategy in tries:
            site = Site(address, original, analysis, strategy)
            if strategy is Strategy.BOOST:
                why = "no XOL slot within reach of the jump back"
                try:
                    slot = self.xol.slot(address)
                except TargetError as exc:
                    slot = None
                    why += f" ({exc})"
                code = self.arch.boost(analysis, slot) if slot is not None else None
                if code is None:
                    if slot is not None:
                        self.xol.release(slot)
                    if requested is Strategy.BOOST:
                        raise RefusedError(f"cannot boost {policy.describe(analysis)}: {why}",
                                           "boost out of reach")
                    continue
                self.target.write_memory(slot, code)
                site.boost_slot = slot
                self.boost_slots[slot] = site
            if strategy is Strategy.SSOL and analysis.ssol_reach:
                near = address if analysis.ssol_near is None else analysis.ssol_near
                try:
                    self.xol.release(self.xol.slot(near, analysis.ssol_reach))
                except TargetError:
                    if requested is Strategy.SSOL:
                        raise RefusedError(
                            f"cannot step {policy.describe(analysis)} out of line: no XOL "
                            f"slot within reach of its operand at {near:#x}",
                            "ssol out of reach") from None
                    continue
            self.sites[address] = site
            return site
        raise RefusedError(f"no usable strategy for {policy.describe(analysis)}", "no strategy")

    def _insert(self, site: Site) -> None:
        self.target.write_memory(site.address, self._bp)
        site.inserted = True
        self.removed.pop(site.address, None)

    def _uninsert(self, site: Site) -> None:
        if site.inserted:
            self.target.write_memory(site.address, site.original)
            site.inserted = False
            self.removed[site.address] = site.analysis.insn.length

    def add_return_probe(self, address: int, handler: Handler | None = None, *,
                         strategy: Strategy | str | None = None,
                         label: str | None = None) -> ReturnProbe:
        """Run ``handler`` at every return of the function whose entry is ``address``.

        The handler's Hit has ``retval``, ``duration`` and ``call_args``.  Raises like
        :meth:`add_probe` when the entry cannot be probed."""
        rp = ReturnProbe(next(self._ids), address, handler, label or f"{address:#x}%return")
        entry = self.add_probe(address, hijack, strategy=strategy, label=rp.label)
        entry.returns = rp
        rp.entry = entry
        self.returns.probes.append(rp)
        return rp

    def enable(self, probe: Probe) -> None:
        probe.enabled = True
        if isinstance(probe, ReturnProbe):
            probe = probe.entry
            probe.enabled = True
        if probe.site:
            probe.site.refresh()

    def disable(self, probe: Probe) -> None:
        """Stop calling the handler; the breakpoint stays while other probes share it."""
        probe.enabled = False
        if isinstance(probe, ReturnProbe):
            probe = probe.entry
            probe.enabled = False
        if probe.site:
            probe.site.refresh()

    def remove_probe(self, probe: Probe) -> None:
        if isinstance(probe, ReturnProbe):
            probe.removed = True  # calls in flight still return through the trampoline
            if probe.entry is not None:
                self.remove_probe(probe.entry)
            return
        site = probe.site
        self.probes.pop(probe.id, None)
        if site is None:
            return
        probe.site = None
        site.probes.remove(probe)
        site.refresh()
        if not site.probes:
            self._uninsert(site)
            del self.sites[site.address]
            # a boost slot stays allocated: a thread may still be running through it

    def patched_bytes(self) -> list[tuple[int, bytes]]:
        """(address, original bytes) of every breakpoint and trap-free jump in the text."""
        out = [(site.address, site.original) for site in self.sites.values() if site.inserted]
        if self.fast is not None:
            out += [(fs.address, fs.original) for fs in self.fast.sites.values()]
        return out

    def remove_all(self) -> None:
        """Put every original byte back.  Safe to call more than once."""
        errors = []
        for site in list(self.sites.values()):
            try:
                self._uninsert(site)
            except Exception as exc:
                errors.append(exc)
        self.sites.clear()
        self.probes.clear()
        if self.fast is not None:
            try:
                self.fast.remove_all()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise TargetError(f"could not restore {len(errors)} breakpoint(s): {errors[0]}")

    # ------------------------------------------------------------------ stops
    def handle(self, stop: Stop) -> bool:
        """Process a stop.  True: consumed, the thread has been resumed (or handed on)."""
        kind = stop.kind
        if kind is StopKind.TRAP:
            return self._on_breakpoint(stop.tid)
        if kind is StopKind.SIGNAL:
            return self._on_signal(stop)
        if kind is StopKind.EXITED:
            self.forget_thread(stop.tid)
        return False

    def stepping(self, tid: int) -> bool:
        """True while ``tid`` is in the middle of an out-of-line or inline step: any
        resume of it must be a single-step until the step's trap comes."""
        return self._stepping(tid)

    def _stepping(self, tid: int) -> bool:
        ts = self.threads.get(tid)
        return ts is not None and (ts.step is not None or ts.boost_step)

    def forget_thread(self, tid: int) -> None:
        self.returns.forget_thread(tid)
        ts = self.threads.pop(tid, None)
        if ts is not None and ts.step is not None:
            self._end_step(tid, ts, resume=False)

    # ------------------------------------------------------------------ the hit path
    def _rewind(self, tid: int, regs: Regs, addr: int) -> None:
        """A hit abandoned (a handler raised through us): leave the thread at the probe's
        address, so whoever takes the breakpoint out next lets it run the instruction
        there (its pc was past the trap, inside the instruction)."""
        self._setpc(regs, addr)
        try:
            self.target.set_regs(tid, regs)
        except TargetError:
            pass
    def _on_breakpoint(self, tid: int, regs: Regs | None = None) -> bool:
        """A SIGTRAP stop of ``tid``: the end of a step, a hit, or not ours (False).
        ``regs``: its registers when the caller has just read them."""
        # the hit path: every line here runs once per hit
        ts = self.threads.get(tid)
        if ts is not None and (ts.step is not None or ts.boost_step):
            self._finish_step(tid, ts)
            return True
        target = self.target
        if regs is None:
            regs = target.get_regs(tid)
        getpc, setpc = self._getpc, self._setpc
        addr = getpc(regs) - self._pc_after
        site = self.sites.get(addr)
        if site is None and addr == self.returns.tramp:
            return self.returns.on_trampoline(tid, regs)
        if site is None or not site.inserted:
            if addr in self.removed:
                # the breakpoint went away while this thread was trapping on it
                setpc(regs, addr)
                target.set_regs(tid, regs)
                target.resume(tid)
                return True
            return False
        setpc(regs, addr)
        self.total_hits += 1
        for probe in site.handlers:
            probe.hits += 1
            handler = probe.handler
            if handler is not None:
                try:
                    lock = self.handler_lock
                    if lock is None:
                        handler(Hit(self, tid, probe, regs))
                    else:
                        with lock:
                            handler(Hit(self, tid, probe, regs))
                except Exception as exc:
                    if self.handler_errors == "raise":
                        self._rewind(tid, regs, addr)
                        raise
                    self.errors.append((probe, exc))
                    log.warning("handler of probe %s raised %r", probe.label, exc)
                except BaseException:
                    self._rewind(tid, regs, addr)  # Ctrl-C or exit inside a handler
                    raise
        if site.handlers and getpc(regs) != addr:
            # a handler redirected the thread: skip the instruction
            target.set_regs(tid, regs)
            target.resume(tid)
            return True
        strategy = site.strategy
        slot = site.boost_slot
        if slot is not None and strategy is Strategy.BOOST:
            setpc(regs, slot)
            target.set_regs_and_resume(tid, regs)
            return True
        if strategy is Strategy.EMULATE:
            # the other one-stop path, straight from here like boost's.  A write that
            # faults leaves it to the slow path, which falls back to a step that faults
            # as the CPU would
            effect = self._emulate(site.analysis, regs, self._read)
            if effect is not None and self._apply(tid, regs, effect, resume=True):
                return True
        try:
            self._execute(tid, site, regs, strategy)
        except BaseException:
            ts = self.threads.get(tid)
            if ts is None or ts.step is None:
                self._rewind(tid, regs, addr)  # no step in flight: back to the probe
            raise
        return True

    #: the hit path's entry for targets that hand traps over directly (ptrace's hub)
    on_trap = _on_breakpoint

    def _execute(self, tid: int, site: Site, regs: Regs, strategy: Strategy) -> None:
        target = self.target
        if strategy is Strategy.BOOST:
            regs[self._pc] = site.boost_slot
            target.set_regs(tid, regs)
            target.resume(tid)
            return
        if strategy is Strategy.EMULATE:
            effect = self.arch.emulate(site.analysis, regs, target.read_memory)
            if effect is not None and self._apply(tid, regs, effect, resume=True):
                return
            strategy = Strategy.SSOL if Strategy.SSOL in site.analysis.strategies else Strategy.INLINE
        ts = self.threads.get(tid)
        if ts is None:
            ts = self.threads[tid] = ThreadState()
        if strategy is Strategy.INLINE:
            slot = site.address
            ts.inline = True
            if self.inline_freeze:
                self.inline_tid = tid
                target.stop_others(tid)
        else:
            an = site.analysis
            slot = self.xol.slot(site.address if an.ssol_near is None else an.ssol_near,
                                 an.ssol_reach)
            ts.inline = False
        step = site.steps.get(slot)
        if step is None:
            step = self.arch.prepare_xol(site.analysis, slot, regs)
            if step.pc_only and not step.state and len(step.regs) == 1 and not ts.inline:
                site.steps[slot] = step
        if ts.inline:
            target.write_memory(slot, step.code)
        elif self._slot_code.get(slot) != step.code:
            target.write_memory(slot, step.code)
            self._slot_code[slot] = step.code
        regs.update(step.regs)
        target.set_regs(tid, regs)
        ts.step = step
        ts.site = site
        target.resume(tid, step=True)

    def _apply(self, tid: int, regs: Regs, effect: Effect, resume: bool = False) -> bool:
        """Apply memory then registers (and let the thread go when ``resume``); False
        when a memory write faulted (nothing applied, the thread still stopped)."""
        target = self.target
        for address, data in effect.mem:
            try:
                target.write_memory(address, data)
            except MemoryFault:
                return False
        regs.update(effect.regs)
        if effect.extra:
            target.set_regs(tid, regs)
            target.set_extra(tid, effect.extra)
            if resume:
                target.resume(tid)
        elif resume:
            target.set_regs_and_resume(tid, regs)
        else:
            target.set_regs(tid, regs)
        return True

    def _finish_step(self, tid: int, ts: ThreadState) -> None:
        target = self.target
        regs = target.get_regs(tid)
        if ts.boost_step:
            site = ts.site
            assert site is not None and site.boost_slot is not None
            pc = regs[self._pc]
            if pc == site.boost_slot:  # not finished (a rep iteration): once more
                target.resume(tid, step=True)
                return
            if pc == site.boost_slot + site.analysis.insn.length:
                regs[self._pc] = site.end
                target.set_regs(tid, regs)
            ts.boost_step = False
            ts.site = None
            self._resume_with_deferred(tid, ts)
            return
        step = ts.step
        assert step is not None
        if step.pc_only:
            regs[self._pc] = regs[self._pc] + step.correction
            target.set_regs(tid, regs)
            self._end_step(tid, ts, resume=True)
            return
        effect = self.arch.post_xol(step, regs, target.read_memory)
        if effect.step_again:
            if effect.regs or effect.mem:
                self._apply(tid, regs, effect)
            target.resume(tid, step=True)
            return
        if not self._apply(tid, regs, effect):
            raise TargetError(f"post-step fixup of {step.analysis.insn.text} could not write memory")
        self._end_step(tid, ts, resume=True)

    def _end_step(self, tid: int, ts: ThreadState, *, resume: bool) -> None:
        step, site = ts.step, ts.site
        ts.step = None
        ts.site = None
        if ts.inline:
            ts.inline = False
            if site is not None and site.address in self.sites and site.probes:
                self.target.write_memory(site.address, self._bp)
            if self.inline_freeze:
                self.inline_tid = None
                self.target.resume_others(tid)
        elif step is not None:
            self.xol.release(step.slot)
        if resume:
            self._resume_with_deferred(tid, ts)

    def _hold(self, ts: ThreadState, stop: Stop) -> None:
        """Defer a signal until the step is over, with its siginfo."""
        ts.deferred.append(stop.signo)
        ts.held.append(stop.siginfo)

    def _resume_with_deferred(self, tid: int, ts: ThreadState) -> None:
        sig = 0
        if ts.deferred:
            sig = ts.deferred.pop(0)
            info = ts.held.pop(0) if ts.held else None
            restore = getattr(self.target, "restore_siginfo", None)
            if info is not None and restore is not None:
                restore(tid, info)  # injected with its own siginfo, not a bare SI_USER
            self._requeue_deferred(tid, ts)
        self.target.resume(tid, signal=sig)

    def _requeue_deferred(self, tid: int, ts: ThreadState) -> None:
        infos = ts.held + [None] * (len(ts.deferred) - len(ts.held))
        for later, info in zip(ts.deferred, infos):
            self.target_requeue(tid, later, info)
        ts.deferred.clear()
        ts.held.clear()

    def target_requeue(self, tid: int, signo: int, info: Any = None) -> None:
        requeue = getattr(self.target, "queue_signal", None)
        if requeue is None:
            log.warning("signal %d to thread %d lost: target cannot queue signals", signo, tid)
        elif info is not None:
            requeue(tid, signo, info)
        else:
            requeue(tid, signo)

    def _end_leaving_signals(self, tid: int, ts: ThreadState) -> None:
        self._end_step(tid, ts, resume=False)
        self._requeue_deferred(tid, ts)

    def _on_signal(self, stop: Stop) -> bool:
        tid = stop.tid
        ts = self.threads.get(tid)
        target = self.target
        if ts is not None and ts.step is not None:
            step = ts.step
            regs = target.get_regs(tid)
            pc = regs[self._pc]
            if stop.fault and pc == step.slot:
                # the instruction itself faulted: make it fault at its own address
                effect = self.arch.abort_xol(step, regs, target.read_memory)
                self._apply(tid, regs, effect)
                self._fault_at(tid, stop, step.slot, regs[self._pc])
                self._end_leaving_signals(tid, ts)
                return False  # the caller delivers the signal, pc now at the original
            if pc != step.slot:
                # the instruction has run: a system call that this signal interrupted
                # comes back here.  Fix it up now and let the signal in, as it would have
                # come in place (the kernel restarts the call at the original address).
                effect = self.arch.post_xol(step, regs, target.read_memory)
                if not effect.step_again and self._apply(tid, regs, effect):
                    self._end_leaving_signals(tid, ts)
                    return False
            # not started yet: hold the signal until the instruction is done
            self._hold(ts, stop)
            target.resume(tid, step=True)
            return True
        if ts is not None and ts.boost_step:
            self._hold(ts, stop)
            target.resume(tid, step=True)
            return True
        if not self.boost_slots:
            return False
        regs = target.get_regs(tid)
        pc = regs[self._pc]
        area = self.xol.area_of(pc)
        if area is None:
            return False
        slot = area.base + (pc - area.base) // area.slot_size * area.slot_size
        site = self.boost_slots.get(slot)
        if site is None:
            return False
        offset = pc - slot
        if offset == 0:
            if stop.fault:
                regs[self._pc] = site.address
                target.set_regs(tid, regs)
                self._fault_at(tid, stop, slot, site.address)
                return False
            ts = self.threads.setdefault(tid, ThreadState())
            ts.boost_step = True
            ts.site = site
            self._hold(ts, stop)
            target.resume(tid, step=True)
            return True
        if offset == site.analysis.insn.length:
            regs[self._pc] = site.end
            target.set_regs(tid, regs)
        return False

    def _fault_at(self, tid: int, stop: Stop, slot: int, address: int) -> None:
        """A fault's si_addr that names the slot (SIGFPE, SIGILL, SIGBUS give the
        instruction's address) must name the probed instruction, as it would in place."""
        at = stop.fault_addr
        if at is not None and slot <= at < slot + self.arch.xol_slot_size:
            fix = getattr(self.target, "set_fault_addr", None)
            if fix is not None:
                fix(tid, address + (at - slot))

    # ------------------------------------------------------------------ processes
    def clone_for(self, target: Target, forking_tid: int | None = None) -> Engine:
        """The same probes in a forked copy of the address space (breakpoints, XOL
        areas, boost slots and hijacked return addresses are already there: fork copied
        them).  ``twin.cloned`` maps id(original probe) -> its copy."""
        in_flight = {ts.step.slot for ts in self.threads.values() if ts.step is not None}
        twin = Engine(target, self.arch, xol=self.xol.clone_for(target, in_flight),
                      handler_errors=self.handler_errors, inline_freeze=self.inline_freeze)
        mapping: dict[int, object] = {}
        for rp in self.returns.probes:
            copy_rp = ReturnProbe(next(twin._ids), rp.address, rp.handler, rp.label,
                                  rp.enabled, removed=rp.removed)
            mapping[id(rp)] = copy_rp
            twin.returns.probes.append(copy_rp)
        for addr, site in self.sites.items():
            copy = Site(site.address, site.original, site.analysis, site.strategy,
                        boost_slot=site.boost_slot, inserted=site.inserted)
            for p in site.probes:
                q = Probe(next(twin._ids), p.address, p.handler, p.requested, p.label,
                          p.enabled, site=copy)
                if p.returns is not None:
                    q.returns = mapping[id(p.returns)]
                    q.returns.entry = q
                mapping[id(p)] = q
                copy.probes.append(q)
                twin.probes[q.id] = q
            copy.refresh()
            twin.sites[addr] = copy
        twin.returns.tramp = self.returns.tramp
        if forking_tid is not None:
            twin.returns.copy_thread(self.returns, forking_tid, target.pid, mapping)
        twin.cloned = mapping
        if self.fast is not None:
            twin.fast = self.fast.clone_for(twin)
        twin.boost_slots = {slot: twin.sites.get(site.address, site)
                            for slot, site in self.boost_slots.items()}
        twin.removed = dict(self.removed)
        twin._slot_code = dict(self._slot_code)
        return twin

    def leave_xol(self) -> None:
        """Before letting go of a target: no stopped thread may stay inside a boost slot
        (its copy and jump back stay mapped, but say so plainly: move it out)."""
        for tid in self.target.threads():
            try:
                regs = self.target.get_regs(tid)
            except TargetError:
                continue
            pc = regs[self._pc]
            area = self.xol.area_of(pc)
            if area is None:
                continue
            slot = area.base + (pc - area.base) // area.slot_size * area.slot_size
            site = self.boost_slots.get(slot)
            if site is None:
                continue
            if pc == slot:
                regs[self._pc] = site.address
            elif pc == slot + site.analysis.insn.length:
                regs[self._pc] = site.end
            else:
                continue
            self.target.set_regs(tid, regs)

    # ------------------------------------------------------------------ driving
    def run_until_foreign(self, tid: int, *, max_hits: int | None = None,
                          timeout: float | None = None) -> Stop:
        """Resume ``tid`` and handle stops until one the engine does not consume.

        For single-threaded targets (reference CPUs).  ``max_hits`` bounds the probe
        hits handled, after which a TIMEOUT stop is returned.
        """
        self.target.resume(tid)
        start_hits = self.total_hits
        while True:
            stop = self.target.wait(timeout)
            if stop.kind is StopKind.TIMEOUT:
                return stop
            if max_hits is not None and self.total_hits - start_hits >= max_hits \
                    and stop.kind is StopKind.TRAP and not self._stepping(tid):
                return Stop(tid, StopKind.TIMEOUT)  # the thread stays stopped
            if not self.handle(stop):
                return stop
