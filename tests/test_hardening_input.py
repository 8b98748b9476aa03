"""Bad input: arbitrary bytes through every installed plugin's decode and analysis (and the
hooks an analysis allows), hostile ELF files for the symbol reader, malformed probe specs,
and a hostile GDB stub.  Each gets a clear UbpError-derived message or works; never
another exception, never a hang.

The million-input fuzz per plugin is the opt-in long part; its command is
``python tests/hardening.py fuzz`` (figures in docs/hardening.md).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from hardening import fuzz, fuzz_one
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubp_core.elfinfo import ElfFileError, ElfImage, elf_ident_of
from ubp_core.errors import ProbeError, TargetError, UbpError
from ubp_core.gdbremote import protocol
from ubp_core.plugins import default_plugins
from ubp_core.spec import ProbeSpec, parse_spec

pytestmark = pytest.mark.hardening

ARCHS = [a.name for a in default_plugins().archs]


def test_every_arch_the_issue_names_is_installed():
    assert {"x86_64", "ppc64le", "ppc64", "ppc32", "s390x"} <= set(ARCHS)


# ---------------------------------------------------------------- plugins
@pytest.mark.parametrize("name", ARCHS)
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=20), address=st.integers(0, (1 << 47) - 1))
def test_arbitrary_bytes_through_every_plugin(name, data, address):
    arch = default_plugins().arch(name)
    address -= address % max(arch.insn_alignment, 1)
    assert fuzz_one(arch, data, address) is None


def test_fuzz_sample_every_plugin():
    """The fast sample of the long fuzz run: 3,000 inputs per arch, no error."""
    results = fuzz(None, 3000, seed=7)
    assert {r["arch"] for r in results} == set(ARCHS)
    assert [r["first_errors"] for r in results if r["errors"]] == []
    for r in results:
        print(f"\n{r['arch']}: {r['inputs']} inputs, {r['inputs_per_s']}/s, "
              f"{r['decoded_percent']}% decoded, {r['errors']} errors")


@pytest.mark.long
@pytest.mark.parametrize("name", ARCHS)
def test_fuzz_a_million_inputs(name):
    (r,) = fuzz([name], 1_000_000, seed=1)
    print(f"\n{r}")
    assert r["errors"] == 0, r["first_errors"]


# ---------------------------------------------------------------- ELF files
@pytest.fixture(scope="module")
def good_elf(tmp_path_factory):
    path = tmp_path_factory.mktemp("elf") / "good"
    src = path.with_suffix(".c")
    src.write_text("int f(int x) { return x + 1; }\nint main(void) { return f(0); }\n")
    subprocess.run(["gcc", "-O1", "-o", str(path), str(src)], check=True)
    return path.read_bytes()


def _read_everything(path: str) -> None:
    """What the symbol reader does with a file; must work or raise ElfFileError."""
    elf_ident_of(path)
    with ElfImage(path) as img:
        funcs = img.functions()
        img.symbols  # noqa: B018
        img.executable_ranges()
        img.data_symbol("_r_debug")
        for sym in funcs[:50]:
            img.read(sym.address, sym.size)


def _must_fail_cleanly(path: str) -> str:
    try:
        _read_everything(path)
    except ElfFileError as exc:
        msg = str(exc)
        assert str(path) in msg and msg.strip(), msg
        return msg
    return ""


def _header(data: bytes) -> dict[str, int]:
    (e_phoff, e_shoff, _flags, _ehsize, _phentsize, e_phnum, _shentsize, e_shnum,
     e_shstrndx) = struct.unpack_from("<QQIHHHHHH", data, 0x20)
    return {"phoff": e_phoff, "shoff": e_shoff, "phnum": e_phnum, "shnum": e_shnum,
            "shstrndx": e_shstrndx}


def _sections(data: bytes) -> list[tuple[int, int, int, int, int]]:
    """(header offset, type, offset, size, link) of each section header."""
    h = _header(data)
    out = []
    for i in range(h["shnum"]):
        at = h["shoff"] + i * 64
        _name, sh_type, _flags, _addr, off, size, link = struct.unpack_from("<IIQQQQI", data, at)
        out.append((at, sh_type, off, size, link))
    return out


def _patch(data: bytes, at: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def _hostile(good: bytes) -> dict[str, bytes]:
    h = _header(good)
    symtab = next(s for s in _sections(good) if s[1] == 2)  # SHT_SYMTAB
    cases = {
        "empty": b"",
        "three bytes": good[:3],
        "ident only": good[:16],
        "half a header": good[:40],
        "header only": good[:64],
        "truncated in the middle": good[:len(good) // 2],
        "truncated before the section headers": good[:h["shoff"] + 10],
        "not ELF": b"#!/bin/sh\necho hello\n" * 10,
        "bad class": _patch(good, 4, "<B", 7),
        "bad byte order": _patch(good, 5, "<B", 9),
        "section headers far away": _patch(good, 0x28, "<Q", 1 << 60),
        "section headers past the end": _patch(good, 0x28, "<Q", len(good) + 4096),
        "huge section count": _patch(good, 0x3C, "<H", 0xFFFF),
        "bogus section name table": _patch(good, 0x3E, "<H", 0xFFF0),
        "program headers far away": _patch(good, 0x20, "<Q", 1 << 62),
        "huge program header count": _patch(good, 0x38, "<H", 0xFFFF),
        "symbol table past the end": _patch(good, symtab[0] + 0x18, "<Q", len(good) * 4),
        "symbol table huge": _patch(good, symtab[0] + 0x20, "<Q", 1 << 40),
        "symbol table odd size": _patch(good, symtab[0] + 0x20, "<Q", 7),
        "symbol names in a bogus section": _patch(good, symtab[0] + 0x28, "<I", 0xFFFF),
        "symbol names in the symbol table": _patch(good, symtab[0] + 0x28, "<I",
                                                   _sections(good).index(symtab)),
        "zero-sized entries": _patch(good, symtab[0] + 0x38, "<Q", 0),
    }
    return cases


def test_hostile_elf_files(good_elf, tmp_path):
    """Truncated headers, bogus offsets, huge counts: a clear ElfFileError naming the file
    (or a file that still reads), never another exception."""
    failed = {}
    for name, data in _hostile(good_elf).items():
        path = tmp_path / name.replace(" ", "_")
        path.write_bytes(data)
        failed[name] = _must_fail_cleanly(str(path))
    assert failed["empty"] and failed["three bytes"] and failed["not ELF"]
    print(f"\n{len(failed)} hostile ELF files: {sum(bool(m) for m in failed.values())} "
          "refused with a clear message, the rest still read; 0 tracebacks")


def test_paths_that_are_not_files(tmp_path):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    a, b = tmp_path / "a", tmp_path / "b"
    os.symlink(b, a)
    os.symlink(a, b)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (loop, a, tmp_path, tmp_path / "missing", fifo, "/proc/self/mem", "/dev/null"):
        with pytest.raises(ElfFileError, match=str(path).replace("/", ".")):
            _read_everything(str(path))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1,
                      max_size=8))
def test_random_corruption_of_an_elf_file(good_elf, tmp_path_factory, flips):
    data = bytearray(good_elf)
    h = _header(good_elf)
    regions = [0, h["shoff"], h["phoff"]]
    for i, (at, value) in enumerate(flips):
        pos = (regions[i % 3] + at) % len(data)
        data[pos] = value
    path = tmp_path_factory.mktemp("flip") / "f"
    path.write_bytes(bytes(data))
    _must_fail_cleanly(str(path))


def test_analyze_command_on_hostile_files(good_elf, tmp_path):
    """``ubp analyze`` on them: exit status 2 and one line, no traceback."""
    for name in ("truncated in the middle", "section headers far away", "huge section count"):
        path = tmp_path / name.replace(" ", "_")
        path.write_bytes(_hostile(good_elf)[name])
        out = subprocess.run([sys.executable, "-m", "ubp_core.cli", "analyze", str(path)],
                             capture_output=True, text=True, timeout=120)
        assert "Traceback" not in out.stderr, out.stderr
        assert out.returncode in (0, 2), out.stderr


# ---------------------------------------------------------------- probe specs
@settings(max_examples=2000, deadline=None)
@given(text=st.text(max_size=60))
def test_arbitrary_probe_specs(text):
    try:
        spec = parse_spec(text)
    except ProbeError as exc:
        assert str(exc)
        return
    assert isinstance(spec, ProbeSpec) and spec.offset >= 0


_parts = st.sampled_from(["libc", "", "/lib/x", "a:b", "::", "0x", "0x10", "-1", "+", "%return",
                          "*", "[", "f", "main", "str*", " x:u8", " ret:i32", " p:str[4]",
                          " p:str[]", " :", "+0x", "+-3", "+99999999999999999999", "\x00",
                          "é", ":", "%", "%return%return"])


@settings(max_examples=2000, deadline=None)
@given(pieces=st.lists(_parts, max_size=6))
def test_probe_specs_built_from_pieces(pieces):
    test_arbitrary_probe_specs.hypothesis.inner_test("".join(pieces))


# ---------------------------------------------------------------- a hostile GDB stub
XML = ("<target><architecture>powerpc:common</architecture><feature>"
       + "".join(f'<reg name="r{i}" bitsize="32"/>' for i in range(32))
       + "".join(f'<reg name="{n}" bitsize="32"/>' for n in ("pc", "msr", "cr", "lr", "ctr",
                                                             "xer"))
       + "</feature></target>")


class HostileStub(threading.Thread):
    """A tiny TCP GDB stub: answers the handshake, then misbehaves as ``bad`` says."""

    def __init__(self, bad: dict[bytes, bytes | None], raw: bytes | None = None) -> None:
        super().__init__(daemon=True)
        self.bad = bad  # packet prefix -> raw bytes to send (None: say nothing)
        self.raw = raw  # sent as soon as a client connects, before anything
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conn: socket.socket | None = None

    def answer(self, p: bytes) -> bytes | None:
        for prefix, raw in self.bad.items():
            if p.startswith(prefix):
                return raw
        body = b""
        if p.startswith(b"qSupported"):
            body = b"PacketSize=1000;qXfer:features:read+"
        elif p == b"vCont?":
            body = b"vCont;c;C;s;S"
        elif p.startswith(b"qXfer:features:read:target.xml:"):
            body = b"l" + XML.encode()
        elif p == b"?":
            body = b"T05thread:1;"
        elif p == b"qfThreadInfo":
            body = b"m1"
        elif p == b"qsThreadInfo":
            body = b"l"
        elif p.startswith(b"H"):
            body = b"OK"
        elif p == b"g":
            body = b"00" * (38 * 4)
        elif p.startswith(b"m"):
            body = b"00" * int(p.split(b",")[1], 16)
        return b"+$" + body + b"#" + protocol.checksum(body)

    def run(self) -> None:
        try:
            self.conn, _ = self.server.accept()
            if self.raw is not None:
                self.conn.sendall(self.raw)
            buf = b""
            while True:
                chunk = self.conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
                while True:
                    buf = buf.lstrip(b"+-\x03")
                    if not buf.startswith(b"$") or b"#" not in buf or \
                            len(buf) < buf.index(b"#") + 3:
                        break
                    end = buf.index(b"#")
                    p, buf = buf[1:end], buf[end + 3:]
                    out = self.answer(p)
                    if out is not None:
                        self.conn.sendall(out)
        except OSError:
            return

    def close(self) -> None:
        for s in (self.conn, self.server):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass


def _target(stub: HostileStub, timeout: float = 2.0):
    from ubp_core.gdbremote.target import GdbRemoteTarget

    sock = protocol.connect(f"127.0.0.1:{stub.port}", timeout=5)
    return GdbRemoteTarget(protocol.Connection(sock, timeout=timeout),
                           default_plugins().arch("ppc32"))


def _bad(body: bytes, checksum: bytes | None = None) -> bytes:
    return b"+$" + body + b"#" + (checksum or protocol.checksum(body))


HOSTILE = {
    "bad checksum on every reply": ({b"qSupported": _bad(b"OK", b"00")}, None),
    "truncated reply, then silence": ({b"qSupported": b"+$PacketSize=10"}, None),
    "truncated reply, then hang up": ({b"qSupported": b"+$Packet" + b"\x00" * 0}, b""),
    "no reply at all": ({b"qSupported": None}, None),
    "garbage before every packet": ({b"qSupported": b"garbage" + _bad(b"x")}, None),
    "garbage stop reply": ({b"?": _bad(b"Zzz")}, None),
    "stop reply with bad hex": ({b"?": _bad(b"Tzzthread:1;")}, None),
    "stop reply with a bad thread id": ({b"?": _bad(b"T05thread:p1.zz;")}, None),
    "empty stop reply": ({b"?": _bad(b"")}, None),
    "short stop reply": ({b"?": _bad(b"T")}, None),
    "exit reply without a status": ({b"?": _bad(b"W")}, None),
    "bad target description": ({b"qXfer:features": _bad(b"l<target><feature>")}, None),
    "target description with bad numbers": (
        {b"qXfer:features": _bad(b'l<target><feature><reg name="pc" bitsize="x"/>'
                                 b"</feature></target>")}, None),
    "register block with bad hex": ({b"g": _bad(b"zz" * 152)}, None),
    "thread list with bad hex": ({b"qfThreadInfo": _bad(b"mzz,")}, None),
    "huge packet": ({b"qSupported": b"+$" + b"A" * (64 << 20)}, None),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_gdb_stub(case):
    """Each misbehaviour ends in a TargetError (StubError, StubTimeout) within the
    connection's timeout, or the stub is served regardless; never another exception,
    never a hang."""
    bad, raw = HOSTILE[case]
    stub = HostileStub(bad, raw)
    if raw == b"":  # hang up right after the truncated reply
        stub.bad = {b"qSupported": b"+$Packet"}
    stub.start()
    start = time.monotonic()
    try:
        t = _target(stub)
        # the handshake passed: make the stub answer the packets a session sends
        t.get_regs(t.tid)
        t.read_memory(0x1000, 16)
        t.threads()
    except TargetError as exc:
        assert str(exc)
    except UbpError as exc:  # pragma: no cover - every stub error is a TargetError
        pytest.fail(f"{case}: {type(exc).__name__} is not a TargetError: {exc}")
    finally:
        stub.close()
    assert time.monotonic() - start < 15, f"{case}: took {time.monotonic() - start:.1f} s"
