"""qemu-user as a reference CPU: any arch whose plugin gives a QemuSpec.

A small harness program (``harness/harness.c``, built with the arch's cross compiler on
first use and cached) runs under ``qemu-<arch> -g``; a :class:`GdbRemoteTarget` drives
it.  The harness stops itself at once, and from then on the kit owns the CPU: regions are
mapped and protected by system calls injected through the harness's own system-call
instruction, and instructions run in those regions.

Things a GDB stub does not give, the harness supplies:
- the address of a SIGSEGV/SIGBUS (for memory that appears on first touch): the signal
  is delivered to the harness's handler, which writes its siginfo to a mailbox and stops;
  the registers are then put back as they were at the fault;
- why a SIGILL came (the same way): an opcode qemu lacks, or the instruction's own
  exception (an operand it rejects), which is a result to compare like any other;
- writes to pages without write permission (qemu refuses them): the page is made
  writable for the write and protected again, which also drops qemu's translated code.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from ..archops import ArchOps
from ..elfinfo import ElfImage
from ..errors import MemoryFault, TargetError
from ..gdbremote.inject import SyscallInjector
from ..gdbremote.protocol import Connection, StubError, connect
from ..gdbremote.target import GdbRemoteTarget
from ..target import Stop, StopKind
from ..types import Analysis, QemuSpec
from . import PAGE, ReferenceCpu, ScratchTarget

HARNESS_SOURCE = Path(__file__).with_name("harness") / "harness.c"
# Far from where the kit places code, data and XOL areas, and below 2 GiB for 32-bit
HARNESS_ADDRESS = 0x7E000000
HARNESS_FLAGS = ("-O2", "-static", "-fno-stack-protector", "-fno-pie", "-no-pie",
                 f"-Wl,-Ttext-segment={HARNESS_ADDRESS:#x}")
MAILBOX_MAGIC = 0x5542504D41494C
SEGV_MAPERR = 1
ILL_ILLOPC = 1  # si_code of SIGILL: illegal opcode
PR_SET_PDEATHSIG = 1
DEFAULT_TIMEOUT = 2.0  # wall clock, on a CPU shared with other work


def cache_dir() -> Path:
    base = os.environ.get("UBP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ubp")
    return Path(base) / "harness"


def harness_path(spec: QemuSpec) -> Path:
    """The harness binary for ``spec``'s compiler, built if missing."""
    if spec.cc is None:
        raise TargetError(f"no cross compiler named for {spec.binary}'s harness")
    source = HARNESS_SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((spec.cc, *HARNESS_FLAGS)).encode()).hexdigest()[:16]
    out = cache_dir() / f"{spec.cc}-{key}"
    if out.exists():
        return out
    cc = shutil.which(spec.cc)
    if cc is None:
        raise TargetError(f"{spec.cc} is not installed; it builds the qemu harness")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *HARNESS_FLAGS, "-o", tmp, str(HARNESS_SOURCE)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise TargetError(f"building the harness with {spec.cc} failed:\n{proc.stderr}")
        os.replace(tmp, out)  # atomic: parallel workers may build it at once
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the tracer dies.  A harness left behind
    by a killed test run may be spinning in a test's loop, with nobody to stop it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _symbol_address(img: ElfImage, name: str) -> int | None:
    sec = img.elf.get_section_by_name(".symtab")
    syms = sec.get_symbol_by_name(name) if sec is not None else None
    return syms[0]["st_value"] if syms else None


class QemuCpu(ReferenceCpu):
    name = "qemu"
    fidelity = 80

    def unavailable(self) -> str | None:
        spec = self.arch.qemu_spec()
        if spec is None:
            return f"the {self.arch.name} plugin gives no QemuSpec"
        if shutil.which(spec.binary) is None:
            return f"{spec.binary} is not installed (Debian package qemu-user)"
        if spec.cc is None or shutil.which(spec.cc) is None:
            try:
                harness_path(spec)
            except TargetError as exc:
                return str(exc)
        return None

    def cannot_run(self, analysis: Analysis) -> str | None:
        spec = self.arch.qemu_spec()
        if spec is not None and spec.unfaithful is not None:
            why = spec.unfaithful(analysis)
            if why:
                return why
        # qemu-user makes the system calls a case makes, as real silicon does
        return self.arch.hardware_hazard(analysis)

    def open(self) -> QemuScratchTarget:
        spec = self.arch.qemu_spec()
        assert spec is not None
        return QemuScratchTarget(self.arch, spec, harness_path(spec))


