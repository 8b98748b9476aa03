"""Trap-free probes with a handler (ubp_core.rendezvous) on live x86-64 processes.

tests/progs/live/rendezvous.c calls site_add(a, b) = a + b in several ways; the probe
jumps to a trampoline that meets UBP through a futex and the handler runs in UBP while
the thread waits, without any ptrace stop.  The trampoline itself is proved
instruction by instruction in test_x86_rendezvous.py; these run the real thing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading

import pytest
from livebuild import SRC, bare, ubp

from ubp_core.session import Session
from ubp_core.textcheck import text_differences

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def rv(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("rendezvous") / "rendezvous")
    subprocess.run(["gcc", "-O1", "-g", "-o", path, f"{SRC}/rendezvous.c", "-lpthread"],
                   check=True)
    return path


def _traced(argv, handler, **kw):
    """Run argv with a trap-free handler probe on site_add; (probe, status)."""
    s = Session.spawn(argv, **kw)
    tp = s.probe("site_add", handler, fast=True)
    assert tp.strategy_name == "trap-free", tp.fast_note
    status = s.run(timeout=240)
    assert s.rendezvous.errors == []
    return tp, status, s


def test_handler_reads_and_changes_registers(rv, capfd):
    seen = []

    def handler(hit):
        seen.append((hit.arg(0), hit.arg(1), hit.pc, hit.tid))
        hit.set("rsi", 100)  # the program computes 40 + 100

    tp, status, s = _traced([rv, "add"], handler)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert capfd.readouterr().out == "add=140 short=7\n"
    assert [(a, b) for a, b, _, _ in seen] == [(40, 2)]
    assert seen[0][2] == tp.address  # the pc a trap probe would show
    assert seen[0][3] == s.main_pid
    assert tp.hits == 1 and tp.missed == 0


def test_every_register_and_the_flags_survive(rv, capfd):
    """regs_check loads every register with a pattern and sets CF around each call; the
    handler sees the patterns, the program finds them all intact afterwards."""
    wrong = []

    def handler(hit):
        r = hit.regs
        if (r["rbx"], r["r12"], r["r15"], r["rdx"], r["eflags"] & 1) != (
                0x1111111111111111, 0x7777777777777777, 0x0F0F0F0F0F0F0F0F, 0xBB, 1):
            wrong.append(hit)

    tp, status, _ = _traced([rv, "regs", "3000"], handler)
    assert os.WEXITSTATUS(status) == 0
    assert capfd.readouterr().out == "rounds=3000 clobbered=0\n"
    assert tp.hits == 3000 and not wrong


def test_threads_each_hit_handled_once(rv, capfd):
    """8 threads x 5,000 calls through one mailbox: every hit handled once, in its own
    thread's name, no hit missed, the program's result right."""
    per_tid: dict[int, int] = {}
    args = []

    def handler(hit):
        per_tid[hit.tid] = per_tid.get(hit.tid, 0) + 1
        args.append(hit.arg(0))

    tp, status, s = _traced([rv, "threads", "8", "5000"], handler, placement="off")
    assert os.WEXITSTATUS(status) == 0
    assert capfd.readouterr().out == bare(rv, "threads", "8", "5000").stdout
    assert tp.hits == 40000 and tp.missed == 0 and s.rendezvous.served == 40000
    assert sorted(per_tid.values()) == [5000] * 8 and s.main_pid not in per_tid
    assert sorted(set(args)) == list(range(8))


def test_signal_handler_hitting_the_probe_mid_rendezvous(rv, capfd):
    """A 200 us timer's handler calls the probed function, often while the main thread
    waits in its rendezvous: that nested hit runs on without the handler (counted as
    missed) instead of deadlocking on the mailbox's lock; every call is counted."""
    handled = [0]

    def handler(hit):
        handled[0] += 1

    tp, status, _ = _traced([rv, "signals", "20000"], handler)
    assert os.WEXITSTATUS(status) == 0
    out = capfd.readouterr().out
    fields = dict(kv.split("=") for kv in out.split())
    assert fields["main"] == "20000" and fields["bad"] == "0"
    in_handler = int(fields["handler"])
    assert in_handler > 0  # the timer did fire during the run
    assert tp.hits == 20000 + in_handler
    assert handled[0] + tp.missed == tp.hits
    assert handled[0] >= 20000  # no call of the main loop was missed


def test_forked_child_hits_are_the_childs(rv, capfd):
    pids = {}

    def handler(hit):
        pid = hit.engine.target.pid
        pids[pid] = pids.get(pid, 0) + 1

    tp, status, s = _traced([rv, "fork", "2000"], handler)
    assert os.WEXITSTATUS(status) == 0
    assert capfd.readouterr().out == "sum=2001000 child=0\n"
    assert tp.hits == 4000
    assert sorted(pids.values()) == [2000, 2000] and s.main_pid in pids


