"""Differential proof of every s390x decision on the reference CPUs (unicorn, qemu-user),
and proof that the kit catches a plugin that gets one wrong."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest
from ubp_s390 import S390x
from ubp_s390 import fixups as s390_fixups
from ubp_s390.fields import key as s390_key

from ubp_core.conformance import corpus
from ubp_core.conformance.kit import run_cases, select_cpus
from ubp_core.conformance.runner import Bench, CannotRun, analyze_case
from ubp_core.hookspecs import hookimpl
from ubp_core.plugins import PluginSet
from ubp_core.refcpu import PAGE
from ubp_core.types import Effect, Strategy

LIBC = "/usr/s390x-linux-gnu/lib/libc.so.6"
LIBC_SAMPLE = 1000  # the default run; 5000 and the whole libc are the corpus tests
# why a case may stay unverified on unicorn: instructions it lacks, and the QEMU 5 bugs
# the plugin declares (see ubp_s390/refcpus.py)
UNICORN_UNVERIFIED = ("lacks", "QEMU 5")


@pytest.fixture(scope="module")
def s390(plugins):
    return plugins.arch("s390x")


@pytest.fixture(scope="module")
def libc():
    if not os.path.exists(LIBC):
        pytest.skip(f"{LIBC} not installed (Debian libc6-s390x-cross)")
    return LIBC


def need(plugins, arch, name):
    if not select_cpus(plugins, arch, [name]):
        pytest.skip(f"reference CPU {name} is not available here")


def _report(arch, cases, cpus, jobs=1, plugins=None):
    return run_cases(arch, cases, cpus=cpus, jobs=jobs, plugins=plugins).as_dict(details=50)


def _all_exercised(d, minimum=1):
    for strategy, row in d["by_strategy"].items():
        assert row["cases"] >= minimum, f"{strategy} never exercised"


def test_plugin_cases_on_unicorn(plugins, s390):
    need(plugins, s390, "unicorn")
    d = _report(s390, corpus.plugin_cases(s390), ["unicorn"])
    assert d["failed"] == 0, d["failures"]
    assert d["contract_problems"] == []
    _all_exercised(d, 60)
    assert all(any(w in u["detail"] for w in UNICORN_UNVERIFIED)
               for u in d["unverified_examples"]), d["unverified_examples"]
    assert d["refused"]["demonstrated"] >= 2  # a naive step shows the breakpoints' need


def test_plugin_cases_on_qemu(plugins, s390):
    need(plugins, s390, "qemu")
    # one case in three: qemu's stub costs a round trip per register and step
    cases = corpus.plugin_cases(s390)[::3]
    d = _report(s390, cases, ["qemu"], jobs=2)
    assert d["failed"] == 0, d["failures"]
    _all_exercised(d, 15)
    assert d["unverified"] < 0.15 * d["cases"], d["unverified_examples"]


def test_libc_sample_on_unicorn(plugins, s390, libc):
    need(plugins, s390, "unicorn")
    cases, total = corpus.elf_cases(s390, libc, LIBC_SAMPLE, seed=5)
    d = _report(s390, cases, ["unicorn"], jobs=2)
    assert total > 100000
    assert d["failed"] == 0, d["failures"]
    assert d["unverified"] < 0.01 * d["cases"], d["unverified_examples"]
    _all_exercised(d, 100)


def test_random_encodings_on_unicorn(plugins, s390):
    need(plugins, s390, "unicorn")
    d = _report(s390, corpus.random_cases(s390, 400, seed=9), ["unicorn"], jobs=2)
    assert d["failed"] == 0, d["failures"]
    # unicorn (QEMU 5) lacks hexadecimal and decimal floating point, decimal
    # arithmetic and everything past z13
    assert d["passed"] > 0.75 * d["cases"]


def test_both_reference_cpus_agree_in_place(plugins, s390, libc):
    """The same case (same registers, same memory) run in place on unicorn and on qemu
    ends the same way: the two CPUs agree on the corpus, not only each with itself."""
    need(plugins, s390, "unicorn")
    need(plugins, s390, "qemu")
    cases = corpus.elf_cases(s390, libc, 150, seed=13)[0]
    got = agree_in_place(plugins, s390, cases)
    # agreement over what was compared: what was not must stay a small part
    skipped = sum(n for why, n in got.items() if why.startswith("not compared"))
    assert got["same"] > 120 and skipped < 0.05 * len(cases), got


# A program exception other than a page fault: Linux (and qemu-user) leave the pc past
# the instruction that raised it, unicorn at it.  Nothing else may differ.
PC_PAST_IT = "same signal, qemu's pc past the instruction unicorn's pc is at"
# unicorn's s390x checks an instruction fetch as a write, so its code pages are writable
# (refcpus.py): a store into program text succeeds there and faults under qemu, as on Linux
TEXT_WRITABLE = "unicorn stored into program text, qemu faulted"


def agree_in_place(plugins, arch, cases) -> Counter:
    """How the in-place runs of ``cases`` compare on unicorn and qemu: "same", one of the
    two explained differences (PC_PAST_IT, TEXT_WRITABLE), or "not compared: why";
    any other difference fails."""
    benches = [Bench(arch, select_cpus(plugins, arch, [name])[0]) for name in ("unicorn", "qemu")]
    tally: Counter = Counter()
    try:
        for case in cases:
            analysis = analyze_case(arch, case)
            if analysis.refusal is not None:
                tally["not compared: refused"] += 1
                continue
            if analysis.kind == "syscall":
                tally["not compared: a system call (unicorn answers it itself)"] += 1
                continue
            outcomes = []
            try:
                for bench in benches:
                    st = bench._setup(case, analysis)
                    outcomes.append((bench._reference(case, analysis, st), st.fill))
                    if bench is benches[0]:
                        wrote_text = any(bench.target.read_memory(p, PAGE)
                                         != bench._code_image(p, case) for p in st.code_pages)
            except CannotRun:
                tally["not compared: a CPU cannot run it"] += 1
                continue
            (want, fill), (got, _) = outcomes
            diff = benches[0]._compare(want, got, analysis, fill)
            if diff is None:
                tally["same"] += 1
                continue
            if wrote_text and want.end == "next" and got.end == "fault" \
                    and got.signo == signal.SIGSEGV:
                tally[TEXT_WRITABLE] += 1
                continue
            pc = arch.abi.pc
            past = dataclasses.replace(got, pc=want.pc, regs=dict(got.regs, **{pc: want.regs[pc]}))
            assert want.end == got.end == "fault" and want.signo == got.signo \
                and (got.pc or 0) - (want.pc or 0) in (2, 4, 6) \
                and benches[0]._compare(want, past, analysis, fill) is None, \
                f"{case.raw.hex()} {analysis.insn.text}: qemu differs: {diff}"
            tally[PC_PAST_IT] += 1
    finally:
        for bench in benches:
            bench.close()
    return tally


def test_cli_json_shape(plugins, s390, libc):
    need(plugins, s390, "unicorn")
    out = subprocess.run(
        [sys.executable, "-m", "ubp_core.cli", "conformance", "s390x", "--corpus", libc,
         "--sample", "200", "--json", "--no-plugin-cases", "--cpu", "unicorn", "--jobs", "1"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["arch"] == "s390x" and d["cases"] == 200 and d["failed"] == 0


def test_ubp_analyze_reads_s390x(libc):
    out = subprocess.run([sys.executable, "-m", "ubp_core.cli", "analyze", libc, "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["arch"] == "s390x" and d["instructions"] > 100000
    assert d["no_extra_trap_percent"] > 95
    for kind in ("rel-branch", "rel-call", "abs-branch", "larl", "rel-long", "execute",
                 "syscall", "plain"):
        assert d["kinds"].get(kind, 0) > 0, kind


# --------------------------------------------------------------------------- the kit bites
class ForgetsLink(S390x):
    """Steps branch-and-save forms without correcting the link register."""

    name = "s390x-forgets-link"
    aliases = ()

    def post_xol(self, step, regs, read):
        eff = super().post_xol(step, regs, read)
        if step.analysis.kind in ("rel-call", "abs-call"):
            eff.regs.pop(f"r{step.analysis.plan.link}", None)
        return eff


class ForgetsNotTaken(S390x):
    """Treats absolute branches like relative ones (pc += correction)."""

    name = "s390x-forgets-not-taken"
    aliases = ()

    def post_xol(self, step, regs, read):
        if step.analysis.kind == "abs-branch":
            return Effect(regs={"pswa": regs["pswa"] + step.correction})
        return super().post_xol(step, regs, read)


class BoostsWithoutRebasing(S390x):
    """Copies relative-long instructions into the boost slot unchanged."""

    name = "s390x-boosts-without-rebasing"
    aliases = ()

    def boost(self, analysis, slot):
        if analysis.kind in ("larl", "rel-long"):
            insn = analysis.insn
            return insn.raw + s390_fixups.brcl_back(slot + insn.length,
                                                    insn.address + insn.length)
        return super().boost(analysis, slot)


class EmulatesConditionsBackwards(S390x):
    """Emulates brc with the condition-code mask bits in the wrong order."""

    name = "s390x-conditions-backwards"
    aliases = ()

    def emulate(self, analysis, regs, read):
        if analysis.plan.op == "brc":
            mask = analysis.insn.raw[1] >> 4
            taken = bool(mask & (1 << ((regs["pswm"] >> 44) & 3)))
            insn = analysis.insn
            return Effect(regs={"pswa": analysis.plan.target if taken
                                else insn.address + insn.length})
        return super().emulate(analysis, regs, read)


class ExecutesWithoutLinkFix(S390x):
    """Steps EX/EXRL without correcting the link of a branch-and-save it runs."""

    name = "s390x-execute-no-link"
    aliases = ()

    def post_xol(self, step, regs, read):
        if step.analysis.kind == "execute":
            insn = step.analysis.insn
            if regs["pswa"] == step.slot + insn.length:
                return Effect(regs={"pswa": insn.address + insn.length})
            return Effect()
        return super().post_xol(step, regs, read)


class EmulatesEveryStore(S390x):
    """Emulates stg/st through any base register (the plugin does so through r15 only),
    on cases whose base register points at the instruction's own, read-only page."""

    name = "s390x-emulates-every-store"
    aliases = ()
    STORES = {"e3..24": 8, "50": 4}

    def analyze(self, insn):
        found = super().analyze(insn)
        if s390_key(insn.raw) in self.STORES:
            return dataclasses.replace(found, strategies=found.strategies | {Strategy.EMULATE})
        return found

    def emulate(self, analysis, regs, read):
        raw = analysis.insn.raw
        size = self.STORES.get(s390_key(raw))
        if size is None:
            return super().emulate(analysis, regs, read)
        disp = int.from_bytes(raw[2:4], "big") & 0xFFF
        ea = regs[f"r{raw[2] >> 4}"] + disp  # the cases use neither index nor DH
        value = regs[f"r{raw[1] >> 4}"] & ((1 << (8 * size)) - 1)
        insn = analysis.insn
        return Effect(regs={"pswa": insn.address + insn.length},
                      mem=[(ea, value.to_bytes(size, "big"))])

    def prepare_case(self, analysis, regs, rng):
        placed = super().prepare_case(analysis, regs, rng)
        raw = analysis.insn.raw
        if s390_key(raw) in self.STORES:
            disp = int.from_bytes(raw[2:4], "big") & 0xFFF
            regs[f"r{raw[2] >> 4}"] = (analysis.address & ~0xFFF) + 0x800 - disp
            regs[f"r{raw[1] & 0xF}"] = 0  # no index
        return placed