class QemuScratchTarget(ScratchTarget, GdbRemoteTarget):
    """The harness under qemu-user, as a scratch target for the conformance kit."""

    def __init__(self, arch: ArchOps, spec: QemuSpec, harness: Path) -> None:
        self.spec = spec
        self._tmpdir = tempfile.mkdtemp(prefix="ubp-qemu-")
        sock = os.path.join(self._tmpdir, "gdb")
        argv = [spec.binary]
        if spec.cpu:
            argv += ["-cpu", spec.cpu]
        argv += ["-g", sock, str(harness)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=_die_with_parent)
        try:
            GdbRemoteTarget.__init__(self, Connection(connect(sock)), arch)
            self._boot(harness)
        except BaseException:
            self.close()
            raise
        self._regions: dict[int, str] = {}
        self._lazy: list[int] = []
        # (the vector/FPU blob keeps the stub's byte order: it is only compared)
        # contents of the pages the program cannot write: only our writes change them
        self._shadow: dict[int, bytearray] = {}
        self.run_timeout = DEFAULT_TIMEOUT
        self._ext_info = [self.reginfo[n] for n in spec.ext_registers if n in self.reginfo]

    def _boot(self, harness: Path) -> None:
        with ElfImage(str(harness)) as img:
            syms = {s.name: s for s in img.symbols}
            mailbox = _symbol_address(img, "ubp_mailbox")
            scratch = _symbol_address(img, "ubp_scratch")
            func = syms.get("syscall")
            code = img.read(func.address, func.size) if func is not None else b""
            insn_addr = None
            for insn in self.arch.decode_all(code, func.address if func else 0):
                if insn.raw == self.arch.abi.syscall_insn:
                    insn_addr = insn.address
                    break
        if mailbox is None or insn_addr is None:
            raise TargetError(f"{harness} lacks ubp_mailbox or a system-call instruction "
                              "in syscall()")
        self.mailbox = mailbox
        self.resume(self.tid)
        stop = GdbRemoteTarget.wait(self, 10.0)
        if stop.kind is not StopKind.TRAP or self._read_mailbox()[0] != MAILBOX_MAGIC:
            raise TargetError(f"the harness under {self.spec.binary} did not start ({stop})")
        self.inject = SyscallInjector(self, self.arch, self.tid, insn_addr, scratch)
        # the harness's own registers (thread pointer, TOC ...): its handler runs on them
        self._home = self.raw_registers(self.tid)

    def _read_mailbox(self) -> tuple[int, int, int, int, int]:
        raw = GdbRemoteTarget.read_memory(self, self.mailbox, 40)
        o = self.arch.byteorder
        return tuple(int.from_bytes(raw[i:i + 8], o) for i in range(0, 40, 8))  # type: ignore

    # ------------------------------------------------------------------ regions
    def map_region(self, address: int, size: int, prot: str) -> None:
        start = address & ~(PAGE - 1)
        end = (address + size + PAGE - 1) & ~(PAGE - 1)
        for page in range(start, end, PAGE):
            if page in self._lazy:
                self._unmap_page(page)
                self._lazy.remove(page)
            have = self._regions.get(page)
            if have == prot:
                continue
            try:
                if have is not None:
                    self.inject.mprotect(page, PAGE, prot)
                elif not self.inject.mmap_exactly(page, PAGE, prot):
                    raise TargetError(f"cannot map a page at {page:#x} under {self.spec.binary}")
            except OSError as exc:
                raise TargetError(f"cannot map {page:#x}: {exc}") from None
            self._regions[page] = prot
            if "w" in prot:
                self._shadow.pop(page, None)
            elif have is None:
                self._shadow[page] = bytearray(PAGE)

    def _unmap_page(self, page: int) -> None:
        self.inject.munmap(page, PAGE)
        self._shadow.pop(page, None)

    def _map_lazy(self, address: int) -> bool:
        page = address & ~(PAGE - 1)
        if self.filler is None or not self.lazy_budget_left():
            return False
        if page in self._regions or page in self._lazy or not self.arch.canonical_address(page):
            return False
        try:
            if not self.inject.mmap_exactly(page, PAGE, "rw"):
                return False
        except OSError:
            return False
        GdbRemoteTarget.write_memory(self, page, self.filler(page))
        self._lazy.append(page)
        return True

    # ------------------------------------------------------------------ memory
    def write_memory(self, address: int, data: bytes) -> None:
        end = address + len(data)
        pos = address
        while pos < end:
            page = pos & ~(PAGE - 1)
            stop = min(end, page + PAGE)
            piece = data[pos - address:stop - address]
            shadow = self._shadow.get(page)
            if shadow is None:
                GdbRemoteTarget.write_memory(self, pos, piece)
            else:
                self._write_protected(page, shadow, pos - page, piece)
            pos = stop

    def _write_protected(self, page: int, shadow: bytearray, off: int, piece: bytes) -> None:
        lo = next((i for i in range(len(piece)) if shadow[off + i] != piece[i]), None)
        if lo is None:
            return  # already there: no page-protection dance
        hi = len(piece)
        while hi > lo and shadow[off + hi - 1] == piece[hi - 1]:
            hi -= 1
        prot = self._regions[page]
        # writable for the write; putting the protection back also makes qemu drop
        # what it translated from the old bytes
        self.inject.mprotect(page, PAGE, "rw")
        try:
            GdbRemoteTarget.write_memory(self, page + off + lo, piece[lo:hi])
        finally:
            self.inject.mprotect(page, PAGE, prot)
        shadow[off + lo:off + hi] = piece[lo:hi]

    # ------------------------------------------------------------------ vector/FPU state
    def get_ext_state(self) -> bytes | None:
        if not self._ext_info:
            return None
        self._select(self.tid)
        out = bytearray()
        for r in self._ext_info:
            reply = self.conn.request(f"p{r.regnum:x}".encode())
            if len(reply) != 2 * r.size:
                raise TargetError(f"the stub cannot read register {r.name}: {reply[:20]!r}")
            out += bytes.fromhex(reply.decode())
        return bytes(out)

    def set_ext_state(self, state: bytes) -> None:
        self._select(self.tid)
        off = 0
        for r in self._ext_info:
            reply = self.conn.request(f"P{r.regnum:x}={state[off:off + r.size].hex()}".encode())
            if reply != b"OK":
                raise TargetError(f"the stub cannot write register {r.name}: {reply!r}")
            off += r.size

    def random_ext_state(self, rng: random.Random) -> bytes | None:
        if not self._ext_info:
            return None
        return rng.randbytes(sum(r.size for r in self._ext_info))

    # ------------------------------------------------------------------ execution
    def interrupt(self) -> None:
        # qemu-user reads the stub's socket only when the program gets a signal, so the
        # interrupt byte is not seen by a program spinning in a loop: signal the process
        self.proc.send_signal(signal.SIGINT)

    def wait(self, timeout: float | None = None) -> Stop:
        while True:
            step = self._resume_mode[0] if self._resume_mode else False
            stop = GdbRemoteTarget.wait(self, timeout)
            if stop.kind is StopKind.SIGNAL and stop.signo == signal.SIGILL:
                return self._sigill(stop)
            if stop.kind is not StopKind.SIGNAL or stop.signo not in (signal.SIGSEGV, signal.SIGBUS):
                return stop
            signo, code, addr = self._siginfo(stop)
            pc = self.get_regs(self.tid)[self.arch.abi.pc]
            if code > 0 and "x" not in self._regions.get(pc & ~(PAGE - 1), ""):
                # fetching the instruction at the pc failed (some kernels, s390's, give
                # only the page of a faulting address)
                addr = pc
            elif signo == signal.SIGSEGV and code == SEGV_MAPERR:
                if addr != pc and self._map_lazy(addr):
                    self.resume(self.tid, step=step)
                    continue
            return Stop(stop.tid, StopKind.SIGNAL, stop.signo, fault=code > 0,
                        fault_addr=addr if code > 0 else None)

    def _sigill(self, stop: Stop) -> Stop:
        """A SIGILL, told apart by its si_code: ILL_ILLOPC is an opcode this qemu does
        not know (or, where qemu reports privileged opcodes the same way, one it may
        know): undecided.  Any other code (an illegal operand, a privileged opcode) is
        what the instruction itself does, which every strategy must reproduce; so is
        any SIGILL at an address no instruction of the arch can have (a branch went
        there, and what qemu found at it is the program's doing, not a gap in qemu)."""
        _, code, addr = self._siginfo(stop)
        known = code != ILL_ILLOPC or addr % self.arch.insn_alignment != 0
        return Stop(stop.tid, StopKind.SIGNAL, stop.signo, fault=True,
                    fault_addr=stop.fault_addr, unsupported=False if known else None)

    def _siginfo(self, stop: Stop) -> tuple[int, int, int]:
        """Deliver the signal to the harness's handler; (signo, si_code, si_addr)."""
        saved = self.raw_registers(self.tid)
        count = self._read_mailbox()[4]
        # the handler is libc code: it must not run on the test's random registers (a
        # random thread pointer faults in libc's system-call wrapper).  qemu delivers the
        # siginfo recorded at the fault whatever the registers are now.
        self.write_raw_registers(self.tid, self._home)
        self.resume(self.tid, signal=stop.signo)
        got = GdbRemoteTarget.wait(self, 10.0)
        _, signo, code, addr, after = self._read_mailbox()
        self.write_raw_registers(self.tid, saved)
        if got.kind is not StopKind.TRAP or after != count + 1:
            raise TargetError(f"the harness's fault handler did not report ({got})")
        if code >> 63:
            code -= 1 << 64
        return signo, code, addr & self._mask

    def close(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.close()
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(getattr(self, "_tmpdir", ""), ignore_errors=True)


__all__ = ["MemoryFault", "QemuCpu", "QemuScratchTarget", "StubError", "harness_path"]
