"""A Target that drives any GDB stub: qemu-user's, gdbserver's, a JTAG probe's.

Packets used: ``qSupported`` (first: some stubs misbehave without it), ``QStartNoAckMode``,
``qXfer:features:read`` (register layout), ``?``, ``g``/``G``, ``p``/``P``, ``m``/``M``,
``vCont`` (or ``s``/``c``/``S``/``C``), ``Hg``, ``qfThreadInfo``, ``qXfer:siginfo:read``
when offered, and the interrupt byte.  Nothing here names an architecture: register
names, sizes and order come from the stub's target description and the ArchOps.
"""

from __future__ import annotations

import signal as _signal
from collections.abc import Callable
from dataclasses import dataclass

from ..archops import ArchOps
from ..errors import MemoryFault, TargetError
from ..target import Stop, StopKind, Target
from ..types import Regs
from . import signals, tdesc
from .inject import SyscallInjector
from .protocol import Connection, StubError, StubTimeout

PAGE = 4096
FAULT_SIGNALS = frozenset({_signal.SIGSEGV, _signal.SIGBUS, _signal.SIGILL, _signal.SIGFPE})


@dataclass(slots=True)
class StopReply:
    """A decoded stop reply (``T``/``S``/``W``/``X``)."""

    kind: str  # "signal", "exited", "killed"
    signo: int  # host numbering
    tid: int | None
    status: int | None = None
    values: dict[str, bytes] | None = None


def parse_thread_id(text: str) -> tuple[int | None, int]:
    """``p<pid>.<tid>`` or ``<tid>`` (hex) -> (pid, tid); -1 means all."""
    pid = None
    if text.startswith("p"):
        p, _, t = text[1:].partition(".")
        pid = -1 if p == "-1" else int(p, 16)
        text = t or "-1"
    return pid, (-1 if text == "-1" else int(text, 16))


def parse_stop(reply: bytes) -> StopReply:
    """A stop reply decoded; StubError for anything malformed (bad hex, cut short)."""
    try:
        return _parse_stop(reply)
    except (ValueError, IndexError):
        raise StubError(f"malformed stop reply {reply[:40]!r} from the stub") from None


def _unhex(data: bytes, what: str) -> bytes:
    try:
        return bytes.fromhex(data.decode("latin-1"))
    except ValueError:
        raise StubError(f"the stub sent {what} that is not hex: {data[:40]!r}") from None


def _parse_stop(reply: bytes) -> StopReply:
    text = reply.decode("latin-1")
    code = text[:1]
    if code in ("T", "S"):
        signo = signals.to_host(int(text[1:3], 16))
        tid = None
        values: dict[str, bytes] = {}
        if code == "T":
            for part in text[3:].split(";"):
                key, sep, val = part.partition(":")
                if not sep:
                    continue
                if key == "thread":
                    tid = parse_thread_id(val)[1]
                else:
                    values[key] = val.encode()
        return StopReply("signal", signo, tid, values=values)
    if code == "W":
        return StopReply("exited", 0, None, status=int(text[1:].split(";")[0], 16))
    if code == "X":
        return StopReply("killed", signals.to_host(int(text[1:3], 16)), None)
    raise StubError(f"unexpected stop reply {text[:40]!r}")


class _LazyRegs(dict):
    """A register file whose registers outside the ``g`` block are read on first use."""

    __slots__ = ("_target", "_tid")

    def __init__(self, target: GdbRemoteTarget, tid: int) -> None:
        super().__init__()
        self._target = target
        self._tid = tid

    def __missing__(self, name: str) -> int:
        if name not in self._target.reginfo:
            raise KeyError(name)
        value = self[name] = self._target._fetch_late(self._tid, name)
        return value


def _xol_hints(near: int, size: int, reach: int) -> list[int]:
    """Addresses to ask mmap for (hints: the kernel, or qemu, takes the first free
    range at or above one): around ``near``, closest first, within ``reach``."""
    if not reach:
        return [near & ~(PAGE - 1)] if near else [0]
    out = []
    for mib in (1, 2, 4, 8, 12, 16, 20, 24):
        d = mib << 20
        if d + size >= reach:
            break
        out += [(near + d) & ~(PAGE - 1), (near - d - size) & ~(PAGE - 1)]
    return [h for h in out if h > 0x10000]