class Broken:
    @hookimpl
    def ubp_arch_ops(self):
        return [ForgetsLink(), ForgetsNotTaken(), BoostsWithoutRebasing(),
                EmulatesConditionsBackwards(), ExecutesWithoutLinkFix(), EmulatesEveryStore()]


@pytest.mark.parametrize("name,kinds,strategy", [
    ("s390x-forgets-link", {"rel-call", "abs-call"}, "ssol"),
    ("s390x-forgets-not-taken", {"abs-branch"}, "ssol"),
    ("s390x-boosts-without-rebasing", {"larl", "rel-long"}, "boost"),
    ("s390x-conditions-backwards", {"rel-branch"}, "emulate"),
    ("s390x-execute-no-link", {"execute"}, "ssol"),
])
def test_the_kit_catches_a_wrong_decision(plugins, s390, name, kinds, strategy):
    need(plugins, s390, "unicorn")
    broken = PluginSet(extra=[Broken()])
    arch = broken.arch(name)
    cases = [c for c in corpus.plugin_cases(arch)
             if arch.analyze(arch.decode(c.raw, c.address)).kind in kinds]
    d = _report(arch, cases, ["unicorn"], plugins=broken)
    assert d["failed"] > 0
    assert {f["kind"] for f in d["failures"]} <= kinds
    assert all(f["detail"].startswith(strategy) for f in d["failures"]), d["failures"]


