"""Faults: a probed instruction that faults, or a fault reached through a probe (a probed
jump, call or return that lands on ud2, an int3 or an unmapped page), must reach the
program's own handler exactly as without UBP: the same signal, si_code and si_addr, the
same pc, stack pointer and general registers, the same trap number and page-fault error
code, and the same partial progress of an interrupted ``rep movsb``.

tests/progs/hardening/faulty.c prints all of that per case (it is built without PIE, so
every address is the same in every run); the test requires its output under UBP to be
byte for byte the output of the unprobed run, under each strategy.  test_live_x86.py
checks the signal and pc of three faults; this extends it to si_addr, si_code, registers
and faults in the slot's rebased rip-relative operands, stack operations that the
emulator must not fake, and faults that happen after the probed instruction.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from hardening import SRC, bare, trace_json

from ubp_core.elfinfo import ElfImage
from ubp_core.plugins import default_plugins
from ubp_core.types import Strategy

pytestmark = [pytest.mark.hardening, pytest.mark.live]

ROUNDS = 3


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    path = str(tmp_path_factory.mktemp("faults") / "faulty")
    subprocess.run([cc, "-O1", "-g", "-no-pie", "-o", path, os.path.join(SRC, "faulty.c")],
                   check=True)
    return path


def sites(path: str) -> dict[str, frozenset[Strategy]]:
    """fault_NAME label -> the strategies the plugin allows for its instruction."""
    arch = default_plugins().arch("x86_64")
    out = {}
    with ElfImage(path) as img:
        for sym in img.symbols:
            if sym.name.startswith("fault_"):
                insn = arch.decode(img.read(sym.address, arch.max_insn_len), sym.address)
                out[sym.name] = frozenset(arch.analyze(insn).strategies)
    return out


def test_the_program_faults_as_designed(faulty):
    out = bare(faulty, "1")
    lines = out.stdout.splitlines()
    assert lines[-1] == "faults=22" and "no fault" not in out.stdout
    assert len(sites(faulty)) == 22


@pytest.mark.parametrize("strategy", [None, "emulate", "boost", "ssol", "inline"])
def test_faults_match_an_unprobed_run(faulty, strategy):
    want = bare(faulty, str(ROUNDS))
    assert want.returncode == 0
    allowed = sites(faulty)
    specs = sorted(n for n, s in allowed.items() if strategy is None or Strategy(strategy) in s)
    assert len(specs) >= {None: 22, "emulate": 10, "boost": 15, "ssol": 22,
                          "inline": 22}[strategy]
    args = ["--strategy", strategy] if strategy else []
    out, d = trace_json(*args, *specs, "--", faulty, str(ROUNDS))
    got, exp = out.stdout.splitlines(), want.stdout.splitlines()
    diff = [(g, e) for g, e in zip(got, exp) if g != e]
    assert not diff and len(got) == len(exp), diff[:3]
    assert d["exit_code"] == 0
    # fault_ud2_probed is also where call_to_ud2 lands
    hits = {p["spec"]: p["hits"] for p in d["probes"]}
    assert hits == {s: ROUNDS * (2 if s == "fault_ud2_probed" else 1) for s in specs}
    if strategy:
        assert {p["strategy"] for p in d["probes"]} == {strategy}
    print(f"\n{strategy or 'default'}: {len(specs)} probed fault sites x {ROUNDS} rounds: "
          f"{ROUNDS * 22} faults, {ROUNDS * 22} matched (signal, si_code, si_addr, pc, sp, "
          "registers, trapno, err)")