class GdbRemoteTarget(Target):
    """One program (any number of threads) behind a GDB stub."""

    #: seconds a free run may take before :meth:`wait` interrupts it (None: forever)
    run_timeout: float | None = None
    #: registers outside the ``g`` block (s390x's access registers under qemu) are read
    #: when first looked at, one ``p`` packet each, instead of at every get_regs: a hit
    #: rarely needs them (the reference CPUs keep reading all of them)
    lazy_extra_registers: bool = False

    def __init__(self, conn: Connection, arch: ArchOps) -> None:
        self.conn = conn
        self.arch = arch
        self.order = arch.byteorder
        self.features = self._handshake()
        self.packet_size = int(self.features.get("PacketSize", "0x400"), 16)
        self.desc = self._target_description()
        self._layout()
        self.pid: int | None = None
        self._selected_g: int | None = None
        self._blobs: dict[int, bytearray] = {}
        self._running: set[int] = set()
        self._resume_mode: tuple[bool, int] | None = None
        self.last_stop: StopReply | None = None
        self._interrupt_pending = False
        #: makes a page writable when the stub refuses a write (set by whoever can
        #: change page protections, e.g. through syscall injection)
        self.make_writable: Callable[[int, int], None] | None = None
        #: the system-call instruction injections borrow (see use_syscall_insn)
        self.syscall_at: int | None = None
        #: the thread of the last stop: in all-stop mode every thread is stopped, and
        #: system calls are injected on this one
        self.stopped_tid: int | None = None
        self._late: dict[int, dict[str, int]] = {}  # registers read one by one, per thread
        #: hold the next resume back until release() (see there)
        self.hold_next_resume = False
        self.held: tuple[int, bool, int] | None = None
        #: pages known to hold code (text written before, XOL areas)
        self.code_pages: set[int] = set()
        reply = self.conn.request(b"?")
        first = parse_stop(reply)
        self.last_stop = first
        threads = self.threads()
        self.tid = first.tid if first.tid not in (None, -1, 0) else (threads[0] if threads else 1)

    # ------------------------------------------------------------------ setup
    def _handshake(self) -> dict[str, str]:
        reply = self.conn.request(b"qSupported:multiprocess+;swbreak+;hwbreak+;"
                                  b"vContSupported+;xmlRegisters=i386")
        feats: dict[str, str] = {}
        for item in reply.decode("latin-1").split(";"):
            if "=" in item:
                k, v = item.split("=", 1)
                feats[k] = v
            elif item.endswith("+"):
                feats[item[:-1]] = "+"
        if feats.get("QStartNoAckMode") == "+" and self.conn.request(b"QStartNoAckMode") == b"OK":
            self.conn.ack = False
        vcont = self.conn.request(b"vCont?").decode("latin-1")
        self.vcont = set(vcont[6:].split(";")) if vcont.startswith("vCont;") else set()
        return feats

    def _xfer(self, obj: str, annex: str) -> bytes | None:
        out = bytearray()
        chunk = max(256, self.packet_size - 64)
        while True:
            reply = self.conn.request(f"qXfer:{obj}:read:{annex}:{len(out):x},{chunk:x}".encode())
            if not reply or reply.startswith(b"E"):
                return None if not out else bytes(out)
            out += reply[1:]
            if reply[:1] == b"l":
                return bytes(out)

    def _target_description(self) -> tdesc.TargetDescription:
        if self.features.get("qXfer:features:read") != "+":
            raise StubError("the stub gives no target description (qXfer:features:read); "
                            "its register layout is unknown")

        def fetch(annex: str) -> str | None:
            data = self._xfer("features", annex)
            return None if data is None else data.decode("utf-8", "replace")

        try:
            desc = tdesc.parse(fetch)
        except (tdesc.ET.ParseError, ValueError) as exc:
            raise StubError(f"the stub's target description is malformed: {exc}") from None
        if not desc.regs:
            raise StubError("the stub's target description lists no registers")
        return desc

    def _layout(self) -> None:
        info = self.desc.by_name()
        missing = [r for r in self.arch.registers if r not in info]
        if missing:
            raise StubError(f"the stub ({self.desc.architecture}) has no register "
                            f"{', '.join(missing)} that the {self.arch.name} plugin uses")
        self.reginfo = info
        self._offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for r in self.desc.regs:
            self._offsets[r.name] = (off, r.size)
            off += r.size
        self._wanted = [(name, *self._offsets[name]) for name in self.arch.registers]
        self._mask = (1 << self.arch.word_bits) - 1

    # ------------------------------------------------------------------ threads
    def threads(self) -> list[int]:
        out: list[int] = []
        reply = self.conn.request(b"qfThreadInfo")
        while reply.startswith(b"m"):
            for item in reply[1:].decode("latin-1").split(","):
                if item:
                    try:
                        pid, tid = parse_thread_id(item)
                    except ValueError:
                        raise StubError(f"malformed thread id {item!r} from the stub") from None
                    if pid not in (None, -1):
                        self.pid = pid
                    out.append(tid)
            reply = self.conn.request(b"qsThreadInfo")
        return out

    def _thread_text(self, tid: int) -> str:
        if self.pid is not None and "multiprocess" in self.features:
            return f"p{self.pid:x}.{tid:x}"
        return f"{tid:x}"

    def _select(self, tid: int) -> None:
        if self._selected_g != tid:
            if self.conn.request(f"Hg{self._thread_text(tid)}".encode()) != b"OK":
                raise TargetError(f"the stub cannot select thread {tid}")
            self._selected_g = tid

    # ------------------------------------------------------------------ registers
    def raw_registers(self, tid: int) -> bytes:
        """The ``g`` packet's register block, as the stub sends it."""
        self._select(tid)
        reply = self.conn.request(b"g")
        if not reply or (reply.startswith(b"E") and len(reply) == 3):
            raise TargetError(f"the stub cannot read the registers of thread {tid}: {reply!r}")
        blob = bytearray(_unhex(reply.replace(b"xx", b"00"), "registers"))
        self._blobs[tid] = blob
        return bytes(blob)

    def read_register(self, tid: int, name: str) -> int:
        """One register by name, through ``p`` (for registers outside the ``g`` block)."""
        self._select(tid)
        reply = self.conn.request(f"p{self.reginfo[name].regnum:x}".encode())
        if not reply or reply.startswith(b"E"):
            raise TargetError(f"the stub cannot read register {name}: {reply!r}")
        return int.from_bytes(_unhex(reply, "a register"), self.order)

    def write_register(self, tid: int, name: str, value: int) -> None:
        info = self.reginfo[name]
        self._select(tid)
        data = (value & ((1 << info.bits) - 1)).to_bytes(info.size, self.order).hex()
        if self.conn.request(f"P{info.regnum:x}={data}".encode()) != b"OK":
            raise TargetError(f"the stub cannot write register {name}")
        blob = self._blobs.get(tid)
        off, size = self._offsets[name]
        if blob is not None and off + size <= len(blob):
            blob[off:off + size] = bytes.fromhex(data)

    def get_regs(self, tid: int) -> Regs:
        lazy = self.lazy_extra_registers
        # the block read since the last resume is still true (a SIGILL stop reads it
        # to tell a breakpoint): one round trip less per hit on s390x
        cached = self._blobs.get(tid) if lazy else None
        blob = bytes(cached) if cached is not None else self.raw_registers(tid)
        order, mask = self.order, self._mask
        regs: dict[str, int] = _LazyRegs(self, tid) if lazy else {}
        late: dict[str, int] = {}
        for name, off, size in self._wanted:
            if off + size <= len(blob):
                regs[name] = int.from_bytes(blob[off:off + size], order) & mask
            elif not lazy:
                regs[name] = self.read_register(tid, name) & mask
        if lazy:
            self._late[tid] = late
        return regs

    def _fetch_late(self, tid: int, name: str) -> int:
        value = self.read_register(tid, name) & self._mask
        self._late.setdefault(tid, {})[name] = value
        return value

    def set_regs(self, tid: int, regs: Regs) -> None:
        blob = self._blobs.get(tid)
        if blob is None:
            self.raw_registers(tid)
            blob = self._blobs[tid]
        order = self.order
        late = []
        for name, off, size in self._wanted:
            if name not in regs:
                continue
            value = regs[name] & ((1 << (8 * size)) - 1)
            if off + size <= len(blob):
                blob[off:off + size] = value.to_bytes(size, order)
            else:
                late.append((name, value))
        self.write_raw_registers(tid, bytes(blob))
        seen = self._late.get(tid, {}) if self.lazy_extra_registers else {}
        for name, value in late:
            if seen.get(name) != value:  # (one packet each: only what changed)
                self.write_register(tid, name, value)

    def write_raw_registers(self, tid: int, blob: bytes) -> None:
        self._select(tid)
        if self.conn.request(b"G" + blob.hex().encode()) != b"OK":
            raise TargetError(f"the stub cannot write the registers of thread {tid}")
        self._blobs[tid] = bytearray(blob)

    # ------------------------------------------------------------------ memory
    def _chunk(self) -> int:
        return max(64, (self.packet_size - 32) // 2)

    def read_memory(self, address: int, size: int) -> bytes:
        out = bytearray()
        step = self._chunk()
        while len(out) < size:
            n = min(step, size - len(out))
            a = address + len(out)
            reply = self.conn.request(f"m{a:x},{n:x}".encode())
            if not reply or (reply.startswith(b"E") and len(reply) == 3):
                raise MemoryFault(address, size)
            out += _unhex(reply, "memory")
            if len(reply) // 2 < n:  # a short read: the rest is not mapped
                raise MemoryFault(address, size)
        return bytes(out)

    def _write(self, address: int, data: bytes) -> bool:
        step = self._chunk() - 16
        for i in range(0, len(data), step):
            piece = data[i:i + step]
            reply = self.conn.request(f"M{address + i:x},{len(piece):x}:".encode()
                                      + piece.hex().encode())
            if reply != b"OK":
                return False
        return True

    def write_memory(self, address: int, data: bytes) -> None:
        if not data:
            return
        if (address & ~(PAGE - 1)) not in self.code_pages and self._write(address, data):
            return
        if self.make_writable is not None:
            # stubs refuse writes to read-only pages (program text under qemu-user)
            self.make_writable(address, len(data))
            if self._write(address, data):
                return
        elif self.syscall_at is not None:
            # a page known as code goes straight to the protection dance: qemu-user
            # writes its data but keeps running what it translated from the old bytes
            if self._write_unprotected(address, data):
                return
        elif self._write(address, data):
            return
        raise MemoryFault(address, len(data), write=True)

    # ------------------------------------------------------------------ execution
    def release(self) -> None:
        """Send the resume that :attr:`hold_next_resume` held back."""
        held, self.held = self.held, None
        if held is not None:
            self.resume(held[0], step=held[1], signal=held[2])

    def resume(self, tid: int, *, step: bool = False, signal: int = 0) -> None:
        if self.hold_next_resume:
            # the engine resumes a thread at the end of a hit; a caller that wants the
            # program to stay stopped there (to add probes first) holds that resume
            self.hold_next_resume = False
            self.held = (tid, step, signal)
            return
        gsig = signals.from_host(signal) if signal else 0
        if self.vcont:
            action = ("S" if gsig else "s") if step else ("C" if gsig else "c")
            sig = f"{gsig:02x}" if gsig else ""
            if step:
                # step this thread only; the others stay stopped (all-stop mode)
                packet = f"vCont;{action}{sig}:{self._thread_text(tid)}"
            else:
                packet = f"vCont;{action}{sig}:{self._thread_text(tid)};c"
            self.conn.send(packet.encode())
        else:
            if self.conn.request(f"Hc{self._thread_text(tid)}".encode()) != b"OK":
                raise TargetError(f"the stub cannot select thread {tid}")
            letter = ("S" if gsig else "s") if step else ("C" if gsig else "c")
            self.conn.send(f"{letter}{gsig:02x}".encode() if gsig else letter.encode())
        self._resume_mode = (step, tid)
        self._blobs.clear()  # every register cache is stale once anything ran

    def wait(self, timeout: float | None = None) -> Stop:
        if self._resume_mode is None:
            raise TargetError("wait() without resume()")
        step, tid = self._resume_mode
        limit = timeout if timeout is not None else (None if step else self.run_timeout)
        early = self.conn.async_stops
        while True:
            try:
                reply = self._take_early(step, tid) if early else None
                if reply is None:
                    reply = self.conn.receive(limit)
                timed_out = False
            except StubTimeout:
                self.interrupt()
                reply = self.conn.receive()
                timed_out = True
            sr = parse_stop(reply)
            if early is not None and step and sr.kind == "signal" and \
                    sr.tid not in (None, -1, 0, tid):
                # another thread's stop (a stub that is not all-stop): it waits its
                # turn; a single-step ends with the stepping thread's own stop
                early.append(reply)
                continue
            if sr.kind == "signal" and sr.signo == _signal.SIGINT and self._interrupt_pending \
                    and not timed_out:
                # the interrupt of an earlier wait, which lost the race with a real stop:
                # it stopped the program before it did anything; go on as asked
                self._interrupt_pending = False
                self.resume(tid, step=step)
                continue
            break
        self._resume_mode = None
        self.last_stop = sr
        stop_tid = sr.tid if sr.tid not in (None, -1, 0) else tid
        # a stub makes the thread that stopped the current one for g/G/p/P (gdbserver
        # and qemu both do): one round trip less per hit
        self._selected_g = stop_tid if sr.tid not in (None, -1, 0) else None
        if sr.kind == "signal":
            self.stopped_tid = stop_tid
        if timed_out:
            if sr.kind == "signal" and sr.signo == _signal.SIGINT:
                return Stop(stop_tid, StopKind.TIMEOUT)
            # the program stopped by itself just as we gave up on it: that stop is real,
            # and our interrupt will show up later
            self._interrupt_pending = True
        if sr.kind == "exited":
            return Stop(stop_tid, StopKind.EXITED, status=sr.status)
        if sr.kind == "killed":
            return Stop(stop_tid, StopKind.EXITED, signo=sr.signo)
        if sr.signo == _signal.SIGTRAP or (sr.signo == _signal.SIGILL
                                            and self._at_breakpoint(stop_tid)):
            return Stop(stop_tid, StopKind.TRAP, _signal.SIGTRAP)
        fault, addr = self._fault_info(stop_tid, sr.signo)
        return Stop(stop_tid, StopKind.SIGNAL, sr.signo, fault=fault, fault_addr=addr)

    def _take_early(self, step: bool, tid: int) -> bytes | None:
        """A stop reply that came early, in order; while ``tid`` steps, only its own."""
        early = self.conn.async_stops
        assert early is not None
        if not step:
            return early.popleft() if early else None
        for i, reply in enumerate(early):
            sr = parse_stop(reply)
            if sr.tid in (None, -1, 0, tid):
                del early[i]
                return reply
        return None

    def _at_breakpoint(self, tid: int) -> bool:
        """True when the instruction just before the pc is the arch's breakpoint.

        Some breakpoints are invalid opcodes (s390x's 0x0001): where no kernel
        debugger turns them into SIGTRAP (qemu-user), they stop with SIGILL.
        """
        arch = self.arch
        try:
            pc = self.get_regs(tid)[arch.abi.pc]
            at = (pc - arch.pc_after_trap) & self._mask
            return self.read_memory(at, len(arch.breakpoint)) == arch.breakpoint
        except TargetError:
            return False

    def interrupt(self) -> None:
        """Ask the stub to stop the running program (its answer is a stop reply)."""
        self.conn.interrupt()

    def _fault_info(self, tid: int, signo: int) -> tuple[bool, int | None]:
        """(synchronous?, faulting address) from ``qXfer:siginfo:read`` when offered."""
        if self.features.get("qXfer:siginfo:read") != "+":
            return signo in FAULT_SIGNALS, None
        self._select(tid)
        data = self._xfer("siginfo", "")
        if not data or len(data) < 16:
            return signo in FAULT_SIGNALS, None
        code = int.from_bytes(data[8:12], self.order, signed=True)
        wb = self.arch.word_bits // 8
        off = 16 if wb == 8 else 12
        addr = int.from_bytes(data[off:off + wb], self.order)
        fault = code > 0
        return fault, addr if fault and signo in (_signal.SIGSEGV, _signal.SIGBUS) else None

    # ------------------------------------------------------------------ injection, XOL
    def use_syscall_insn(self, address: int) -> None:
        """Make system calls (mmap, mprotect) through the system-call instruction at
        ``address``: one the program has, whose next instruction writes no memory
        (qemu-user runs that one too before it reports the step), or UBP's own."""
        self.syscall_at = address

    def injector(self) -> SyscallInjector:
        """An injector on the thread that stopped last (every thread is stopped)."""
        if self.syscall_at is None:
            raise TargetError("no system-call instruction to inject through is known: "
                              "this target cannot map memory or change its protection")
        tid = self.stopped_tid if self.stopped_tid is not None else self.tid
        return SyscallInjector(self, self.arch, tid, self.syscall_at, self._stack_scratch)

    def _stack_scratch(self, tid: int) -> int:
        # below the stack pointer of a stopped thread: no ABI here puts live data there
        sp = self.get_regs(tid)[self.arch.abi.sp]
        return (sp - 1024) & ~0xF

    def own_syscall_page(self, near: int = 0) -> int:
        """A page of UBP's own holding just the system-call instruction followed by
        breakpoints, mapped through the borrowed one, read+execute; later injections
        use it (the borrowed instruction's neighbours need not be harmless twice)."""
        inj = self.injector()
        page = inj.mmap(near & ~(PAGE - 1), PAGE, "rw")
        bp = self.arch.breakpoint
        insn = self.arch.abi.syscall_insn
        body = insn + bp * ((PAGE - len(insn)) // len(bp))
        self._write(page, body + bytes(PAGE - len(body)))
        inj.mprotect(page, PAGE, "rx")
        self.syscall_at = page
        self.code_pages.add(page)
        return page

    def map_xol(self, near: int, size: int, reach: int = 0) -> int:
        """Map an XOL area within ``reach`` of ``near``, read+execute for the program.

        A GDB stub offers no mmap: it is injected.  The area is mapped read+write,
        filled with breakpoints (a thread that runs past a slot's code traps at a known
        place), then made read+execute: the program never has a writable and executable
        page of UBP's making.  Later writes go through :meth:`write_memory`, which
        makes the page writable (not executable) for the write only."""
        inj = self.injector()
        size = (size + PAGE - 1) & ~(PAGE - 1)
        bp = self.arch.breakpoint
        for hint in _xol_hints(near, size, reach):
            try:
                got = inj.mmap(hint, size, "rw")
            except OSError as exc:
                raise TargetError(f"cannot map an XOL area in the program: {exc}") from None
            if reach and (abs(got - near) >= reach - PAGE or abs(got + size - near) >= reach - PAGE):
                inj.munmap(got, size)
                continue
            fill = bp * (size // len(bp))
            if not self._write(got, fill):
                raise TargetError(f"the stub refused to fill the fresh XOL area at {got:#x}")
            inj.mprotect(got, size, "rx")
            for page in range(got, got + size, PAGE):
                self.code_pages.add(page)
            return got
        raise TargetError(f"no XOL area could be mapped within {reach:#x} bytes of {near:#x}")

    def _write_unprotected(self, address: int, data: bytes) -> bool:
        """Write to pages the stub refuses to write (read+execute code): each page is
        made read+write (not executable) for the write, then read+execute again.  All
        threads are stopped meanwhile (all-stop), and making the page writable is also
        what makes qemu-user drop the code it translated from the old bytes."""
        if self.syscall_at is None:
            return False
        inj = self.injector()
        start = address & ~(PAGE - 1)
        end = (address + len(data) + PAGE - 1) & ~(PAGE - 1)
        if start <= self.syscall_at < end:
            raise TargetError(f"{address:#x}: UBP's system-call page is not written to")
        inj.mprotect(start, end - start, "rw")
        try:
            return self._write(address, data)
        finally:
            inj.mprotect(start, end - start, "rx")
            for page in range(start, end, PAGE):
                self.code_pages.add(page)

    def kill(self) -> None:
        try:
            self.conn.send(b"vKill;%x" % self.pid if self.pid else b"k")
        except TargetError:
            pass

    def close(self) -> None:
        self.conn.close()