def test_qemu_shows_why_stores_are_emulated_through_the_stack_only(plugins, s390):
    """A store into read-only text faults in place; the tracer's write would go through.
    unicorn cannot show it (its text is writable): qemu-user, like Linux, can."""
    need(plugins, s390, "qemu")
    broken = PluginSet(extra=[Broken()])
    arch = broken.arch("s390x-emulates-every-store")
    cases = [c for c in corpus.plugin_cases(arch) if c.raw.hex() in ("e31020080024", "5010f008")]
    assert len(cases) == 2
    d = _report(arch, cases, ["qemu"], plugins=broken)
    assert d["failed"] == 2, d
    assert all(f["detail"].startswith("emulate") and "fault sig 11" in f["detail"]
               for f in d["failures"]), d["failures"]
    # the plugin itself steps them where they fault (st through r15 is emulated: the
    # stack pointer points at writable memory, which the kit gives it)
    assert _report(s390, cases, ["qemu"])["failed"] == 0


# --------------------------------------------------------------------------- corpus runs
@pytest.mark.corpus
@pytest.mark.parametrize("cpu", ["unicorn", "qemu"])
def test_libc_5000_on_each_cpu(plugins, s390, libc, cpu):
    need(plugins, s390, cpu)
    cases, _ = corpus.elf_cases(s390, libc, 5000, seed=0)
    d = _report(s390, cases, [cpu], jobs=2)
    assert d["failed"] == 0, d["failures"]
    assert d["unverified"] < 0.01 * d["cases"], d["unverified_examples"]
    _all_exercised(d, 100)


