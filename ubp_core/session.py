"""Tracing live programs: processes, threads, forks, execs, libraries loaded later.

A :class:`Session` traces one program (spawned or attached) and, by default, every
process it forks.  Probes are given as specs (``libc:malloc``, ``main+0x10``,
``0x401136``); they are resolved in each process as its files are mapped, armed when
the library that holds them appears (dlopen included), and re-resolved after an exec.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .archops import ArchOps
from .elfinfo import elf_ident_of
from .engine import Engine, Hit, Probe
from .errors import MemoryFault, ProbeError, TargetError, UbpError
from .fastcount import COUNTER_BYTES, FastPatcher, FastRefused, FastSite, SharedCounters
from .placement import Placement
from .plugins import PluginSet, default_plugins
from .ptrace import sys as pt
from .ptrace.memory import ProcMem
from .ptrace.process import (
    reap_traced_threads,
    release_child,
    spawn_traced,
    task_ids,
    task_state,
)
from .ptrace.target import OPTIONS, Hub, PtraceTarget, reblock_sigtrap, sigtrap_pending
from .rendezvous import REGS, RendezvousServer, RendezvousSite
from .spec import ProbeSpec, parse_spec
from .symbols import NotYet, Resolver
from .target import Stop, StopKind
from .types import Strategy
from .xol import XolAllocator

log = logging.getLogger("ubp.session")

RT_CONSISTENT = 0
R_STATE_OFFSET = 24  # struct r_debug: int r_version; link_map *r_map; r_brk; r_state


class AttachError(TargetError):
    pass


@dataclass(eq=False)
class TraceProbe:
    """A probe as the user asked for it: one spec, armed in every traced process."""

    spec: ProbeSpec
    handler: Callable[[Hit], object] | None
    strategy: Strategy | None
    #: hits in processes that are gone (the live ones are counted by their engines)
    past_hits: int = 0
    enabled: bool = True
    attached: dict[int, Probe] = field(default_factory=dict)  # pid -> engine probe
    address: int | None = None  # where it was first armed
    module: str | None = None
    chosen: Strategy | None = None
    error: str | None = None
    #: for a pattern spec: one probe per matching function, by "module:symbol"
    children: dict[str, TraceProbe] = field(default_factory=dict)
    skipped: int = 0  # pattern matches that cannot be probed (refused instructions)

    label_override: str | None = None
    #: trap-free counting asked for (ubp_core.fastcount): its shared counter, and why a
    #: process had to use a trap probe instead
    fast: bool = False
    counters: SharedCounters | None = field(default=None, repr=False)
    counter: int | None = None
    fast_note: str | None = None
    fast_sites: int = 0  # processes in which it went in trap-free
    #: a trap-free probe with a handler: hits that ran without it (ubp_core.rendezvous)
    missed_counter: int | None = None

    @property
    def missed(self) -> int:
        if self.missed_counter is None or self.counters is None:
            return 0
        return self.counters.value(self.missed_counter)

    @property
    def hits(self) -> int:
        n = self.past_hits + sum(p.hits for p in self.attached.values() if p is not None)
        if self.counter is not None and self.counters is not None:
            n += self.counters.value(self.counter)
        return n

    @property
    def strategy_name(self) -> str | None:
        if self.fast_sites:
            return "trap-free"
        return self.chosen.value if self.chosen else None

    def detach_from(self, pid: int) -> None:
        """Forget the process (gone, exec'ed, released), keeping its hits."""
        p = self.attached.pop(pid, None)
        if p is not None:
            self.past_hits += p.hits

    @property
    def label(self) -> str:
        return self.label_override or self.spec.text

    def flat(self) -> list[TraceProbe]:
        """This probe, or for a pattern the probes it expanded to."""
        return list(self.children.values()) if self.spec.is_glob else [self]

    def as_dict(self) -> dict:
        return {"spec": self.label, "address": self.address,
                "strategy": self.strategy_name, "hits": self.hits,
                **({"error": self.error} if self.error else {}),
                **({"fast_refused": self.fast_note} if self.fast_note else {}),
                **({"missed": self.missed} if self.missed_counter is not None else {})}


@dataclass(eq=False)
class Process:
    target: PtraceTarget
    engine: Engine
    resolver: Resolver
    startup_done: bool = False
    started: bool = False
    r_debug: int | None = None
    internal: list[Probe] = field(default_factory=list)
    globbed: dict[int, tuple] = field(default_factory=dict)  # pattern -> layout expanded

    @property
    def pid(self) -> int:
        return self.target.pid


class Session:
    """Trace one program and its children."""

    def __init__(self, hub: Hub, arch: ArchOps, *, follow_forks: bool = True,
                 plugins: PluginSet | None = None, inline_freeze: bool = True,
                 placement: str = "off") -> None:
        self.hub = hub
        self.arch = arch
        self.plugins = plugins or default_plugins()
        self.follow_forks = follow_forks
        self.inline_freeze = inline_freeze
        self.placement = Placement(placement)
        self.processes: dict[int, Process] = {}
        self.probes: list[TraceProbe] = []
        #: trap-free probes' counters, shared with the programs (made on first use)
        self.counters: SharedCounters | None = None
        #: runs the handlers of trap-free probes (made on first use); every handler,
        #: trap-free or not, then runs under handler_lock
        self.rendezvous: RendezvousServer | None = None
        self.handler_lock = threading.Lock()
        self.main_pid: int | None = None
        self.exit_status: int | None = None
        self.spawned = False
        self._stop_requested = False
        self._tracer_thread = threading.get_ident()  # ptrace requests work only from it
        self._fatal: UbpError | None = None
        self._vfork_children: dict[int, Process] = {}  # child tid -> parent process
        self._newborn: set[int] = set()  # children not stopped yet
        self.start_time = time.monotonic()

    # ------------------------------------------------------------------ creation
    @classmethod
    def spawn(cls, argv: Sequence[str], env: dict[str, str] | None = None, *,
              exitkill: bool = False, **kw) -> Session:
        path = _which(argv[0])
        plugins = kw.pop("plugins", None) or default_plugins()
        arch = plugins.arch_for_elf(elf_ident_of(path), path)
        options = OPTIONS | (pt.PTRACE_O_EXITKILL if exitkill else 0)
        pid = spawn_traced([path, *argv[1:]], env, options, settle=True)
        hub = Hub()
        s = cls(hub, arch, plugins=plugins, **kw)
        s.spawned = True
        s.main_pid = pid
        target = PtraceTarget(pid, arch, hub, spawned=True)
        target.add_thread(pid, stopped=True)
        s._add_process(target)
        return s

    @classmethod
    def attach(cls, pid: int, *, exitkill: bool = False, **kw) -> Session:
        plugins = kw.pop("plugins", None) or default_plugins()
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except FileNotFoundError:
            raise AttachError(f"no process {pid}") from None
        except PermissionError:
            raise AttachError(_eperm(pid)) from None
        arch = plugins.arch_for_elf(elf_ident_of(f"/proc/{pid}/exe"), exe)
        hub = Hub()
        s = cls(hub, arch, plugins=plugins, **kw)
        s.main_pid = pid
        options = OPTIONS | (pt.PTRACE_O_EXITKILL if exitkill else 0)
        target = PtraceTarget(pid, arch, hub, spawned=False)
        seized: list[int] = []
        tried: set[int] = set()
        try:
            # until a listing shows no thread we have not tried: a thread that is not
            # seized yet may create threads meanwhile, and those are not attached by
            # PTRACE_O_TRACECLONE; left untraced, the first breakpoint they reach kills
            # the program with SIGTRAP (seen: a program still starting its threads)
            while True:
                tids = sorted(set(_task_ids(pid)) - tried)
                if not tids:
                    break
                for tid in tids:
                    tried.add(tid)
                    res = pt.try_ptrace(pt.PTRACE_SEIZE, tid, 0, options)
                    if res < 0:
                        if -res == 1 or -res == 13:  # EPERM, EACCES
                            raise AttachError(_eperm(pid))
                        if -res == 3:  # ESRCH: the thread just exited
                            continue
                        raise AttachError(f"cannot attach to {tid}: {os.strerror(-res)}")
                    seized.append(tid)
                    target.add_thread(tid)
        except AttachError:
            for tid in seized:
                pt.try_ptrace(pt.PTRACE_DETACH, tid, 0, 0)
            raise
        # stop one thread so symbols can be resolved and probes inserted
        leader = pid if pid in target.threads_ else seized[0]
        for early in target.stop_thread(leader):
            if early.kind is StopKind.EVENT and early.event == "exec":
                # caught inside execve (a program just started by its parent): the image
                # is the new one now, which is what UBP reads next.  Handled later, the
                # event would make UBP forget the breakpoints it is about to put in it.
                target.reopen_memory()
                continue
            target.queue.append(early)
        s._add_process(target)
        return s

    def _add_process(self, target: PtraceTarget, engine: Engine | None = None) -> Process:
        if engine is None:
            xol = XolAllocator(target, self.arch.xol_slot_size, self.arch.branch_reach)
            engine = Engine(target, self.arch, xol=xol, inline_freeze=self.inline_freeze)
        if self.rendezvous is not None:
            engine.handler_lock = self.handler_lock
        proc = Process(target, engine, Resolver(target.pid, self.arch))
        target.on_trap = engine.on_trap
        self.processes[target.pid] = proc
        return proc

    # ------------------------------------------------------------------ probes
    def probe(self, spec: str | ProbeSpec, handler: Callable[[Hit], object] | None = None, *,
              strategy: Strategy | str | None = None, fast: bool = False) -> TraceProbe:
        """Add a probe; it is armed in every traced process that has (or loads) it.

        Raises ProbeError/RefusedError at once when the spec is malformed, names
        something that cannot exist, or an instruction that cannot be probed; the target
        is then left untouched.

        ``fast``: a trap-free probe: a jump to a trampoline instead of a breakpoint.
        Without a handler the program counts its own hits in memory shared with UBP
        (ubp_core.fastcount); with one, the thread meets UBP through a futex and the
        handler runs on UBP's rendezvous thread before the thread goes on
        (ubp_core.rendezvous).  Where a site cannot take one, a trap probe does the
        same and ``fast_note`` says why.
        """
        ps = spec if isinstance(spec, ProbeSpec) else parse_spec(spec)
        if fast and (ps.ret or strategy is not None):
            raise ProbeError(f"probe {ps.text!r}: a trap-free probe takes entries only, "
                             "with or without a handler (no %return, no strategy)")
        tp = TraceProbe(ps, handler, Strategy(strategy) if strategy else None, fast=fast)
        for proc in list(self.processes.values()):
            self._arm(proc, tp, final=self._final(proc))
        self.probes.append(tp)
        return tp

    def _final(self, proc: Process) -> bool:
        return proc.startup_done or not self.spawned

    def _arm(self, proc: Process, tp: TraceProbe, final: bool) -> bool:
        """Arm ``tp`` in ``proc`` if it resolves there; NotYet leaves it pending."""
        if tp.spec.is_glob:
            return self._arm_glob(proc, tp)
        if proc.pid in tp.attached:
            return True
        try:
            where = proc.resolver.resolve(tp.spec, final=final)
        except NotYet:
            return False
        if tp.fast:
            probe = self._add_fast(proc, tp, where.address, tp.spec.text)
        elif tp.spec.ret:
            probe = proc.engine.add_return_probe(where.address, self._dispatch(tp),
                                                 strategy=tp.strategy, label=tp.spec.text)
            if not tp.enabled:
                proc.engine.disable(probe)
        else:
            probe = proc.engine.add_probe(where.address, self._dispatch(tp),
                                          strategy=tp.strategy, label=tp.spec.text)
            probe.enabled = tp.enabled
            probe.site.refresh()
        tp.attached[proc.pid] = probe
        if tp.address is None:
            tp.address, tp.module = where.address, where.module
            tp.chosen = None if isinstance(probe, FastSite) else probe.strategy
        return True

    def _arm_glob(self, proc: Process, tp: TraceProbe) -> bool:
        layout = proc.resolver.layout_key()
        if proc.globbed.get(id(tp)) == layout:
            return True  # nothing mapped or unmapped since the last expansion
        try:
            matches = proc.resolver.resolve_glob(tp.spec)
        except NotYet:
            return False
        proc.globbed[id(tp)] = layout
        seen = set()
        for where in matches:
            if where.address in seen:
                continue
            seen.add(where.address)
            name = f"{os.path.basename(where.module or '')}:{where.symbol}"
            child = tp.children.get(name)
            if child is None:
                child = TraceProbe(parse_spec(name) if _plain(name) else tp.spec, tp.handler,
                                   tp.strategy, fast=tp.fast)
                child.label_override = name
                tp.children[name] = child
            if proc.pid in child.attached:
                continue
            try:
                if tp.fast:
                    probe = self._add_fast(proc, child, where.address, name)
                else:
                    probe = proc.engine.add_probe(where.address, self._dispatch(child),
                                                  strategy=tp.strategy, label=name)
                    probe.enabled = tp.enabled
                    probe.site.refresh()
            except UbpError as exc:
                child.error = str(exc)
                tp.skipped += 1
                continue
            child.attached[proc.pid] = probe
            if child.address is None:
                child.address, child.module = where.address, where.module
                child.chosen = None if isinstance(probe, FastSite) else probe.strategy
        tp.attached[proc.pid] = None  # type: ignore[assignment]
        return True

    def _add_fast(self, proc: Process, tp: TraceProbe, address: int, label: str):
        """A trap-free site, or a trap probe with the same handler (and the reason)."""
        index = None
        try:
            counters = self._shared_counters()
            if tp.counter is None:
                tp.counters, tp.counter = counters, counters.alloc()
            engine = proc.engine
            if engine.fast is None:
                engine.fast = FastPatcher(engine, counters)
            meet = None
            if tp.handler is not None:
                if tp.missed_counter is None:
                    tp.missed_counter = counters.alloc()
                server = self._rendezvous()
                index = server.add(RendezvousSite(
                    engine, Probe(-1, address, tp.handler, None, label), tp.handler))
                if server.native_id is not None:
                    self.placement.companion(server.native_id)
                meet = (index, tp.missed_counter)
            site = engine.fast.install(address, proc.resolver.function_at(address), tp.counter,
                                       meet)
            tp.fast_sites += 1
            return site
        except FastRefused as exc:
            tp.fast_note = str(exc)
            if index is not None:
                self.rendezvous.sites[index] = None
        probe = proc.engine.add_probe(address, self._dispatch(tp), label=label)
        return probe

    def _shared_counters(self) -> SharedCounters:
        if self.counters is None:
            self.counters = SharedCounters(self.arch.byteorder, self.arch.word_bits // 8)
        return self.counters

    def _rendezvous(self) -> RendezvousServer:
        if self.rendezvous is None:
            shared = self._shared_counters().map
            try:
                self.arch.rendezvous_regs(shared, COUNTER_BYTES + REGS)
            except NotImplementedError as exc:
                raise FastRefused(str(exc)) from None
            self.rendezvous = RendezvousServer(shared, COUNTER_BYTES, self.arch,
                                               self.handler_lock, self._engine_of)
            for proc in self.processes.values():
                proc.engine.handler_lock = self.handler_lock
        return self.rendezvous

    def _engine_of(self, tid: int, guess: Engine) -> Engine:
        """The engine of the process thread ``tid`` belongs to (a forked child's
        trampolines are its parent's, so the site alone does not say)."""
        if tid in guess.target.threads_:
            return guess
        for proc in list(self.processes.values()):
            if tid in proc.target.threads_:
                return proc.engine
        return guess

    def _close_rendezvous(self) -> None:
        if self.rendezvous is not None:
            self.rendezvous.close()

    @staticmethod
    def _dispatch(tp: TraceProbe) -> Callable[[Hit], object] | None:
        # the engine counts hits per probe: the user's handler is called as it is
        return tp.handler

    def _every(self, tp: TraceProbe | None = None) -> list[TraceProbe]:
        """Probes with engine attachments: plain ones and the expansions of patterns."""
        tps = [tp] if tp is not None else self.probes
        return [t for top in tps for t in ([top, *list(top.children.values())])]

    def enable(self, tp: TraceProbe) -> None:
        if tp.fast:
            raise ProbeError(f"probe {tp.spec.text!r} is trap-free: it cannot be "
                             "enabled, only removed")
        for t in self._every(tp):
            t.enabled = True
            for pid, p in t.attached.items():
                if p is not None:
                    self.processes[pid].engine.enable(p)

    def disable(self, tp: TraceProbe) -> None:
        if tp.fast:
            raise ProbeError(f"probe {tp.spec.text!r} is trap-free: it cannot be "
                             "disabled, only removed")
        for t in self._every(tp):
            t.enabled = False
            for pid, p in t.attached.items():
                if p is not None:
                    self.processes[pid].engine.disable(p)

    def remove(self, tp: TraceProbe) -> None:
        for t in self._every(tp):
            for pid, p in list(t.attached.items()):
                proc = self.processes.get(pid)
                if proc is not None and isinstance(p, FastSite):
                    proc.engine.fast.remove(p)
                    if p.rendezvous is not None and self.rendezvous is not None:
                        self.rendezvous.forget(p.rendezvous)
                elif proc is not None and p is not None:
                    proc.engine.remove_probe(p)
                t.detach_from(pid)
        if tp in self.probes:
            self.probes.remove(tp)

    def stop(self) -> None:
        """Ask :meth:`run` to detach and return (callable from a handler, or from any
        other thread: a run blocked waiting for the program is woken)."""
        self._stop_requested = True
        self.hub.leave = True
        if threading.get_ident() != self._tracer_thread:
            self.hub.nudge()

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    # ------------------------------------------------------------------ startup / libraries
    def _watch_libraries(self, proc: Process) -> None:
        """An internal probe on the dynamic linker's rendezvous function: it runs when
        the set of loaded libraries is about to change (RT_ADD) and when it has
        (RT_CONSISTENT).  In between, the thread's system calls are watched: after each
        mmap, probes of the libraries that appeared are armed before their code runs
        (IFUNC resolvers, libc's early initialisation, constructors)."""
        for mod in proc.resolver.modules.values():
            try:
                brk = mod.by_name.get("_dl_debug_state")
                if brk is None:
                    continue
                addr = mod.runtime(brk.address)
                if addr is None:
                    continue
                rdebug = mod.image.data_symbol("_r_debug")  # (only the linker has it)
            except UbpError:
                continue
            proc.r_debug = mod.runtime(rdebug, code=False) if rdebug else None
            p = proc.engine.add_probe(addr, self._rbrk_hit, label="<dynamic linker>")
            proc.internal.append(p)
            return
        # a static program: everything is there from the start
        proc.startup_done = True

    def _rbrk_hit(self, hit: Hit) -> None:
        # by engine, not by closure: a forked child's copy of this probe is its own
        for proc in self.processes.values():
            if proc.engine is hit.engine:
                self._on_rbrk(proc, hit)
                return

    def _r_state(self, proc: Process) -> int:
        if proc.r_debug is None:
            return RT_CONSISTENT
        try:
            raw = proc.target.read_memory(proc.r_debug + R_STATE_OFFSET, 4)
        except MemoryFault:
            return RT_CONSISTENT
        return int.from_bytes(raw, self.arch.byteorder)

    def _on_rbrk(self, proc: Process, hit: Hit) -> None:
        if self._r_state(proc) != RT_CONSISTENT:
            proc.target.watch_syscalls(hit.tid, True)  # libraries are about to be mapped
            return
        for tid in proc.target.threads():
            proc.target.watch_syscalls(tid, False)
        self._arm_new_libraries(proc, startup_over=True)

    def _arm_new_libraries(self, proc: Process, startup_over: bool) -> None:
        proc.resolver.refresh()
        final = startup_over and not proc.startup_done
        if startup_over:
            proc.startup_done = True
        for tp in self.probes:
            try:
                self._arm(proc, tp, final=final)
            except NotYet:
                continue
            except UbpError as exc:
                if final and self.spawned and proc.pid == self.main_pid and self._fatal is None:
                    # the program has not run its own code yet: fail before it does
                    self._fatal = exc
                    self.stop()
                tp.error = str(exc)

    def _start_process(self, proc: Process) -> None:
        """Resolve what can be resolved now; watch for libraries for the rest."""
        proc.started = True
        self._watch_libraries(proc)
        if not proc.startup_done:
            # the dynamic linker is about to map the program's libraries
            for tid in proc.target.threads():
                proc.target.watch_syscalls(tid, True)
        for tp in self.probes:
            self._arm(proc, tp, final=self._final(proc))

    # ------------------------------------------------------------------ the loop
    def run(self, timeout: float | None = None) -> int | None:
        """Run the program until it exits (or :meth:`stop`, or ``timeout`` seconds);
        returns its wait status (None when detached before it ended)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        main = self.processes.get(self.main_pid) if self.main_pid else None
        if main is not None and not self.placement.active:
            self.placement.start(main.target.threads())
        for proc in list(self.processes.values()):
            if not proc.started:
                self._start_process(proc)
            for tid in proc.target.threads():
                th = proc.target.threads_.get(tid)
                if th is not None and th.stopped and not any(s.tid == tid for s in proc.target.queue):
                    proc.target.resume(tid)
        disarm = None
        try:
            # armed inside the try: whatever happens, the finally disarms it
            disarm = self._arm_deadline(timeout)
            while self.processes:
                if self._stop_requested or (deadline and time.monotonic() > deadline):
                    if self._fatal is not None:
                        self.kill()
                    self.detach()
                    if self._fatal is not None:
                        raise self._fatal
                    return self.exit_status
                got = self.hub.next_stop(self.hub.inline)
                if got is None:
                    break
                target, stop = got
                if stop is not None:  # None: the hub handled a hit; come back (stop, or inline)
                    self._handle(target, stop)
        except TargetError:
            # the program was killed under us (SIGKILL while a hit or an arming read its
            # memory): its death is the news, not the failed read
            status = self._killed_status()
            self._emergency_cleanup()
            if status is None:
                raise
            self.exit_status = status
            return status
        except BaseException:
            self._emergency_cleanup()
            raise
        finally:
            if disarm is not None:
                disarm()
            if not self.processes:
                self._close_rendezvous()
        return self.exit_status

    def _killed_status(self) -> int | None:
        """The wait status of a spawned main process that died (None: it lives)."""
        pid = self.main_pid
        if not self.spawned or pid is None:
            return None
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # its threads die first, then the leader
            state = task_state(pid)
            if state is None:
                return self.exit_status
            if state in "ZX":
                reap_traced_threads(pid)
                try:
                    got, status = os.waitpid(pid, os.WNOHANG | pt.WALL)
                except ChildProcessError:
                    return self.exit_status
                if got == pid and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                    return status
            time.sleep(0.005)
        return None

    def _arm_deadline(self, timeout: float | None) -> Callable[[], None]:
        """Let the program go on time even when it makes no stop (asleep in a system call)
        or its hits never leave the hub's loop.  Returns the disarming function.

        In the main thread with SIGALRM free, the alarm interrupts the wait (cheapest);
        elsewhere (another thread, or the caller owns SIGALRM) a timer thread nudges the
        hub (:meth:`Hub.nudge`)."""
        if timeout is None:
            return lambda: None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)):
            def expire(signum, frame) -> None:
                self._stop_requested = True
                self.hub.leave = True
                self.hub.wake()

            old = signal.signal(signal.SIGALRM, expire)
            signal.setitimer(signal.ITIMER_REAL, max(timeout, 1e-3))

            def disarm() -> None:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
            return disarm

        def expire_in_thread() -> None:
            self._stop_requested = True
            self.hub.nudge()

        timer = threading.Timer(max(timeout, 1e-3), expire_in_thread)
        timer.daemon = True
        timer.start()

        def cancel() -> None:
            timer.cancel()
            timer.join()
            self.hub.reap_wakers()
        return cancel

    def _handle(self, target: PtraceTarget, stop: Stop) -> None:
        proc = self.processes.get(target.pid)
        if proc is None:  # a vfork child living in its parent's target
            return
        engine = proc.engine
        if engine.handle(stop):
            return
        tid = stop.tid
        kind = stop.kind
        if kind is StopKind.TRAP:
            # not one of ours: the program's own int3 or SIGTRAP
            target.resume(tid, signal=signal.SIGTRAP)
        elif kind is StopKind.SIGNAL:
            target.resume(tid, signal=stop.signo)
        elif kind is StopKind.EXITED:
            self._vfork_children.pop(tid, None)
            if tid == target.pid:
                self._process_gone(proc, stop.status)
        elif kind is StopKind.EVENT:
            self._event(proc, stop)

    def _event(self, proc: Process, stop: Stop) -> None:
        target, tid, ev = proc.target, stop.tid, stop.event
        if ev in ("clone", "fork", "vfork"):
            reblock_sigtrap(tid)
            self._newborn.add(stop.data)  # its mask is fixed at its first stop
        elif tid in self._newborn:
            self._newborn.discard(tid)
            reblock_sigtrap(tid)
        if ev == "clone":
            child = stop.data
            if _shares_memory(target.pid, child, proc):
                target.add_thread(child)
                self.placement.thread_started(child)
            else:
                self._new_child(proc, child, shared=False, forking_tid=tid)
        elif ev == "fork":
            self._new_child(proc, stop.data, shared=_shares_memory(target.pid, stop.data, proc),
                            forking_tid=tid)
        elif ev == "vfork":
            self._new_child(proc, stop.data, shared=True)
        elif ev == "exec":
            self._exec(proc, tid, stop.data)
            return
        elif ev == "group-stop":
            target.listen(tid)
            return
        elif ev == "syscall":
            if stop.data == "exit" and \
                    target.syscall_number(tid) == self.arch.abi.syscall_numbers["mmap"]:
                self._arm_new_libraries(proc, startup_over=False)
        # interrupt, vfork-done, exit, and the parent side of clone/fork/vfork.  A
        # system call stepped out of line reports its events mid-step: keep stepping.
        target.resume(tid, step=proc.engine.stepping(tid))

    def _new_child(self, parent: Process, child: int, shared: bool,
                   forking_tid: int | None = None) -> None:
        if shared:
            # a vfork child runs in its parent's memory, breakpoints and XOL area
            # included: handle it as one more thread of the parent until it execs
            parent.target.add_thread(child).guard_mask = True
            self._vfork_children[child] = parent
            return
        if not self.follow_forks:
            self._clean_and_release(parent, child)
            return
        target = PtraceTarget(child, self.arch, self.hub, spawned=False)
        target.add_thread(child)
        engine = parent.engine.clone_for(target, forking_tid)
        proc = self._add_process(target, engine)
        proc.started = True
        proc.startup_done = parent.startup_done
        proc.r_debug = parent.r_debug
        for p in parent.internal:
            site = engine.sites.get(p.address)
            if site is not None:
                proc.internal.extend(q for q in site.probes if q.label == p.label)
        for tp in self._every():
            if tp.spec.is_glob and not tp.children.get(tp.label) and parent.pid in tp.attached:
                tp.attached[child] = None  # type: ignore[assignment]
            old = tp.attached.get(parent.pid)
            if old is not None and id(old) in engine.cloned:
                tp.attached[child] = engine.cloned[id(old)]
            elif isinstance(old, FastSite) and engine.fast is not None:
                tp.attached[child] = engine.fast.sites.get(old.address, old)

    def _clean_and_release(self, parent: Process, child: int) -> None:
        """Not following: put the original bytes back in the child, then let it go."""
        release_child(child, parent.engine.patched_bytes())

    def _exec(self, proc: Process, tid: int, former: int | None) -> None:
        """A new program image: probes of the old one are gone; resolve them anew."""
        target = proc.target
        parent = self._vfork_children.pop(tid, None)
        if parent is not None:
            # a vfork child leaves its parent's memory: it becomes a process of its own
            parent.target.threads_.pop(tid, None)
            self.hub.forget(tid)
            if not self.follow_forks:  # its new image has no breakpoint: let it go
                pt.try_ptrace(pt.PTRACE_DETACH, tid, 0, 0)
                return
            target = PtraceTarget(tid, self.arch, self.hub, spawned=False)
            target.add_thread(tid, stopped=True)
            fresh = self._add_process(target)
        else:
            for other in list(target.threads_):
                if other != tid:
                    target.threads_.pop(other, None)
                    self.hub.forget(other)
            if tid != target.pid:
                # a non-leader thread exec'ed: it now has the leader's tid
                target.threads_.pop(tid, None)
                target.add_thread(target.pid, stopped=True)
                tid = target.pid
            target.threads_[tid].stopped = True
            target.reopen_memory()
            target.xol_areas.clear()
            target.syscall_insn = None
            proc.resolver.close()
            fresh = self._add_process(target)
        for tp in self._every():
            tp.detach_from(fresh.pid)
        try:
            new_arch = self.plugins.arch_for_elf(elf_ident_of(f"/proc/{fresh.pid}/exe"))
        except UbpError as exc:
            log.warning("process %d exec'ed a program UBP cannot probe: %s", fresh.pid, exc)
            self._release(fresh)
            return
        if new_arch is not self.arch:
            log.warning("process %d exec'ed a %s program; not probing it", fresh.pid, new_arch.name)
            self._release(fresh)
            return
        try:
            self._start_process(fresh)
        except UbpError as exc:
            log.warning("after exec in %d: %s", fresh.pid, exc)
        fresh.target.resume(tid)

    def _release(self, proc: Process) -> None:
        proc.target.detach_all()
        self.processes.pop(proc.pid, None)

    def _process_gone(self, proc: Process, status: int | None) -> None:
        proc.resolver.close()
        self.processes.pop(proc.pid, None)
        for tp in self._every():
            tp.detach_from(proc.pid)
        if proc.pid == self.main_pid:
            self.exit_status = status
            self.placement.stop()

    # ------------------------------------------------------------------ leaving
    def detach(self) -> None:
        """Take every breakpoint out and let every traced process go on running."""
        self.placement.stop()
        for proc in list(self.processes.values()):
            try:
                self._detach_process(proc)
            except (TargetError, OSError) as exc:
                log.warning("detaching from %d: %s", proc.pid, exc)
            self.processes.pop(proc.pid, None)
        # last: the jumps are out, so only threads already in a trampoline are waiting
        self._close_rendezvous()

    def _detach_process(self, proc: Process) -> None:
        """Breakpoints out, every in-flight step finished, every thread out of the XOL
        area, then detach with the signals that were on their way."""
        target, engine = proc.target, proc.engine
        originals = engine.patched_bytes()  # for a child forked while UBP leaves
        engine.remove_all()
        pending: dict[int, int] = {}
        for _ in range(200):
            for tid in list(target.threads_):
                th = target.threads_.get(tid)
                if th is not None and not th.stopped:
                    for s in target.stop_thread(tid):
                        target.queue.append(s)
            busy = False
            while target.queue:
                stop = target.queue.popleft()
                if engine.handle(stop):
                    busy = True  # a step finished or a late trap was undone: it runs again
                elif stop.kind is StopKind.SIGNAL:
                    pending[stop.tid] = stop.signo
                elif stop.kind is StopKind.TRAP:
                    pending[stop.tid] = signal.SIGTRAP
                elif stop.kind is StopKind.EXITED and stop.tid == target.pid:
                    return
                elif stop.kind is StopKind.EVENT and stop.event in ("clone", "fork", "vfork"):
                    # a thread or child the program made just now, attached by
                    # PTRACE_O_TRACECLONE/TRACEFORK: without this it would stay stopped,
                    # traced by UBP, after UBP let the rest go
                    child = stop.data
                    if stop.event == "clone" and _shares_memory(target.pid, child, proc):
                        target.add_thread(child)
                    else:
                        release_child(child, originals)
                    busy = True
            for tid in list(target.threads_):
                th = target.threads_.get(tid)
                if th is not None and th.stopped and engine._stepping(tid):
                    # interrupted before its out-of-line step ran: let the step finish
                    target.resume(tid, step=True)
                    busy = True
                elif th is not None and th.stopped and tid not in pending \
                        and sigtrap_pending(tid):
                    # it hit a breakpoint but our interrupt was reported first: detached
                    # now, it would die of that SIGTRAP.  Take the trap (the engine puts
                    # the pc back on the instruction whose breakpoint is gone).
                    target.queue.extend(target.take_pending_trap(tid))
                    busy = True
            if not busy:
                break
        engine.returns.restore()
        engine.leave_xol()
        target.detach_all(pending)

    def _emergency_cleanup(self) -> None:
        """Something went wrong in the loop (or Ctrl-C): restore and detach what we can."""
        self.placement.stop()
        for proc in list(self.processes.values()):
            try:
                self._detach_process(proc)
            except Exception as exc:
                print(f"ubp: could not cleanly detach from {proc.pid}: {exc}", file=sys.stderr)
                try:
                    proc.engine.remove_all()
                except Exception:
                    pass
            self.processes.pop(proc.pid, None)
        self._close_rendezvous()

    def kill(self) -> None:
        for proc in list(self.processes.values()):
            proc.target.kill()


def _task_ids(pid: int) -> list[int]:
    try:
        return task_ids(pid)
    except FileNotFoundError:
        raise AttachError(f"no process {pid}") from None


def _plain(name: str) -> bool:
    try:
        return not parse_spec(name).is_glob
    except UbpError:
        return False


def _which(prog: str) -> str:
    if "/" in prog:
        if not os.path.exists(prog):
            raise UbpError(f"{prog}: no such file")
        return prog
    for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep):
        cand = os.path.join(d, prog)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise UbpError(f"{prog}: command not found")


def _eperm(pid: int) -> str:
    scope = "?"
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = f.read().strip()
    except OSError:
        pass
    return (f"permission denied attaching to process {pid}: ptrace needs the same user "
            f"and no other tracer (is a debugger attached?); kernel.yama.ptrace_scope="
            f"{scope} -- with 1 only a parent may trace its children unless you run as "
            "root or with CAP_SYS_PTRACE (or set the scope to 0: "
            "sysctl kernel.yama.ptrace_scope=0); UBP does not work around it")


def _shares_memory(pid: int, child: int, proc: Process) -> bool:
    """True when ``child`` runs in ``pid``'s address space (CLONE_VM without a thread).

    Tested, not guessed: flip a byte through the child and look in the parent.  The byte
    is the last padding byte of the program's ELF header, which nothing reads."""
    exe = proc.resolver.modules.get(proc.resolver.exe)
    if exe is None or not exe.mappings:
        return False
    at = min(m.start for m in exe.mappings if m.offset == 0) + 15 \
        if any(m.offset == 0 for m in exe.mappings) else None
    if at is None:
        return False
    try:
        cm = ProcMem(child)
    except TargetError:
        return False
    try:
        before = proc.target.read_memory(at, 1)
        cm.write(at, bytes([before[0] ^ 0xFF]))
        shared = proc.target.read_memory(at, 1) != before
        cm.write(at, before)
        return shared
    except (MemoryFault, OSError):
        return False
    finally:
        cm.close()
