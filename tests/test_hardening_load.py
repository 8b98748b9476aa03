"""Load: 64 threads hammering probed code under every non-inline strategy, probes added
and removed while the threads run, thousands of probes at once.  Nothing may be missed
or counted twice, and the program's output must equal its unprobed run.

The default run takes a sample; ``-m "hardening and long"`` runs the sustained sizes.
"""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
from hardening import bare, build, instructions, sites_for, trace_json

from ubp_core.engine import Hit
from ubp_core.session import Session, TraceProbe
from ubp_core.textcheck import text_differences
from ubp_core.types import Strategy

pytestmark = [pytest.mark.hardening, pytest.mark.live]

FUNCS = ("h_entry", "h_branch", "h_leaf")
THREADS = 64
STRIDE = 1000003  # hammer.c: thread k calls with base k * STRIDE + i


@pytest.fixture(scope="module")
def progs(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("load")), ["hammer", "many"])


def _hammer_every_site(progs, strategy: Strategy, calls: int) -> None:
    prog = progs["hammer"]
    specs = sites_for(prog, FUNCS, strategy)
    assert len(specs) >= {Strategy.EMULATE: 6, Strategy.BOOST: 12, Strategy.SSOL: 19}[strategy]
    want = bare(prog, str(THREADS), str(calls))
    assert want.returncode == 0, want.stdout
    start = time.monotonic()
    out, d = trace_json("--strategy", strategy.value, *specs, "--", prog, str(THREADS),
                        str(calls), timeout=3600)
    took = time.monotonic() - start
    assert out.stdout == want.stdout
    assert d["exit_code"] == 0
    hits = {p["spec"]: p["hits"] for p in d["probes"]}
    assert hits == dict.fromkeys(specs, THREADS * calls), \
        {k: v for k, v in hits.items() if v != THREADS * calls}
    assert {p["strategy"] for p in d["probes"]} == {strategy.value}
    print(f"\n{strategy.value}: {THREADS} threads x {calls} calls x {len(specs)} probes = "
          f"{sum(hits.values())} hits, 0 missed, 0 extra, {took:.1f} s")


@pytest.mark.parametrize("strategy", [Strategy.EMULATE, Strategy.BOOST, Strategy.SSOL])
def test_64_threads_every_site_every_strategy(progs, strategy):
    """Every instruction of the three functions that allows the strategy, probed with
    it: each count equals the calls the program made (64 threads)."""
    _hammer_every_site(progs, strategy, 60)


@pytest.mark.long
@pytest.mark.parametrize("strategy", [Strategy.EMULATE, Strategy.BOOST, Strategy.SSOL])
def test_64_threads_sustained(progs, strategy):
    _hammer_every_site(progs, strategy, 2000)


