"""Live probes through the GDB remote protocol: a program under qemu-user or any stub.

:class:`RemoteSession` is the remote counterpart of :class:`ubp_core.session.Session`:
the same probe specs (resolved with the same :class:`~ubp_core.symbols.Resolver` and
:class:`~ubp_core.session.TraceProbe`), the same engine and strategies, on a
:class:`~ubp_core.gdbremote.target.GdbRemoteTarget`.

What a stub does not give is worked out from the program itself:

- where the executable and the dynamic linker are loaded: the auxiliary vector
  (``qXfer:auxv:read``: AT_PHDR gives the executable's load bias, AT_BASE the linker's);
  /proc/PID/maps is no use (under qemu-user it is qemu's own address space, and a
  remote stub's process is not on this machine);
- the libraries: the dynamic linker's own list (``_r_debug``'s link maps), read at each
  RT_CONSISTENT notification of its ``_dl_debug_state`` (an internal probe), which
  also covers dlopen.  Their files are looked up under the sysroot (``qemu -L``);
- memory: mmap and mprotect are injected through a system-call instruction of the
  program (see :mod:`ubp_core.gdbremote.inject`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence

from .archops import ArchOps
from .elfinfo import ElfFileError, ElfImage, elf_ident_of
from .engine import Engine, Hit, Probe
from .errors import MemoryFault, ProbeError, TargetError, UbpError
from .gdbremote.protocol import Connection, StubError, connect
from .gdbremote.target import PAGE, GdbRemoteTarget
from .plugins import PluginSet, default_plugins
from .procmaps import Mapping
from .session import TraceProbe, _plain
from .spec import ProbeSpec, parse_spec
from .symbols import Module, NotYet, Resolved, Resolver
from .target import Stop, StopKind
from .types import Strategy
from .xol import XolAllocator

log = logging.getLogger("ubp.remote")

AT_PHDR, AT_ENTRY, AT_BASE = 3, 9, 7
RT_CONSISTENT = 0
PT_LOAD, PT_INTERP, PT_PHDR = "PT_LOAD", "PT_INTERP", "PT_PHDR"


class RemoteError(TargetError):
    """The stub, qemu or the program cannot be driven as asked."""


# --------------------------------------------------------------------------- modules
def synthetic_mappings(path: str, bias: int) -> list[Mapping]:
    """The mappings the loader makes of ``path`` at load bias ``bias``: one per PT_LOAD
    (what /proc/PID/maps would show, page-rounded)."""
    out = []
    with ElfImage(path) as img:
        for seg in img.elf.iter_segments():
            if seg["p_type"] != PT_LOAD:
                continue
            flags = seg["p_flags"]
            perms = ("r" if flags & 4 else "-") + ("w" if flags & 2 else "-") + \
                    ("x" if flags & 1 else "-") + "p"
            lo = (seg["p_vaddr"]) & ~(PAGE - 1)
            hi = (seg["p_vaddr"] + seg["p_memsz"] + PAGE - 1) & ~(PAGE - 1)
            out.append(Mapping(bias + lo, bias + hi, perms, seg["p_offset"] & ~(PAGE - 1),
                               1, path))
    return out


class RemoteResolver(Resolver):
    """A :class:`Resolver` fed from the program's own records (auxv, link maps)
    instead of /proc/PID/maps: local copies of its files and their load biases."""

    def __init__(self, arch: ArchOps, exe: str) -> None:  # no super(): there is no pid
        self.pid = 0
        self.arch = arch
        self.modules: dict[str, Module] = {}
        self.unreadable: dict[str, str] = {}  # (local copies: none)
        self.exe = os.path.realpath(exe)
        self.biases: dict[str, int] = {}

    def add(self, path: str, bias: int) -> bool:
        """A file loaded at ``bias``; False when it is known already."""
        real = os.path.realpath(path)
        if self.biases.get(real) == bias:
            return False
        old = self.modules.pop(real, None)
        if old is not None:
            old.close()
        self.modules[real] = Module(real, synthetic_mappings(real, bias))
        self.biases[real] = bias
        return True

    def refresh(self) -> list[str]:
        return []

    # ELFv2 (ppc64le): a function has a global entry (which sets up the TOC pointer)
    # and a local entry a few instructions on (st_other); calls from within a module go
    # straight to the local one, and calls through the global one pass it too, so a
    # probe on the function goes there (as perf probe does).  The ptrace path never
    # meets ELFv2 code.
    def _in_module(self, spec: ProbeSpec, mod: Module):
        where = super()._in_module(spec, mod)
        if spec.symbol is not None and spec.offset == 0:
            off = local_entry_offsets(mod).get(spec.symbol, 0)
            if off:
                where = Resolved(where.address + off, where.module, where.symbol, off)
        return where

    def resolve_glob(self, spec: ProbeSpec) -> list[Resolved]:
        out = []
        for where in super().resolve_glob(spec):
            mod = self.modules.get(where.module or "")
            off = local_entry_offsets(mod).get(where.symbol or "", 0) if mod else 0
            out.append(Resolved(where.address + off, where.module, where.symbol, off)
                       if off else where)
        return out


_LOCAL_ENTRIES: dict[str, dict[str, int]] = {}


def local_entry_offsets(mod: Module) -> dict[str, int]:
    """name -> offset of the local entry point, for the functions of an ELFv2 object
    that have one (st_other bits 5-7: (1 << v) >> 2 << 2 bytes)."""
    got = _LOCAL_ENTRIES.get(mod.path)
    if got is not None:
        return got
    out: dict[str, int] = {}
    elf = mod.image.elf
    if elf["e_machine"] == "EM_PPC64" and elf["e_flags"] & 3 == 2:
        for secname in (".symtab", ".dynsym"):
            sec = elf.get_section_by_name(secname)
            if sec is None or not hasattr(sec, "iter_symbols"):
                continue
            for sym in sec.iter_symbols():
                v = sym["st_other"].get("local", 0) if hasattr(sym["st_other"], "get") else 0
                if isinstance(v, int) and 2 <= v <= 6 and sym.name:
                    out.setdefault(sym.name.split("@")[0], ((1 << v) >> 2) << 2)
    _LOCAL_ENTRIES[mod.path] = out
    return out


def parse_auxv(data: bytes, word: int, order: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for i in range(0, len(data) - 2 * word + 1, 2 * word):
        key = int.from_bytes(data[i:i + word], order)
        if key == 0:
            break
        out[key] = int.from_bytes(data[i + word:i + 2 * word], order)
    return out


def exe_bias(path: str, auxv: dict[int, int]) -> int:
    """The executable's load bias: AT_PHDR minus the link-time address of its program
    headers (0 for a fixed-address executable when the stub gives no auxv)."""
    with ElfImage(path) as img:
        if not img.is_pie_or_shared:
            return 0
        if AT_PHDR not in auxv:
            if AT_ENTRY in auxv:
                return auxv[AT_ENTRY] - img.elf["e_entry"]
            raise RemoteError(f"{path} is position-independent and the stub gives no "
                              "auxiliary vector (qXfer:auxv:read): its load address is unknown")
        phdr_vaddr = None
        for seg in img.elf.iter_segments():
            if seg["p_type"] == PT_PHDR:
                phdr_vaddr = seg["p_vaddr"]
                break
        if phdr_vaddr is None:
            for seg in img.elf.iter_segments():
                if seg["p_type"] == PT_LOAD and seg["p_offset"] == 0:
                    phdr_vaddr = seg["p_vaddr"] + img.elf["e_phoff"]
                    break
        if phdr_vaddr is None:
            raise RemoteError(f"{path}: cannot tell where its program headers are loaded")
        return auxv[AT_PHDR] - phdr_vaddr


def interpreter_of(path: str) -> str | None:
    with ElfImage(path) as img:
        for seg in img.elf.iter_segments():
            if seg["p_type"] == PT_INTERP:
                return seg.get_interp_name()
    return None


def in_sysroot(sysroot: str | None, path: str) -> str:
    """The local copy of the program's file ``path``: under the sysroot when there."""
    if sysroot:
        cand = os.path.join(sysroot, path.lstrip("/"))
        if os.path.exists(cand):
            return cand
    return path


