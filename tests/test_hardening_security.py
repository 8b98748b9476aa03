"""Security: UBP never gives a target a writable and executable page (its XOL areas are
read+execute and filled through /proc/PID/mem; checked in /proc/PID/maps all through a
run with probes of every strategy, return probes and trap-free counters); module
resolution reads the files the target's /proc/PID/maps names, never one a symlink leads
to (checked here with a library path swapped for a symlink to another library after the
target mapped it); attach respects the system's ptrace rules and says what to do when
they forbid it (a non-root user, a tracer without CAP_SYS_PTRACE), never working around
them.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
from hardening import SRC, build, instructions, tracer_of, wait_for, writable_executable

from ubp_core.procmaps import read_maps
from ubp_core.session import Session
from ubp_core.textcheck import text_differences
from ubp_core.types import Strategy

pytestmark = [pytest.mark.hardening, pytest.mark.live]

FUNCS = ("h_entry", "h_branch", "h_leaf")


@pytest.fixture
def public_dir():
    """A directory every user can reach: pytest's own temporary directories live under a
    root-only /tmp/pytest-of-root, where a program run as nobody cannot be executed and
    its ELF file cannot be read by a UBP run as nobody."""
    path = tempfile.mkdtemp(prefix="ubp-nobody-", dir="/tmp")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def progs(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("security")), ["hammer", "jobs"])


def test_no_writable_executable_page_ever(progs):
    """Every instruction of three functions probed (emulate, boost and SSOL in turn),
    inline on one, a return probe, libc probes: sampled all through the run, no mapping
    is both writable and executable and no XOL area is writable."""
    prog = progs["hammer"]
    s = Session.spawn([prog, "16", "300"])
    pid = s.main_pid
    bad: list[str] = []
    samples = [0]

    def sample(hit):
        if hit.probe.hits % 400:
            return
        samples[0] += 1
        bad.extend(writable_executable(pid))
        engine = s.processes[pid].engine
        for m in read_maps(pid):
            if engine.xol.area_of(m.start) is not None and "w" in m.perms:
                bad.append(f"writable XOL area {m.start:#x} {m.perms}")

    cycle = [Strategy.EMULATE, Strategy.BOOST, Strategy.SSOL]
    chosen: dict[str, str] = {}
    k = 0
    for fn in FUNCS:
        for off, _text, allowed in instructions(prog, fn):
            spec = f"{fn}+{off:#x}" if off else fn
            for _ in range(3):
                strat = cycle[k % 3]
                k += 1
                if strat in allowed:
                    s.probe(spec, sample, strategy=strat)
                    chosen[spec] = strat.value
                    break
    s.probe("h_leaf%return")
    s.probe("libc:malloc")
    s.probe("libc:free")
    assert s.run() == 0
    assert set(chosen.values()) == {"emulate", "boost", "ssol"}
    assert samples[0] >= 10 and bad == [], bad[:5]
    print(f"\n{len(chosen)} probes ({sorted(set(chosen.values()))}) + return + libc: "
          f"{samples[0]} samples of /proc/PID/maps, 0 writable+executable, 0 writable XOL")


def test_no_writable_executable_page_with_trap_free_counters(progs):
    out = subprocess.run([sys.executable, "-m", "ubp_core.cli", "trace", "--count", "--fast",
                          "h_entry", "h_leaf", "--", progs["hammer"], "4", "2000"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # maps during the run: watched from a Session instead (the CLI exits with the program)
    s = Session.spawn([progs["hammer"], "4", "20000"])
    s.probe("h_entry", fast=True)
    seen = []
    s.probe("h_leaf", lambda hit: seen.extend(writable_executable(s.main_pid))
            if hit.probe.hits % 5000 == 0 else None)
    assert s.run() == 0
    assert seen == []


# ---------------------------------------------------------------- module resolution
def test_a_library_path_swapped_for_a_symlink_is_not_followed(tmp_path):
    """The target maps libx.so; then the path is replaced by a symlink to another library
    with the same symbol at another offset.  /proc/PID/maps names the mapped file (now
    ' (deleted)'), so UBP must not read the file the symlink leads to: the probe is
    refused (the module is not there), never armed at the other library's offset."""
    cc = shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    (tmp_path / "a.c").write_text("int lib_fn(int x) { return x + 1; }\n")
    (tmp_path / "b.c").write_text("static volatile int pad[64];\n"
                                  "int other(int x) { return pad[x] * 3 + x; }\n"
                                  "int lib_fn(int x) { return other(x) - 7; }\n")
    real = lib_dir / "libx.so"
    subprocess.run([cc, "-O1", "-shared", "-fPIC", "-o", str(real), str(tmp_path / "a.c")],
                   check=True)
    subprocess.run([cc, "-O1", "-shared", "-fPIC", "-o", str(tmp_path / "libevil.so"),
                    str(tmp_path / "b.c")], check=True)
    main = tmp_path / "main.c"
    main.write_text('#include <stdio.h>\n#include <unistd.h>\nint lib_fn(int);\n'
                    'int main(void){printf("ready\\n");fflush(stdout);'
                    'for(;;){lib_fn(1);usleep(1000);}}\n')
    exe = tmp_path / "main"
    subprocess.run([cc, "-O1", "-o", str(exe), str(main), f"-L{lib_dir}", "-lx",
                    f"-Wl,-rpath,{lib_dir}"], check=True)
    p = subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        real.unlink()
        os.symlink(tmp_path / "libevil.so", real)
        s = Session.attach(p.pid)
        try:
            tp = s.probe(f"{real}:lib_fn")  # waits for a libx.so that is not mapped
            assert tp.address is None and not tp.attached
            assert not any("libevil" in path for path in s.processes[p.pid].resolver.modules)
            assert s.run(timeout=0.3) is None and tp.hits == 0
        finally:
            s.detach()
        assert text_differences(p.pid) == [] and p.poll() is None
    finally:
        p.kill()
        p.wait()


