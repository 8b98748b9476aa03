"""Return probes and typed fields on live x86-64 processes (issue: return probes).

The program (progs/live/returns.c) counts nothing itself: its calls are known from its
source -- fact(10) makes 10 calls; each of N threads makes 200 calls of fact(5 + i % 3);
middle/inner are called 10 times and a longjmp leaves both for x == 3.
"""

from __future__ import annotations

import json

import pytest
from livebuild import bare, build_all, ubp

from ubp_core.errors import ProbeError
from ubp_core.session import Session
from ubp_core.spec import parse_spec

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def progs(tmp_path_factory):
    return build_all(str(tmp_path_factory.mktemp("live")))




def fact_calls(nthreads: int) -> int:
    return 10 + sum(200 * (5 + i % 3) for i in range(nthreads))


def counts(out) -> dict[str, int]:
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("{")]
    assert lines, out.stderr
    return {p["spec"]: p["hits"] for p in json.loads(lines[-1])["probes"]}


@pytest.mark.parametrize("strategy", ["emulate", "boost", "ssol"])
def test_recursion_longjmp_threads_counts(progs, strategy):
    """Every call has exactly one return under recursion and 4 threads; a longjmp that
    leaves two frames costs them their returns and nothing else."""
    if strategy == "emulate":
        strategy_args = []  # fact's first instruction need not be emulable: the policy
    else:
        strategy_args = ["--strategy", strategy]
    out = ubp("trace", "--json", "--count", *strategy_args, "fact", "fact%return",
              "middle", "middle%return", "inner", "inner%return", "--",
              progs["returns"], "4")
    assert out.returncode == 0, out.stderr
    assert out.stdout == bare(progs["returns"], "4").stdout
    got = counts(out)
    assert got["fact"] == got["fact%return"] == fact_calls(4)
    assert got["middle"] == got["inner"] == 10
    assert got["middle%return"] == got["inner%return"] == 9


def test_return_values_and_arguments_in_order(progs):
    """Typed fields: fact's argument at entry, its value at return, innermost first."""
    out = ubp("trace", "--placement", "off", "fact n:i64", "fact%return ret:i64",
              "--", progs["returns"], "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout == bare(progs["returns"], "0").stdout
    lines = [ln.split(None, 2)[2] for ln in out.stderr.splitlines() if " fact" in ln]
    entries = [ln for ln in lines if ln.startswith("fact n:i64")]
    returns = [ln for ln in lines if ln.startswith("fact%return")]
    assert [e.split("n=")[1] for e in entries] == [str(n) for n in range(10, 0, -1)]
    values, f = [], 1
    for n in range(1, 11):
        f *= n
        values.append(str(f))
    assert [r.split("ret=")[1].split()[0] for r in returns] == values
    durations = [float(r.split("duration=")[1].rstrip("us")) for r in returns]
    assert durations == sorted(durations)  # the outer calls last longer


def test_api_retval_duration_and_call_args(progs):
    seen = []

    def on_return(hit):
        seen.append((hit.tid, hit.call_args[0], hit.retval, hit.duration))

    s = Session.spawn([progs["returns"], "2"])
    try:
        s.probe("fact%return", on_return)
        status = s.run()
    finally:
        s.detach()
    assert status == 0
    assert len(seen) == fact_calls(2)
    fact = {0: 1}
    for n in range(1, 11):
        fact[n] = fact[n - 1] * n
    assert all(fact[arg] == ret for _, arg, ret, _ in seen)
    assert all(d is not None and d >= 0 for *_, d in seen)
    assert len({tid for tid, *_ in seen}) == 3  # the main thread and both workers


def test_detach_restores_every_hijacked_return(progs):
    """UBP lets go while six frames of deep() return into its trampoline: each gets
    its real return address back, so the program finishes after UBP is gone."""
    out = ubp("trace", "--placement", "off", "--duration", "0.5", "deep%return",
              "--", progs["returns"], "deep")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "deep=12\n"  # printed after the detach, by the program alone


def test_removing_a_return_probe_mid_call(progs):
    """A return probe removed while six calls are in flight (from a handler on usleep,
    called by the innermost one): those calls still return to the right place and are
    not reported; the program exits normally."""
    seen = []
    s = Session.spawn([progs["returns"], "deep"])
    try:
        tp = s.probe("deep%return", lambda hit: seen.append(hit.retval))
        s.probe("libc:usleep", lambda hit: s.remove(tp))
        status = s.run()
    finally:
        s.detach()
    assert status == 0
    assert seen == []


def test_bad_typed_fields():
    with pytest.raises(ProbeError, match="NAME:TYPE"):
        parse_spec("libc:malloc size:float")
    with pytest.raises(ProbeError, match="twice"):
        parse_spec("libc:open a:str a:i32")
    with pytest.raises(ProbeError, match="%return"):
        parse_spec("libc:malloc ret:u64")
    spec = parse_spec("libc:open path:str[64] flags:i32")
    assert spec.fields == (("path", "str[64]"), ("flags", "i32"))


def test_typed_string_argument(progs):
    """str fields read NUL-terminated strings from the target, bounded."""
    out = ubp("trace", "--placement", "off", "libc:printf fmt:str[8]", "--",
              progs["returns"], "0")
    assert out.returncode == 0, out.stderr
    shown = [ln.split("fmt=")[1] for ln in out.stderr.splitlines() if " libc:printf " in ln]
    assert shown == ["'fact(10)'", "'jumps to'", "'threads '"], out.stderr