def find_sysroot(program: str) -> str | None:
    """/usr/<triple> whose dynamic linker is the one ``program`` asks for (the Debian
    cross libcs); None for a static program or when none is installed."""
    interp = interpreter_of(program)
    if interp is None:
        return None
    ident = elf_ident_of(program)
    try:
        roots = sorted(os.listdir("/usr"))
    except OSError:
        return None
    for name in roots:
        if "-linux-" not in name:
            continue
        root = os.path.join("/usr", name)
        cand = os.path.join(root, interp.lstrip("/"))
        if not os.path.exists(cand):
            cand = os.path.join(root, "lib", os.path.basename(interp))
            if not os.path.exists(cand):
                continue
        try:
            other = elf_ident_of(cand)
        except ElfFileError:
            continue
        if (other.machine, other.bits, other.byteorder) == (ident.machine, ident.bits,
                                                            ident.byteorder):
            return root
    return None


# --------------------------------------------------------------------------- qemu
def free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _die_with_parent() -> None:
    import ctypes

    try:  # PR_SET_PDEATHSIG: a qemu left behind would wait for its debugger forever
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class QemuProcess:
    """qemu-user running a program with its GDB stub on a free loopback port."""

    def __init__(self, arch: ArchOps, argv: Sequence[str], sysroot: str | None) -> None:
        spec = arch.qemu_spec()
        if spec is None:
            raise RemoteError(f"the {arch.name} plugin names no qemu-user binary (QemuSpec)")
        binary = shutil.which(spec.binary)
        if binary is None:
            raise RemoteError(f"{spec.binary} is not installed (Debian package qemu-user)")
        self.port = free_port()
        cmd = [binary]
        if spec.cpu:
            cmd += ["-cpu", spec.cpu]
        if sysroot:
            cmd += ["-L", sysroot]
        cmd += ["-g", str(self.port), *argv]
        self.argv = cmd
        # the program's stdin, stdout and stderr are its own (qemu passes them on)
        self.proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent)

    def connect(self, timeout: float = 10.0) -> Connection:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RemoteError(f"{self.argv[0]} exited ({self.proc.returncode}) before its "
                                  "GDB stub took a connection")
            try:
                return Connection(connect(f"127.0.0.1:{self.port}", timeout=0.2))
            except StubError:
                if time.monotonic() > deadline:
                    raise RemoteError(f"qemu's GDB stub on port {self.port} did not answer "
                                      f"within {timeout:.0f} s") from None

    def interrupt(self) -> None:
        # qemu-user reads its stub's socket only at a stop: the interrupt byte would
        # wait; a SIGINT makes the program stop (the stub reports it, it is not delivered)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def finish(self, timeout: float = 5.0) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class QemuTarget(GdbRemoteTarget):
    """qemu-user's stub: interrupts by signal, and no second thread at a stop.

    qemu-user's stub before 9.0 is not all-stop: a thread that stops sends its stop
    reply and reads the stub's socket until it is resumed while the other threads run
    on, and a second thread that stops meanwhile rewrites the stub's global state
    (current thread, packet parser, reply buffer) and reads the same socket: replies
    get mixed up and a resume meant for one thread lets another go.  Neither holding
    the other threads with ptrace (qemu then waits for them to leave translated code
    before it flushes it, and a thread held inside the stub leaves its state half
    written) nor running them one at a time made that reliable (docs/remote.md).  So a
    stop of a second thread is refused with a clear error rather than risking a wrong
    count or a corrupted program; threads that never reach a probe are fine.
    """

    def __init__(self, conn: Connection, arch: ArchOps, qemu: QemuProcess) -> None:
        super().__init__(conn, arch)
        self.qemu = qemu
        self.main_tid = self.tid

    def interrupt(self) -> None:
        self.qemu.interrupt()

    def wait(self, timeout: float | None = None) -> Stop:
        stop = super().wait(timeout)
        if stop.kind is not StopKind.EXITED and stop.tid != self.main_tid:
            raise MultiThreadError(
                f"thread {stop.tid} stopped (a probe hit, a step or a signal) while thread "
                f"{self.main_tid} is the program's: qemu-user's GDB stub "
                f"({self.qemu.argv[0]}) does not stop the other threads at a stop "
                "(it is not all-stop before qemu 9.0), so probes hit by more than one "
                "thread cannot be handled reliably; use an all-stop stub (gdbserver) "
                "through --remote, or probe functions one thread runs")
        return stop