# ---------------------------------------------------------------- probes come and go
class Churn:
    """Adds and removes probes from inside a handler while 64 threads run.

    Each dynamic probe records (thread, call number) of its hits.  While it is armed,
    every call of every thread passes it, so per thread its call numbers must form one
    run without a gap (a missed hit) or a repeat (an extra hit)."""

    def __init__(self, session: Session, prog: str, every: int) -> None:
        self.s = session
        self.every = every
        self.ticks = 0
        entry = instructions(prog, "h_entry")
        # one site per strategy, and two kinds of shared sites
        self.plan = [(f"h_entry+{off:#x}" if off else "h_entry", strat)
                     for strat in (Strategy.EMULATE, Strategy.BOOST, Strategy.SSOL)
                     for off, _t, allowed in entry if strat in allowed][::2]
        self.live: list[tuple[TraceProbe, list]] = []
        self.windows: list[tuple[str, str, list]] = []
        self.next = 0

    def on_leaf(self, hit: Hit) -> None:
        self.ticks += 1
        if self.ticks % self.every:
            return
        # alternate: add two, remove the oldest, add, remove ... (never more than 3 live)
        if len(self.live) < 3 and (self.ticks // self.every) % 3:
            spec, strat = self.plan[self.next % len(self.plan)]
            self.next += 1
            if any(tp.spec.text == spec for tp, _ in self.live):
                return
            rec: list[tuple[int, int]] = []
            tp = self.s.probe(spec, lambda h, rec=rec: rec.append(divmod(h.arg(0), STRIDE)),
                              strategy=strat)
            self.live.append((tp, rec))
            self.windows.append((spec, strat.value, rec))
        elif self.live:
            tp, _rec = self.live.pop(0)
            self.s.remove(tp)

    def check(self) -> tuple[int, int]:
        """(windows, hits recorded); asserts there is no gap and no repeat."""
        total = 0
        for spec, strat, rec in self.windows:
            total += len(rec)
            per: dict[int, list[int]] = defaultdict(list)
            for thread, n in rec:
                per[thread].append(n)
            for thread, seq in per.items():
                assert len(set(seq)) == len(seq), f"{spec} ({strat}): thread {thread} repeated"
                assert max(seq) - min(seq) + 1 == len(seq), \
                    f"{spec} ({strat}): thread {thread} missed calls in {min(seq)}..{max(seq)}"
        return len(self.windows), total


def test_probes_added_and_removed_while_64_threads_run(progs, capfd):
    """Probes appear and disappear (from a handler, so mid-run) on the code 64 threads
    are running; each window of each probe sees every call of every thread once."""
    calls = 150
    want = bare(progs["hammer"], str(THREADS), str(calls))
    s = Session.spawn([progs["hammer"], str(THREADS), str(calls)])
    churn = Churn(s, progs["hammer"], 300)
    leaf = s.probe("h_leaf", churn.on_leaf)
    assert s.run() == 0
    assert leaf.hits == THREADS * calls
    windows, hits = churn.check()
    assert windows >= 6 and hits > 1000
    assert {strat for _s, strat, rec in churn.windows if rec} == {"emulate", "boost", "ssol"}
    assert capfd.readouterr().out == want.stdout


@pytest.mark.long
def test_probes_churn_sustained(progs, capfd):
    calls = 3000
    want = bare(progs["hammer"], str(THREADS), str(calls))
    s = Session.spawn([progs["hammer"], str(THREADS), str(calls)])
    churn = Churn(s, progs["hammer"], 500)
    leaf = s.probe("h_leaf", churn.on_leaf)
    assert s.run() == 0
    assert leaf.hits == THREADS * calls
    windows, hits = churn.check()
    assert windows >= 100
    assert capfd.readouterr().out == want.stdout
    print(f"\nchurn: {windows} windows, {hits} hits, leaf {leaf.hits}")


# ---------------------------------------------------------------- thousands of probes
def _many(progs, capfd, functions: int, threads: int, rounds: int, max_arm: float) -> None:
    prog = progs["many"]
    want = bare(prog, str(threads), str(rounds))
    s = Session.spawn([prog, str(threads), str(rounds)])
    start = time.monotonic()
    probes = [s.probe(f"f{k}+{off}" if off else f"f{k}")
              for k in range(functions) for off in (0, 1, 9, 10)]
    armed = time.monotonic() - start
    pid = s.main_pid
    assert len(text_differences(pid)) > 0
    status = s.run()
    ran = time.monotonic() - start - armed
    assert status == 0
    bad = {tp.label: tp.hits for tp in probes if tp.hits != threads * rounds}
    assert not bad, list(bad.items())[:10]
    assert {tp.chosen.value for tp in probes} == {"emulate", "boost"}
    assert capfd.readouterr().out == want.stdout
    print(f"\n{len(probes)} probes armed in {armed:.1f} s; {threads * rounds * len(probes)} "
          f"hits exact in {ran:.1f} s")
    assert armed < max_arm, f"arming {len(probes)} probes took {armed:.1f} s"


def test_twelve_thousand_probes_at_once(progs, capfd):
    """Every instruction of 3,000 functions: 12,000 breakpoints, each count exact, the
    output unchanged, and arming them takes time proportional to their number (it was
    quadratic: 115 s for 12,000, now about 3 s)."""
    _many(progs, capfd, 3000, 4, 2, max_arm=30)


@pytest.mark.long
def test_twelve_thousand_probes_64_threads(progs, capfd):
    _many(progs, capfd, 3000, 64, 4, max_arm=30)
