"""The GDB-remote Target and the qemu-user reference CPU, on the powerpc variants.

The protocol pieces are checked against hand-made packets; everything else runs the
real harness under the real qemu-user stub.
"""

from __future__ import annotations

import signal
import socket
import threading

import pytest
from test_powerpc_support import VARIANTS, qemu_cpu

from ubp_core.errors import MemoryFault
from ubp_core.gdbremote import protocol, signals, tdesc
from ubp_core.gdbremote.target import parse_stop, parse_thread_id
from ubp_core.refcpu import PAGE
from ubp_core.target import StopKind

CODE = 0x401000
DATA = 0x30000000


# --------------------------------------------------------------------------- protocol
def test_checksum_and_escapes():
    assert protocol.checksum(b"g") == b"67"
    assert protocol.escape(b"a#b$c}d*") == b"a}\x03b}\x04c}]d}\n"
    assert protocol._unescape(b"a}\x03b}\x04c}]d}\n") == b"a#b$c}d*"
    assert protocol._unescape(b"0* ") == b"0000"  # run-length: ' ' is 32 - 29 = 3 more


def test_connection_acks_resends_and_skips_console_output():
    ours, stub = socket.socketpair()
    conn = protocol.Connection(ours, timeout=5)
    seen = []

    def until(count):
        data = b""
        while data.count(b"#") < count:
            data += stub.recv(100)
        return data

    def fake_stub():
        stub.settimeout(5)
        first = until(1)
        stub.sendall(b"-")  # "send it again"
        seen.append(first + until(1))
        stub.sendall(b"+$OK#9a")
        seen.append(until(1))
        stub.sendall(b"+$O6869#" + protocol.checksum(b"O6869") + b"$E01#a6")

    t = threading.Thread(target=fake_stub)
    t.start()
    conn.send(b"m0,4")
    assert conn.receive() == b"OK"
    assert conn.request(b"g") == b"E01"  # console output ("O" + hex) skipped
    t.join()
    assert seen[0].count(b"$m0,4#") == 2
    assert seen[1].startswith(b"+$g#67")  # our ack rides with the next packet
    ours.close()
    stub.close()


def test_stop_replies_and_thread_ids():
    sr = parse_stop(b"T0bthread:p1.2a;06:0000;")
    assert (sr.kind, sr.signo, sr.tid) == ("signal", signal.SIGSEGV, 0x2A)
    assert parse_stop(b"S05").signo == signal.SIGTRAP
    assert parse_stop(b"W00").status == 0
    assert parse_stop(b"X09").kind == "killed"
    assert parse_thread_id("p1f.-1") == (0x1F, -1)
    assert parse_thread_id("3e") == (None, 0x3E)


def test_gdb_signal_numbers_are_not_linux_numbers():
    assert signals.to_host(10) == signal.SIGBUS and signals.from_host(signal.SIGBUS) == 10
    assert signals.to_host(20) == signal.SIGCHLD
    assert signals.to_host(11) == signal.SIGSEGV
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        assert signals.to_host(signals.from_host(sig)) == sig


def test_target_description_with_includes_and_regnums():
    files = {
        "target.xml": '<target><architecture>toy</architecture><xi:include href="a.xml"/>'
                      '<xi:include href="b.xml"/></target>',
        "a.xml": '<feature><reg name="r0" bitsize="64"/><reg name="pc" bitsize="64"/></feature>',
        "b.xml": '<feature><reg name="f0" bitsize="64" regnum="10"/><reg name="f1" bitsize="64"/>'
                 '</feature>',
    }
    desc = tdesc.parse(files.get)
    assert desc.architecture == "toy"
    assert [(r.name, r.regnum, r.size) for r in desc.regs] == [
        ("r0", 0, 8), ("pc", 1, 8), ("f0", 10, 8), ("f1", 11, 8)]


# --------------------------------------------------------------------------- live qemu
@pytest.fixture(scope="module", params=list(VARIANTS))
def target(request, plugins):
    arch = plugins.arch(request.param)
    t = qemu_cpu(plugins, arch).open()
    yield t
    t.close()


def _word(t, w):
    return w.to_bytes(4, t.arch.byteorder)


def _start(t, code, **regs):
    t.map_region(CODE, PAGE, "rx")
    t.write_memory(CODE, (code + t.arch.breakpoint * 1024)[:PAGE])
    fresh = {r: 0 for r in t.arch.registers}
    fresh.update(pc=CODE, r1=DATA + 0x800, **regs)
    t.get_regs(t.tid)
    t.set_regs(t.tid, fresh)


def test_stub_handshake_and_layout(target):
    assert target.desc.architecture.startswith("powerpc")
    assert target.features["qXfer:features:read"] == "+"
    assert set(target.arch.registers) <= set(target.reginfo)
    assert target.threads() == [target.tid]


def test_registers_round_trip(target):
    _start(target, b"", r3=0x1234, ctr=0x55, cr=0x80000001, xer=0x20000000)
    regs = target.get_regs(target.tid)
    assert (regs["r3"], regs["ctr"], regs["cr"], regs["xer"]) == (0x1234, 0x55, 0x80000001,
                                                                   0x20000000)
    target.write_register(target.tid, "f3", 0x4008000000000000)
    assert target.read_register(target.tid, "f3") == 0x4008000000000000