class MultiThreadError(RemoteError):
    """A second thread stopped under a stub that is not all-stop."""


# --------------------------------------------------------------------------- session
class RemoteSession:
    """Probes in one program behind a GDB stub (all-stop: every thread stops at a stop)."""

    def __init__(self, target: GdbRemoteTarget, arch: ArchOps, exe: str, *,
                 sysroot: str | None = None, qemu: QemuProcess | None = None,
                 inline_freeze: bool = True) -> None:
        self.target = target
        target.lazy_extra_registers = True
        self.arch = arch
        self.sysroot = sysroot
        self.qemu = qemu
        self.exe = exe
        self.resolver = RemoteResolver(arch, exe)
        self.engine = Engine(target, arch, xol=XolAllocator(target, arch.xol_slot_size,
                                                            arch.branch_reach),
                             inline_freeze=inline_freeze)
        self.probes: list[TraceProbe] = []
        self.internal: list[Probe] = []
        self.startup_done = True
        self.r_debug: int | None = None
        self.exit_code: int | None = None
        self._stop_requested = False
        target.conn.async_stops = deque()
        self._boot()

    # ------------------------------------------------------------------ creation
    @classmethod
    def qemu_spawn(cls, argv: Sequence[str], *, sysroot: str | None = None,
                   plugins: PluginSet | None = None, **kw) -> RemoteSession:
        """Start ``argv`` under the qemu-user its ELF header calls for, stopped at its
        first instruction, with a stub on a free loopback port."""
        path = _which(argv[0])
        plugins = plugins or default_plugins()
        arch = plugins.arch_for_elf(elf_ident_of(path), path)
        if sysroot is None:
            sysroot = os.environ.get("QEMU_LD_PREFIX") or find_sysroot(path)
        if interpreter_of(path) and not sysroot:
            raise RemoteError(f"{path} is dynamically linked and no sysroot holds its "
                              f"dynamic linker {interpreter_of(path)} (give --sysroot)")
        qemu = QemuProcess(arch, [path, *argv[1:]], sysroot)
        try:
            conn = qemu.connect()
            target = QemuTarget(conn, arch, qemu)
            return cls(target, arch, path, sysroot=sysroot, qemu=qemu, **kw)
        except BaseException:
            qemu.proc.kill()
            qemu.finish()
            raise

    @classmethod
    def connect(cls, address: str, exe: str | None, *, sysroot: str | None = None,
                plugins: PluginSet | None = None, timeout: float = 3.0, **kw) -> RemoteSession:
        """Attach to the stub at ``address`` (HOST:PORT); ``exe`` is a local copy of the
        program (for its symbols and arch), else the stub's qXfer:exec-file is asked."""
        plugins = plugins or default_plugins()
        try:
            sock = connect(address, timeout=timeout)
        except StubError as exc:
            raise RemoteError(str(exc)) from None
        conn = Connection(sock, timeout=max(timeout, 10.0))
        try:
            if exe is None:
                exe = _exec_file(conn)
            path = _which(exe)
            arch = plugins.arch_for_elf(elf_ident_of(path), path)
            target = GdbRemoteTarget(conn, arch)
            return cls(target, arch, path, sysroot=sysroot, **kw)
        except BaseException:
            conn.close()
            raise

    def _boot(self) -> None:
        t = self.target
        t.stopped_tid = t.tid
        word = self.arch.word_bits // 8
        raw = t._xfer("auxv", "") if t.features.get("qXfer:auxv:read") == "+" else None
        auxv = parse_auxv(raw, word, self.arch.byteorder) if raw else {}
        self.resolver.add(self.exe, exe_bias(self.exe, auxv))
        interp = interpreter_of(self.exe)
        if interp is not None:
            local = in_sysroot(self.sysroot, interp)
            if not os.path.exists(local):
                raise RemoteError(f"the dynamic linker {interp} is not here (give --sysroot)")
            if AT_BASE not in auxv:
                raise RemoteError("a dynamically linked program, and the stub gives no "
                                  "auxiliary vector (qXfer:auxv:read): where its dynamic "
                                  "linker is loaded is unknown")
            self.resolver.add(local, auxv[AT_BASE])
        insn = find_syscall_insn(self.resolver, self.arch, t)
        t.use_syscall_insn(insn)
        exe_mod = self.resolver.modules[self.resolver.exe]
        t.own_syscall_page(near=exe_mod.mappings[0].start)
        if interp is not None:
            self._watch_libraries()
            if self._libraries_loaded():
                # attached to a program that is past its start-up (--remote)
                self._read_link_map()
                self.startup_done = True
            else:
                self._settle()

    def _libraries_loaded(self) -> bool:
        if self.r_debug is None:
            return False
        w = self.arch.word_bits // 8
        try:
            state = int.from_bytes(self.target.read_memory(self.r_debug + 3 * w, 4),
                                   self.arch.byteorder)
            return self._word(self.r_debug + w) != 0 and state == RT_CONSISTENT
        except MemoryFault:
            return False

    def _settle(self) -> None:
        """Run a dynamically linked program until its dynamic linker has loaded the
        startup libraries (its first RT_CONSISTENT): probes are then resolved against
        everything, so an unknown symbol is an error before the program's own code
        ran (its constructors and main have not)."""
        t = self.target
        t.resume(t.stopped_tid or t.tid)
        while not self.startup_done:
            stop = t.wait(30.0)
            if stop.kind is StopKind.TIMEOUT:
                raise RemoteError("the program did not get through its dynamic linker")
            if self.engine.handle(stop):
                continue
            if stop.kind is StopKind.EXITED:
                raise RemoteError(f"the program exited ({stop.status}) before its libraries "
                                  "were loaded")
            t.resume(stop.tid, signal=stop.signo if stop.kind is StopKind.SIGNAL
                     else signal.SIGTRAP)

    # ------------------------------------------------------------------ libraries
    def _watch_libraries(self) -> None:
        for mod in list(self.resolver.modules.values()):
            if mod.path == self.resolver.exe:
                continue
            brk = mod.by_name.get("_dl_debug_state")
            rdebug = mod.image.data_symbol("_r_debug")
            if brk is None or rdebug is None:
                continue
            addr = mod.runtime(brk.address)
            self.r_debug = mod.runtime(rdebug, code=False)
            if addr is None or self.r_debug is None:
                continue
            self.startup_done = False
            p = self.engine.add_probe(addr, self._rbrk_hit, label="<dynamic linker>")
            self.internal.append(p)
            return
        log.warning("no _dl_debug_state/_r_debug in the dynamic linker: library probes "
                    "cannot be armed")

    def _word(self, address: int) -> int:
        w = self.arch.word_bits // 8
        return int.from_bytes(self.target.read_memory(address, w), self.arch.byteorder)

    def _rbrk_hit(self, hit: Hit) -> None:
        assert self.r_debug is not None
        w = self.arch.word_bits // 8
        try:
            state = int.from_bytes(self.target.read_memory(self.r_debug + 3 * w, 4),
                                   self.arch.byteorder)
        except MemoryFault:
            return
        if state != RT_CONSISTENT:
            return
        self._read_link_map()
        if not self.startup_done:
            # the program stays stopped here (the engine's resume is held until run())
            self.target.hold_next_resume = True
        self.startup_done = True
        for tp in self.probes:
            self._arm(tp, final=True)

    def _read_link_map(self) -> list[str]:
        """Every loaded object from the dynamic linker's list (l_addr, l_name, l_ld,
        l_next), as local files."""
        assert self.r_debug is not None
        w = self.arch.word_bits // 8
        new = []
        lm = self._word(self.r_debug + w)
        seen = 0
        while lm and seen < 4096:
            seen += 1
            bias = self._word(lm)
            name_at = self._word(lm + w)
            name = _read_c_string(self.target, name_at) if name_at else ""
            lm = self._word(lm + 3 * w)
            if not name:
                continue  # the executable itself
            local = in_sysroot(self.sysroot, name)
            if not os.path.exists(local):
                log.warning("library %s is not here (sysroot %s): its probes stay unarmed",
                            name, self.sysroot)
                continue
            if self.resolver.add(local, bias):
                new.append(local)
        return new

    # ------------------------------------------------------------------ probes
    def probe(self, spec: str | ProbeSpec, handler: Callable[[Hit], object] | None = None, *,
              strategy: Strategy | str | None = None) -> TraceProbe:
        """Like :meth:`Session.probe`: armed at once when its module is loaded, else as
        the dynamic linker loads it.  Errors leave the target untouched."""
        ps = spec if isinstance(spec, ProbeSpec) else parse_spec(spec)
        tp = TraceProbe(ps, handler, Strategy(strategy) if strategy else None)
        self._arm(tp, final=self.startup_done)
        self.probes.append(tp)
        return tp

    def _arm(self, tp: TraceProbe, final: bool) -> bool:
        if tp.spec.is_glob:
            return self._arm_glob(tp)
        if 0 in tp.attached:
            return True
        try:
            where = self.resolver.resolve(tp.spec, final=final)
        except NotYet:
            return False
        except ProbeError as exc:
            if self.startup_done and tp in self.probes:
                tp.error = str(exc)  # found out while running: reported at the end
                return False
            raise
        try:
            if tp.spec.ret:
                probe = self.engine.add_return_probe(where.address, tp.handler,
                                                     strategy=tp.strategy, label=tp.spec.text)
            else:
                probe = self.engine.add_probe(where.address, tp.handler,
                                              strategy=tp.strategy, label=tp.spec.text)
        except UbpError as exc:
            if tp in self.probes:
                tp.error = str(exc)
                return False
            raise
        tp.attached[0] = probe
        tp.address, tp.module, tp.chosen = where.address, where.module, probe.strategy
        return True

    def _arm_glob(self, tp: TraceProbe) -> bool:
        try:
            matches = self.resolver.resolve_glob(tp.spec)
        except NotYet:
            return False
        for where in matches:
            name = f"{os.path.basename(where.module or '')}:{where.symbol}"
            if name in tp.children:
                continue
            child = TraceProbe(parse_spec(name) if _plain(name) else tp.spec, tp.handler,
                               tp.strategy)
            child.label_override = name
            tp.children[name] = child
            if any(c.address == where.address for c in tp.children.values() if c is not child):
                del tp.children[name]
                continue
            try:
                probe = self.engine.add_probe(where.address, tp.handler, strategy=tp.strategy,
                                              label=name)
            except UbpError as exc:
                child.error = str(exc)
                tp.skipped += 1
                continue
            child.attached[0] = probe
            child.address, child.module, child.chosen = where.address, where.module, \
                probe.strategy
        tp.attached[0] = None  # type: ignore[assignment]
        return True

    def stop(self) -> None:
        """Ask :meth:`run` to leave at the next stop (callable from a handler)."""
        self._stop_requested = True

    # ------------------------------------------------------------------ the loop
    def run(self, timeout: float | None = None) -> int | None:
        """Run until the program exits (its exit code; 128+N when signal N killed it), or
        until :meth:`stop` / ``timeout`` (None: UBP has let go of it)."""
        t = self.target
        engine = self.engine
        deadline = None if timeout is None else time.monotonic() + timeout
        interrupted = False
        if t.held is not None:
            t.release()
        else:
            t.resume(t.stopped_tid or t.tid)
        try:
            while True:
                left = None if deadline is None else max(0.01, deadline - time.monotonic())
                stop = t.wait(left)
                if stop.kind is StopKind.TIMEOUT:
                    self._stop_requested = True
                    stop = Stop(stop.tid, StopKind.SIGNAL, signal.SIGINT)
                    if self._leave_now(stop):
                        return None
                    continue
                if engine.handle(stop):
                    if self._stop_requested and not interrupted \
                            and not engine.stepping(stop.tid):
                        # asked to leave (a handler called stop()): the program must
                        # stop somewhere that is not a probe first
                        t.interrupt()
                        interrupted = True
                    continue
                kind = stop.kind
                if kind is StopKind.EXITED:
                    self.exit_code = stop.status if stop.signo == 0 else 128 + stop.signo
                    return self.exit_code
                if self._stop_requested and self._leave_now(stop):
                    return None
                if kind is StopKind.TRAP:
                    t.resume(stop.tid, signal=signal.SIGTRAP)  # the program's own trap
                else:
                    t.resume(stop.tid, signal=stop.signo)
        except BaseException as exc:
            log.debug("leaving after %r", exc)
            self._emergency()
            raise

    def _leave_now(self, stop: Stop) -> bool:
        """At a stop that is not ours, with every thread stopped: let go of the program
        (a --qemu program is killed: nothing would drive it on)."""
        if self.qemu is not None:
            self.kill()
            return True
        self.detach(pending=stop)
        return True

    def detach(self, pending: Stop | None = None) -> None:
        """Every original byte back, every hijacked return address restored, no thread
        left in a boost slot; then the stub lets the program run."""
        engine = self.engine
        engine.remove_all()
        engine.returns.restore()
        engine.leave_xol()
        sig = 0
        if pending is not None and pending.kind is StopKind.SIGNAL \
                and pending.signo != signal.SIGINT:
            sig = pending.signo
        if sig:
            self.target.resume(pending.tid, signal=sig)  # type: ignore[union-attr]
        try:
            self.target.conn.request(b"D")
        except TargetError:
            pass
        self.target.close()

    def kill(self) -> None:
        if self.qemu is not None:
            # SIGKILL rather than the stub's k packet: qemu answers that one with a
            # line on the program's stderr
            self.qemu.proc.kill()
            self.qemu.finish()
        else:
            self.target.kill()
        self.target.close()

    def close(self) -> None:
        """After the program exited: close the connection; qemu then exits too."""
        self.target.close()
        if self.qemu is not None:
            self.qemu.finish()

    def _emergency(self) -> None:
        try:
            if self.qemu is not None:
                self.kill()
            else:
                self.detach()
        except Exception as exc:  # already failing: say so and go on
            log.warning("could not let go of the program cleanly: %s", exc)


