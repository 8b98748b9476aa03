"""Live probes through the GDB remote protocol: real C programs cross-compiled for
ppc64le, ppc64 and s390x, run under qemu-user by ``ubp trace --qemu`` (and one attached
with ``--remote``).  The program counts its own calls (tests/progs/remote/calls.c);
the probes' counts must equal them, and its output must be that of an unprobed run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from ubp_core.elfinfo import ElfImage
from ubp_core.plugins import default_plugins
from ubp_core.remote_session import RemoteSession, find_sysroot, free_port

SOURCE = os.path.join(os.path.dirname(__file__), "progs", "remote", "calls.c")
ARCHES = {
    # name -> (cross compiler, qemu-user)
    "ppc64le": ("powerpc64le-linux-gnu-gcc", "qemu-ppc64le"),
    "ppc64": ("powerpc64-linux-gnu-gcc", "qemu-ppc64"),
    "s390x": ("s390x-linux-gnu-gcc", "qemu-s390x"),
}
UBP = [sys.executable, "-m", "ubp_core.cli"]
ROUNDS = "40"
TIMEOUT = 240


@pytest.fixture(scope="session")
def programs(tmp_path_factory):
    """arch -> {"dynamic": path, "static": path}, built once."""
    out = tmp_path_factory.mktemp("remote")
    built: dict[str, dict[str, str]] = {}
    for arch, (cc, _) in ARCHES.items():
        if shutil.which(cc) is None:
            continue
        built[arch] = {}
        for kind, flags in (("dynamic", []), ("static", ["-static"])):
            path = str(out / f"calls-{kind}.{arch}")
            subprocess.run([cc, "-O2", "-pthread", *flags, "-o", path, SOURCE], check=True)
            built[arch][kind] = path
    return built


def program(programs, arch: str, kind: str = "dynamic") -> str:
    cc, qemu = ARCHES[arch]
    if arch not in programs:
        pytest.skip(f"{cc} not installed")
    if shutil.which(qemu) is None:
        pytest.skip(f"{qemu} not installed (Debian qemu-user)")
    path = programs[arch][kind]
    if kind == "dynamic" and find_sysroot(path) is None:
        pytest.skip(f"no libc for {arch} under /usr (Debian libc6-*-cross)")
    return path


def unprobed(path: str, arch: str, *args: str) -> tuple[str, int]:
    cmd = [ARCHES[arch][1]]
    root = find_sysroot(path)
    if root:
        cmd += ["-L", root]
    proc = subprocess.run([*cmd, path, *args], capture_output=True, text=True, timeout=60)
    return proc.stdout, proc.returncode


def counts(stdout: str) -> dict[str, int]:
    line = next(x for x in stdout.splitlines() if x.startswith("calls "))
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def trace(tmp_path, path: str, probes: list[str], *args: str, extra=()) -> tuple:
    """``ubp trace --qemu --json``: (program stdout, ubp stderr, json, exit status)."""
    out = tmp_path / "ubp.json"
    proc = subprocess.run([*UBP, "trace", "--qemu", "--json", "-o", str(out), *extra,
                           *probes, "--", path, *args],
                          capture_output=True, text=True, timeout=TIMEOUT)
    data = json.loads(out.read_text().splitlines()[-1]) if out.exists() and \
        out.read_text().strip() else None
    return proc.stdout, proc.stderr, data, proc.returncode


def hits(data: dict) -> dict[str, int]:
    return {p["spec"]: p["hits"] for p in data["probes"]}


# --------------------------------------------------------------------------- counts
@pytest.mark.parametrize("strategy", ["default", "emulate", "boost", "ssol", "inline"])
@pytest.mark.parametrize("arch", list(ARCHES))
def test_counts_and_output_equal_the_programs_own(programs, tmp_path, arch, strategy):
    path = program(programs, arch)
    want_out, want_rc = unprobed(path, arch, ROUNDS, "0")
    probes = ["fact", "fact%return", "leaf", "dive", "dive%return", "libc:strtol"]
    extra = [] if strategy == "default" else ["--strategy", strategy]
    out, err, data, rc = trace(tmp_path, path, probes, ROUNDS, "0", extra=extra)
    assert out == want_out, err
    assert rc == want_rc == 7
    c = counts(want_out)
    got = hits(data)
    assert got == {"fact": c["fact"], "fact%return": c["fact_returns"], "leaf": c["leaf"],
                   "dive": c["dive"], "dive%return": c["dive_returns"],
                   "libc:strtol": c["strtol"]}, err
    assert c["dive"] > 0 and c["dive_returns"] == 0  # every dive was left by longjmp
    assert data["exit_code"] == 7 and data["detached"] is False
    if strategy != "default":
        assert {p["strategy"] for p in data["probes"]} == {strategy}
    for p in data["probes"]:
        assert set(p) == {"spec", "address", "strategy", "hits"} and p["address"] > 0


@pytest.mark.parametrize("arch", list(ARCHES))
def test_static_program_and_typed_fields(programs, tmp_path, arch):
    """A static program (no dynamic linker: everything there from the start), one line
    per hit with typed fields: fact's arguments and return values are the program's."""
    path = program(programs, arch, "static")
    want_out, _ = unprobed(path, arch, "14", "0")
    proc = subprocess.run([*UBP, "trace", "--qemu", "fact n:i64", "fact%return ret:i64",
                           "--", path, "14", "0"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.stdout == want_out and proc.returncode == 7, proc.stderr
    c = counts(want_out)
    args = [int(m) for m in re.findall(r"fact n:i64 n=(-?\d+)", proc.stderr)]
    rets = [int(m) for m in re.findall(r"fact%return ret:i64 ret=(-?\d+)", proc.stderr)]
    assert len(args) == c["fact"] and len(rets) == c["fact_returns"]
    assert all(0 <= n <= 12 for n in args)
    factorials = {math.factorial(k) for k in range(13)}
    assert set(rets) <= factorials and max(rets) == math.factorial(max(args))
    # the returns come innermost first: fact(1) returns 1 before fact(2) returns 2
    assert rets[:2] == [1, 1] or rets[0] == 1


@pytest.mark.parametrize("arch", list(ARCHES))
def test_a_probe_on_every_instruction_of_a_function(programs, tmp_path, arch):
    path = program(programs, arch, "static")
    arch_ops = default_plugins().arch_for_elf(ElfImage(path).ident)
    with ElfImage(path) as img:
        sym = next(s for s in img.functions() if s.name == "leaf")
        code = img.read(sym.address, sym.size)
    offsets = []
    for insn in arch_ops.decode_all(code, sym.address):
        if arch_ops.analyze(insn).accepted:
            offsets.append(insn.address - sym.address)
    assert len(offsets) >= 5
    want_out, _ = unprobed(path, arch, ROUNDS, "0")
    specs = [f"leaf+{off:#x}" for off in offsets]
    out, err, data, rc = trace(tmp_path, path, specs, ROUNDS, "0")
    assert out == want_out and rc == 7, err
    n = counts(want_out)["leaf"]
    got = [p["hits"] for p in data["probes"]]
    assert all(h <= n for h in got), got
    # the entry runs once per call (leaf+0 is the local entry on ELFv2), and so does
    # the straight line up to the if (gcc makes it branch-free on powerpc); 0: padding,
    # or an ELFv2 global entry's TOC set-up, which calls from within the program skip
    assert got[0] == n
    assert sum(1 for h in got if h == n) >= len(got) // 2, got


# --------------------------------------------------------------------------- threads
@pytest.mark.parametrize("arch", ["ppc64le", "s390x"])
def test_threads_that_never_stop_are_fine(programs, tmp_path, arch):
    """Four threads run while the main thread's functions are probed."""
    path = program(programs, arch)
    want_out, _ = unprobed(path, arch, ROUNDS, "4")
    out, err, data, rc = trace(tmp_path, path, ["fact", "leaf"], ROUNDS, "4")
    assert out == want_out and rc == 7, err
    c = counts(want_out)
    assert hits(data) == {"fact": c["fact"], "leaf": c["leaf"]}