def test_detach_with_threads_waiting_in_the_rendezvous(rv):
    """UBP leaves mid-run (stop from the handler itself) while 4 threads are inside the
    trampoline or queued on its lock: the jumps come out, the mailbox closes, every
    waiting thread goes on; the program ends with the right result, untraced."""
    # long enough that the program still runs when UBP has left (100 M calls, ~1 s)
    s = Session.spawn([rv, "threads", "4", "25000000"], placement="off")
    hits = [0]

    def handler(hit):
        hits[0] += 1
        if hits[0] == 2000:
            s.stop()

    tp = s.probe("site_add", handler, fast=True)
    pid = s.main_pid
    assert s.run(timeout=240) is None  # detached, not ended
    assert text_differences(pid) == []
    with open(f"/proc/{pid}/status") as f:
        assert any(ln.split() == ["TracerPid:", "0"] for ln in f)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert 2000 <= hits[0] < 3000 and tp.hits >= hits[0]


def test_handler_serialised_with_trap_handlers(rv):
    """A trap probe and a trap-free probe in one program: their handlers never overlap
    (UBP runs one handler at a time, whichever thread of UBP calls it)."""
    s = Session.spawn([rv, "threads", "4", "3000"], placement="off")
    inside = threading.Lock()
    overlaps = [0]
    counts = {"fast": 0, "trap": 0}

    def make(kind):
        def handler(hit):
            if not inside.acquire(blocking=False):
                overlaps[0] += 1
                return
            try:
                counts[kind] += 1
                for _ in range(200):  # long enough for the other thread to get in
                    pass
            finally:
                inside.release()
        return handler

    s.probe("site_add", make("fast"), fast=True)
    s.probe("worker", make("trap"))
    status = s.run(timeout=240)
    assert os.WEXITSTATUS(status) == 0
    assert overlaps[0] == 0 and counts == {"fast": 12000, "trap": 4}


def test_cli_prints_each_hit_and_falls_back_where_refused(rv):
    """`ubp trace --fast` without --count: each hit printed from the rendezvous; a site
    too short for the jump is traced by a trap probe, and UBP says why."""
    out = ubp("trace", "--fast", "site_add", "site_short", "--", rv, "add")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "add=42 short=7\n"
    assert " site_add 0x28 0x2 " in out.stderr and " site_short 0x7 " in out.stderr
    assert "probe site_short: no trap-free probe (" in out.stderr
    assert "a jump needs 5" in out.stderr and "traced with a trap probe" in out.stderr
    # two probes where one jump goes: refused at once, the program not run
    out = ubp("trace", "--fast", "site_add", "site_add+4", "--", rv, "add")
    assert out.returncode == 2 and "inside the trap-free probe" in out.stderr
    assert out.stdout == ""
    # --json prints no hits: the probe only counts (no rendezvous, nothing missed)
    out = ubp("trace", "--fast", "--json", "site_add", "--", rv, "threads", "2", "100")
    got = json.loads(out.stderr.strip().splitlines()[-1])["probes"][0]
    assert got["strategy"] == "trap-free" and got["hits"] == 200 and "missed" not in got


def test_killed_target_mid_rendezvous_does_not_hang_ubp(rv):
    """The program dies (SIGKILL) while threads wait in the rendezvous: UBP reports the
    death and returns; its rendezvous thread is closed."""
    s = Session.spawn([rv, "threads", "4", "1000000"], placement="off")
    hits = [0]

    def handler(hit):
        hits[0] += 1
        if hits[0] == 1000:
            os.kill(s.main_pid, signal.SIGKILL)

    s.probe("site_add", handler, fast=True)
    status = s.run(timeout=120)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert not s.rendezvous._thread.is_alive()


def test_every_libc_function_with_a_handler_same_hits_as_trap_probes(tmp_path):
    """`ubp trace --fast 'libc:*'` on ls: about three quarters of libc's functions go in
    trap-free with a handler; each function's printed hits equal those of trap probes on
    the same run of the same program, and ls's output is untouched."""
    for name in ("b", "a", "c"):
        (tmp_path / name).write_text(name)
    argv = ["/bin/ls", "-l", str(tmp_path)]
    env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
    log = tmp_path.parent / "fast-hits.txt"
    fast = ubp("trace", "--fast", "-o", str(log), "libc:*", "--", *argv, env=env)
    trap = ubp("trace", "--count", "--json", "libc:*", "--", *argv, env=env)
    assert fast.returncode == trap.returncode == 0, fast.stderr[-2000:]
    alone = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert fast.stdout == trap.stdout == alone.stdout
    lines = log.read_text().splitlines()
    printed: dict[str, int] = {}
    for ln in lines:
        parts = ln.split()
        if len(parts) >= 3 and not ln.startswith("ubp:"):
            printed[parts[2]] = printed.get(parts[2], 0) + 1
    counted = {p["spec"]: p["hits"] for p in
               json.loads(trap.stderr.strip().splitlines()[-1])["probes"] if p["hits"]}
    assert printed == counted
    slow = next(ln for ln in lines if "traced with trap probes" in ln)
    n_slow, n_all = (int(g) for g in re.search(r"(\d+) of (\d+) functions", slow).groups())
    assert n_slow < 0.3 * n_all, slow