# --------------------------------------------------------------------------- helpers
def find_syscall_insn(resolver: RemoteResolver, arch: ArchOps, target: GdbRemoteTarget,
                      limit: int = 64) -> int:
    """A system-call instruction of the loaded code whose next instruction writes no
    memory and cannot fault with any register values (qemu-user runs that one too before
    it reports the single-step).  The plugin tells: the next instruction must be one it
    emulates with no memory effect for the registers an injection sets."""
    insn = arch.abi.syscall_insn
    regs = target.get_regs(target.stopped_tid or target.tid)
    tried = 0
    order = sorted(resolver.modules.values(), key=lambda m: m.path == resolver.exe)
    for mod in order:
        for m in mod.mappings:
            if not m.executable:
                continue
            try:
                code = target.read_memory(m.start, m.end - m.start)
            except MemoryFault:
                continue
            at = code.find(insn)
            while at >= 0 and tried < limit:
                if at % arch.insn_alignment == 0:
                    addr = m.start + at
                    tried += 1
                    # whether it is an instruction boundary of the program's own
                    # stream does not matter: the pc is put there, and the CPU decodes
                    # from there
                    if _harmless_after(arch, target, addr + len(insn), regs):
                        return addr
                at = code.find(insn, at + 1)
    raise RemoteError(f"found no {arch.name} system-call instruction in the program's loaded "
                      "code to inject mmap/mprotect through")