# ---------------------------------------------------------------- ptrace permission
def _ubp_as(prefix: list[str], pid: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([*prefix, sys.executable, "-m", "ubp_core.cli", "trace", "--count",
                           "--duration", "1", "-p", str(pid), "job_work"],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def root_program(progs):
    p = subprocess.Popen([progs["jobs"], "2"], stdout=subprocess.PIPE, text=True)
    p.stdout.readline()
    yield p
    p.kill()
    p.wait()


def _check_refused(out, pid):
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    assert "permission denied attaching to process" in out.stderr, out.stderr
    assert "does not work around it" in out.stderr
    assert tracer_of(pid) == 0 and text_differences(pid) == []


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _nobody_can_run_ubp() -> bool:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([*NOBODY, sys.executable, "-c", "import ubp_core.session"],
                          capture_output=True, env=env).returncode == 0


def test_attach_as_another_user_is_refused_with_a_clear_message(root_program):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run UBP as another user")
    if not _nobody_can_run_ubp():
        pytest.skip("this Python installation is not readable by nobody (it lives under "
                    "/root); the next test covers another user's process")
    out = _ubp_as(NOBODY, root_program.pid)
    _check_refused(out, root_program.pid)


def test_attach_to_another_users_process_without_cap_sys_ptrace(progs, public_dir):
    """The target runs as nobody, UBP as root without CAP_SYS_PTRACE: a different user,
    so the kernel says no; UBP says why and what would allow it."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("capsh"):
        pytest.skip("needs root, setpriv and capsh")
    exe = public_dir / "jobs"
    shutil.copy(progs["jobs"], exe)
    p = subprocess.Popen([*NOBODY, str(exe), "2"], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(p.stdout.readline().split()[0].split("=")[1])
        assert os.stat(f"/proc/{pid}").st_uid == 65534
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        cmd = f"{sys.executable} -m ubp_core.cli trace --count --duration 1 -p {pid} job_work"
        out = subprocess.run(["capsh", "--drop=cap_sys_ptrace", "--", "-c", cmd],
                             capture_output=True, text=True, timeout=120, env=env)
        _check_refused(out, pid)
        print(f"\n{out.stderr.strip().splitlines()[-1]}")
    finally:
        p.kill()
        p.wait()


def test_attach_without_cap_sys_ptrace_is_refused(root_program):
    """Root without CAP_SYS_PTRACE may not trace a process holding capabilities it lacks."""
    if os.geteuid() != 0 or shutil.which("capsh") is None:
        pytest.skip("needs root and capsh to drop a capability")
    prefix = ["capsh", "--drop=cap_sys_ptrace", "--"]
    probe = subprocess.run([*prefix, "-c", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip("capsh cannot drop capabilities here")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    cmd = (f"{sys.executable} -m ubp_core.cli trace --count --duration 1 "
           f"-p {root_program.pid} job_work")
    out = subprocess.run([*prefix, "-c", cmd], capture_output=True, text=True, timeout=120,
                         env=env)
    _check_refused(out, root_program.pid)


def test_a_user_may_trace_their_own_process(progs, public_dir):
    """The same rules allow a plain user to trace their own program (the refusal above
    is the system's, not UBP's)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    if not _nobody_can_run_ubp():
        pytest.skip("this Python installation is not readable by nobody")
    prefix = NOBODY
    exe = public_dir / "jobs"
    shutil.copy(progs["jobs"], exe)
    p = subprocess.Popen([*prefix, str(exe), "2"], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(p.stdout.readline().split()[0].split("=")[1])
        assert wait_for(lambda: os.stat(f"/proc/{pid}").st_uid == 65534)
        out = _ubp_as(prefix, pid)
        if "ptrace_scope=1" in out.stderr or "ptrace_scope=2" in out.stderr \
                or "ptrace_scope=3" in out.stderr:
            pytest.skip("yama forbids tracing a non-child here")
        assert out.returncode == 0, out.stderr
        assert "job_work" in out.stderr
    finally:
        p.kill()
        p.wait()


# ---------------------------------------------------------------- mount namespaces
@pytest.fixture
def namespaced(progs, tmp_path):
    """jobs running in a mount namespace of its own, where its path names another build
    (bind-mounted over it) than the file of that name UBP sees: symbols read from the
    wrong file would put every breakpoint at a wrong address."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to make a mount namespace")
    other = tmp_path / "jobs-O2"
    subprocess.run(["gcc", "-O2", "-o", str(other), os.path.join(SRC, "jobs.c"), "-pthread"],
                   check=True)
    prog = tmp_path / "prog"
    shutil.copy(progs["jobs"], prog)
    from ubp_core.elfinfo import ElfImage

    with ElfImage(str(prog)) as a, ElfImage(str(other)) as b:
        def where(image):
            return next(sym.address for sym in image.symbols if sym.name == "job_work")

        assert where(a) != where(b)
    p = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          f"mount --bind {other} {prog} && exec {prog} 4"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line:
        pytest.skip(f"cannot make a mount namespace here: {p.stderr.read().strip()}")
    head = dict(kv.split("=") for kv in line.split())
    pid, addr = int(head["pid"]), int(head["counter"], 16)
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    yield p, pid, addr
    if p.poll() is None:
        p.kill()
        p.wait()


def _finish(p) -> None:
    os.kill(p.pid, signal.SIGUSR2)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and "ok=1" in out, out


def test_a_program_in_another_mount_namespace(namespaced):
    """UBP reads the file the program maps (found through /proc/PID/map_files by its
    device and inode), not the same-named file of its own namespace."""
    p, pid, _addr = namespaced
    s = Session.attach(pid)
    tps = [s.probe("job_work", strategy="ssol"), s.probe("job_work+1", strategy="boost")]
    assert s.run(timeout=1.0) is None
    assert all(tp.hits > 100 for tp in tps), [tp.hits for tp in tps]
    assert tracer_of(pid) == 0 and text_differences(pid) == []
    _finish(p)


def test_a_program_in_another_mount_namespace_without_map_files(namespaced):
    """Without CAP_SYS_ADMIN /proc/PID/map_files cannot be opened: the path under the
    program's root (/proc/PID/root) gives the same file."""
    p, pid, _addr = namespaced
    if shutil.which("capsh") is None:
        pytest.skip("needs capsh to drop CAP_SYS_ADMIN")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    cmd = (f"{sys.executable} -m ubp_core.cli trace --count --duration 1 -p {pid} "
           "job_work job_work+1")
    out = subprocess.run(["capsh", "--drop=cap_sys_admin,cap_checkpoint_restore", "--", "-c",
                          cmd], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    hits = [int(ln.split()[-1]) for ln in out.stderr.splitlines()
            if ln.startswith("job_work")]
    assert len(hits) == 2 and min(hits) > 100, out.stderr
    assert tracer_of(pid) == 0 and text_differences(pid) == []
    _finish(p)