def test_step_continue_and_read_only_text(target):
    # li r3,7 ; addi r3,r3,1 ; then the breakpoint fill
    _start(target, _word(target, 0x38600007) + _word(target, 0x38630001))
    target.resume(target.tid, step=True)
    assert target.wait().kind is StopKind.TRAP
    assert target.get_regs(target.tid)["pc"] == CODE + 4
    target.resume(target.tid)
    stop = target.wait()
    regs = target.get_regs(target.tid)
    assert stop.kind is StopKind.TRAP and regs["pc"] == CODE + 8 and regs["r3"] == 8
    # the page is r-x: the program cannot write it, the target can
    from ubp_core.gdbremote.target import GdbRemoteTarget

    assert not GdbRemoteTarget._write(target, CODE + 64, b"\0\0\0\0")
    target.write_memory(CODE + 64, _word(target, 0x60000000))
    assert target.read_memory(CODE + 64, 4) == _word(target, 0x60000000)


def test_fault_address_from_the_harness_handler(target):
    # lwz r3,0(r4) from an unmapped page, no lazy memory: the fault and its address
    target.filler = None
    _start(target, _word(target, 0x80640000), r4=0x7000_1230)
    target.resume(target.tid)
    stop = target.wait()
    assert (stop.kind, stop.signo, stop.fault) == (StopKind.SIGNAL, signal.SIGSEGV, True)
    assert stop.fault_addr == 0x7000_1230
    assert target.get_regs(target.tid)["pc"] == CODE  # registers put back after the handler


def test_lazy_page_appears_with_the_filler(target):
    target.drop_lazy_pages()
    target.begin_case()
    target.filler = lambda page: (page >> 12).to_bytes(4, target.arch.byteorder) * (PAGE // 4)
    _start(target, _word(target, 0x80640010), r4=DATA + 0x5000)  # lwz r3,16(r4)
    target.resume(target.tid)
    stop = target.wait()
    assert stop.kind is StopKind.TRAP
    assert target.lazy_pages() == [DATA + 0x5000]
    assert target.get_regs(target.tid)["r3"] == (DATA + 0x5000) >> 12
    target.drop_lazy_pages()
    target.filler = None
    with pytest.raises(MemoryFault):
        target.read_memory(DATA + 0x5000, 4)


def test_a_spinning_program_is_stopped(target):
    _start(target, _word(target, 0x48000000))  # b .
    target.resume(target.tid)
    assert target.wait(0.3).kind is StopKind.TIMEOUT
    assert target.get_regs(target.tid)["pc"] == CODE


def test_system_call_injection(target):
    pid = target.inject("getpid")
    assert pid == target.proc.pid
    with pytest.raises(OSError) as err:
        target.inject("munmap", 0x1001, PAGE)  # unaligned: EINVAL
    assert err.value.errno == 22
    before = target.get_regs(target.tid)
    assert target.inject.mmap_exactly(0x3F000000, PAGE, "rw")
    assert target.get_regs(target.tid) == before  # every register put back
    target.inject.munmap(0x3F000000, PAGE)


class FakeStub(threading.Thread):
    """A scripted stub: enough packets for a GdbRemoteTarget, and stop replies on cue."""

    def __init__(self, sock, stops):
        super().__init__(daemon=True)
        self.sock = sock
        self.stops = list(stops)  # per vCont;c: (delay seconds, stop reply)
        self.seen: list[bytes] = []
        regs = "".join(f'<reg name="r{i}" bitsize="32"/>' for i in range(32))
        regs += "".join(f'<reg name="{n}" bitsize="32"/>' for n in ("pc", "msr", "cr", "lr",
                                                                    "ctr", "xer"))
        self.xml = f"<target><architecture>powerpc:common</architecture><feature>{regs}" \
                   "</feature></target>"

    def reply(self, body: bytes) -> None:
        self.sock.sendall(b"$" + body + b"#" + protocol.checksum(body))

    def answer(self, p: bytes) -> bytes | None:
        if p.startswith(b"qSupported"):
            return b"PacketSize=1000;qXfer:features:read+;multiprocess+"
        if p == b"vCont?":
            return b"vCont;c;C;s;S"
        if p.startswith(b"qXfer:features:read:target.xml:"):
            return b"l" + self.xml.encode()
        if p == b"?":
            return b"T05thread:p1.1;"
        if p == b"qfThreadInfo":
            return b"mp1.1"
        if p == b"qsThreadInfo":
            return b"l"
        if p.startswith(b"H"):
            return b"OK"
        if p == b"g":
            return b"00" * (38 * 4)
        return b""

    def run(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(4096)
                if not chunk:
                    return
                buf += chunk
                while True:
                    buf = buf.lstrip(b"+\x03")
                    if not buf.startswith(b"$") or b"#" not in buf or \
                            len(buf) < buf.index(b"#") + 3:
                        break
                    end = buf.index(b"#")
                    p, buf = buf[1:end], buf[end + 3:]
                    self.seen.append(p)
                    if p.startswith(b"vCont;c"):
                        delay, stop = self.stops.pop(0)
                        threading.Timer(delay, self.reply, (stop,)).start()
                    else:
                        self.reply(self.answer(p))
        except OSError:
            return


def test_an_interrupt_that_loses_the_race_with_a_real_stop(plugins):
    ours, theirs = socket.socketpair()
    # the first run stops by itself after the wait gave up; the interrupt then shows up
    # as a SIGINT stop at the next resume, which must be swallowed
    stub = FakeStub(theirs, [(0.3, b"T05thread:p1.1;"), (0.0, b"T02thread:p1.1;"),
                             (0.0, b"T05thread:p1.1;")])
    stub.start()
    from ubp_core.gdbremote.target import GdbRemoteTarget

    t = GdbRemoteTarget(protocol.Connection(ours, timeout=5), plugins.arch("ppc32"))
    t.interrupt = lambda: None  # the stop is already on its way
    t.resume(t.tid)
    assert t.wait(0.1).kind is StopKind.TRAP  # late, but real
    t.resume(t.tid)
    assert t.wait(2).kind is StopKind.TRAP
    assert sum(p.startswith(b"vCont;c") for p in stub.seen) == 3
    ours.close()
    theirs.close()