def _harmless_after(arch: ArchOps, target: GdbRemoteTarget, addr: int, regs: dict) -> bool:
    try:
        code = target.read_memory(addr, arch.max_insn_len)
    except MemoryFault:
        try:
            code = target.read_memory(addr, len(arch.breakpoint) * 2)
        except MemoryFault:
            return False
    try:
        an = arch.analyze(arch.decode(code, addr))
        if not an.accepted:
            return False
        probe_regs = dict(regs)
        probe_regs[arch.abi.pc] = addr
        effect = arch.emulate(an, probe_regs, target.read_memory)
    except (UbpError, KeyError):
        return False
    return effect is not None and not effect.mem


def _read_c_string(target: GdbRemoteTarget, address: int, limit: int = 4096) -> str:
    out = bytearray()
    while len(out) < limit:
        n = min(64, PAGE - ((address + len(out)) & (PAGE - 1)))
        try:
            chunk = target.read_memory(address + len(out), n)
        except MemoryFault:
            break
        nul = chunk.find(b"\0")
        if nul >= 0:
            out += chunk[:nul]
            break
        out += chunk
    return out.decode("utf-8", "replace")


def _exec_file(conn: Connection) -> str:
    reply = conn.request(b"qXfer:exec-file:read::0,fff")
    if reply[:1] in (b"l", b"m") and len(reply) > 1:
        return reply[1:].decode("utf-8", "replace")
    raise RemoteError("the stub does not say which program it runs (no qXfer:exec-file): "
                      "give a local copy of it with --file")


def _which(prog: str) -> str:
    if "/" in prog:
        if not os.path.exists(prog):
            raise UbpError(f"{prog}: no such file")
        return prog
    found = shutil.which(prog)
    if found is None:
        raise UbpError(f"{prog}: command not found")
    return found