def test_threads_stopping_under_qemu_user_is_a_clear_error(programs, tmp_path):
    """qemu-user 7.2's stub is not all-stop: a second thread's stop is refused plainly."""
    path = program(programs, "ppc64le")
    _, err, _, rc = trace(tmp_path, path, ["work"], "200", "4")
    assert rc == 2
    assert "not all-stop" in err and "Traceback" not in err


# --------------------------------------------------------------------------- --remote
def test_remote_attaches_to_a_running_stub(programs, tmp_path):
    path = program(programs, "s390x")
    want_out, _ = unprobed(path, "s390x", ROUNDS, "0")
    port = free_port()
    root = find_sysroot(path)
    qemu = subprocess.Popen(["qemu-s390x", "-L", root, "-g", str(port), path, ROUNDS, "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        out = tmp_path / "r.json"
        proc = subprocess.run([*UBP, "trace", "--remote", f"127.0.0.1:{port}", "--file", path,
                               "--sysroot", root, "--json", "-o", str(out), "fact",
                               "fact%return", "libc:strtol"],
                              capture_output=True, text=True, timeout=TIMEOUT)
        stdout, _ = qemu.communicate(timeout=60)
    finally:
        qemu.kill()
    assert proc.returncode == 7, proc.stderr
    assert stdout == want_out
    c = counts(want_out)
    data = json.loads(out.read_text())
    assert hits(data) == {"fact": c["fact"], "fact%return": c["fact_returns"],
                          "libc:strtol": c["strtol"]}


# --------------------------------------------------------------------------- errors
def test_no_stub_at_that_address(programs):
    port = free_port()  # nobody listens there
    proc = subprocess.run([*UBP, "trace", "--remote", f"127.0.0.1:{port}", "--file",
                           sys.executable, "main"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no GDB stub at" in proc.stderr and "refused" in proc.stderr


def test_a_stub_without_a_target_description(programs):
    """A stub that lacks a packet UBP needs: the error names it."""
    path = program(programs, "s390x", "static")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def stub():
        conn, _ = srv.accept()
        buf = b""
        try:
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
                while b"#" in buf:
                    i = buf.index(b"#")
                    body = buf[buf.find(b"$") + 1:i]
                    buf = buf[i + 3:]
                    reply = b"PacketSize=1000" if body.startswith(b"qSupported") else b""
                    conn.sendall(b"+$" + reply + b"#%02x" % (sum(reply) & 0xFF))
        except OSError:
            return
        finally:
            conn.close()

    t = threading.Thread(target=stub, daemon=True)
    t.start()
    with pytest.raises(Exception) as info:
        RemoteSession.connect(f"127.0.0.1:{port}", path)
    assert "qXfer:features:read" in str(info.value)
    srv.close()


def test_a_program_of_an_arch_without_a_plugin(programs, tmp_path):
    path = program(programs, "s390x", "static")
    alien = tmp_path / "alien"
    raw = bytearray(open(path, "rb").read())
    raw[18:20] = (0xB7).to_bytes(2, "big")  # e_machine: AArch64 (no plugin here)
    alien.write_bytes(bytes(raw))
    alien.chmod(0o755)
    proc = subprocess.run([*UBP, "trace", "--qemu", "main", "--", str(alien)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no installed plugin" in proc.stderr


def test_an_unknown_symbol_stops_before_the_program_runs(programs, tmp_path):
    path = program(programs, "ppc64")
    out, err, _, rc = trace(tmp_path, path, ["fact", "no_such_function"], ROUNDS, "0")
    assert rc == 2 and out == ""
    assert "no_such_function" in err