@pytest.mark.corpus
def test_cli_libc_5000_both_cpus(plugins, s390, libc):
    """The done-when command: both CPUs, qemu first, unicorn for what qemu cannot run."""
    out = subprocess.run(
        [sys.executable, "-m", "ubp_core.cli", "conformance", "s390x", "--corpus", libc,
         "--sample", "5000", "--random", "300", "--json"],
        capture_output=True, text=True, timeout=5400)
    d = json.loads(out.stdout)
    assert d["failed"] == 0, d["failures"]
    assert d["unverified"] < 0.01 * d["cases"], d["unverified_examples"]
    _all_exercised(d, 100)


@pytest.mark.corpus
def test_both_reference_cpus_agree_on_a_larger_sample(plugins, s390, libc):
    need(plugins, s390, "unicorn")
    need(plugins, s390, "qemu")
    cases = corpus.elf_cases(s390, libc, 2000, seed=17)[0]
    assert agree_in_place(plugins, s390, cases)["same"] > 1800


@pytest.mark.corpus
def test_full_libc_on_unicorn(plugins, s390, libc):
    need(plugins, s390, "unicorn")
    cases, total = corpus.elf_cases(s390, libc, None)
    d = _report(s390, cases, ["unicorn"], jobs=2)
    assert d["cases"] == total
    assert d["failed"] == 0, d["failures"]
    assert d["unverified"] < 0.01 * d["cases"], d["unverified_examples"]
