"""Trap-free counting probes (`ubp trace --count --fast`) on live x86-64 processes.

progs/live/fastsites.c counts its own calls; its asm functions are one site that
qualifies and three that must not (a loop head inside the patched bytes, an indirect
jump, a function shorter than the jump).
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from livebuild import SRC, bare, build_all, ubp

from ubp_core.errors import ProbeError
from ubp_core.procmaps import read_maps
from ubp_core.session import Session
from ubp_core.textcheck import text_differences

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def progs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fast")
    paths = build_all(str(out))
    path = str(out / "fastsites")
    subprocess.run(["gcc", "-O1", "-g", "-o", path, f"{SRC}/fastsites.c", "-lpthread"],
                   check=True)
    paths["fastsites"] = path
    return paths




def report(out) -> dict[str, dict]:
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("{")]
    assert lines, out.stderr
    return {p["spec"]: p for p in json.loads(lines[-1])["probes"]}


def test_counts_exact_across_threads_and_forks(progs):
    """4 threads and 2 forked children hammer one trap-free site: the count is every
    call (lock inc in shared memory), the output is untouched; the sites that cannot
    take a jump fall back to trap probes, each with its reason, and count right too."""
    argv = [progs["fastsites"], "4", "50000", "2"]
    out = ubp("trace", "--count", "--fast", "--json", "site_push", "site_loop",
              "site_table", "site_tiny", "--", *argv)
    assert out.returncode == 0, out.stderr
    assert out.stdout == bare(*argv).stdout
    got = report(out)
    assert got["site_push"]["strategy"] == "trap-free"
    assert got["site_push"]["hits"] == 4 * 50000 + 2 * 50000
    assert "fast_refused" not in got["site_push"]
    assert "branches to" in got["site_loop"]["fast_refused"]
    assert "indirect jump" in got["site_table"]["fast_refused"]
    assert "a jump needs 5" in got["site_tiny"]["fast_refused"]
    for name in ("site_loop", "site_table", "site_tiny"):
        assert got[name]["strategy"] in ("emulate", "boost", "ssol")
        assert got[name]["hits"] == 10
    assert "no trap-free probe" in out.stderr


def test_not_following_forks_removes_the_jumps_in_children(progs):
    argv = [progs["fastsites"], "2", "30000", "2"]
    out = ubp("trace", "--count", "--fast", "--json", "--no-follow", "site_push", "--", *argv)
    assert out.returncode == 0, out.stderr
    assert out.stdout == bare(*argv).stdout  # the children ran their calls, uncounted
    assert report(out)["site_push"]["hits"] == 2 * 30000


def test_every_libc_function_same_counts_as_trap_probes(progs):
    """Every function of libc, trap-free where possible: counts equal those of trap
    probes on the same run of the same program, and most sites go in trap-free."""
    argv = [progs["forks"]]
    fast = ubp("trace", "--count", "--fast", "--json", "libc:*", "--", *argv)
    trap = ubp("trace", "--count", "--json", "libc:*", "--", *argv)
    assert fast.returncode == trap.returncode == 0, fast.stderr[-2000:]
    assert fast.stdout == trap.stdout == bare(*argv).stdout
    f, t = report(fast), report(trap)
    assert f.keys() == t.keys()
    assert {k: v["hits"] for k, v in f.items()} == {k: v["hits"] for k, v in t.items()}
    free = sum(1 for v in f.values() if v["strategy"] == "trap-free")
    assert free > 0.6 * len(f), (free, len(f))
    assert sum(v["hits"] for v in f.values() if v["strategy"] == "trap-free") > 0


def test_attach_detach_restores_text_and_maps_nothing_writable_and_executable(progs):
    p = subprocess.Popen([progs["spin"]], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("ready")
        s = Session.attach(p.pid)
        try:
            tp = s.probe("tick", fast=True)
            s.probe("libc:usleep", fast=True)
            with pytest.raises(ProbeError, match="entries only"):
                s.probe("tick%return", fast=True)
            with pytest.raises(ProbeError, match="entries only"):
                s.probe("tick", lambda hit: None, fast=True, strategy="boost")
            with pytest.raises(ProbeError, match="cannot be disabled"):
                s.disable(tp)
            assert tp.strategy_name == "trap-free", tp.fast_note
            assert text_differences(p.pid)  # the jumps are in
            maps = read_maps(p.pid)
            assert not [m for m in maps if "w" in m.perms and m.executable]
            assert any(m.perms == "rw-s" and "ubp-counters" in m.path for m in maps)
            s.run(timeout=0.5)
        finally:
            s.detach()
        assert tp.hits > 0
        seen = tp.hits
        assert text_differences(p.pid) == []
        # the counters stay readable after UBP let go (shared pages); nothing counts now
        with open(f"/proc/{p.pid}/status") as f:
            assert any(ln.split() == ["TracerPid:", "0"] for ln in f)
        time.sleep(0.2)
        assert tp.hits == seen
        assert p.poll() is None  # still running, unharmed
    finally:
        p.kill()
        p.wait()


def test_fast_takes_no_strategy(progs):
    out = ubp("trace", "--fast", "--strategy", "boost", "tick", "--", progs["forks"])
    assert out.returncode == 2 and "takes no --strategy" in out.stderr
