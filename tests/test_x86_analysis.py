"""x86-64 analysis decisions, read from the bytes (the differential proof that each one
is right lives in test_x86_conformance.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ubp_core.conformance.kit import check_analysis
from ubp_core.errors import DecodeError
from ubp_core.types import Strategy

E, B, S, IN = Strategy.EMULATE, Strategy.BOOST, Strategy.SSOL, Strategy.INLINE


def an(x86, hexbytes, address=0x401000):
    return x86.analyze(x86.decode(bytes.fromhex(hexbytes), address))


@pytest.mark.parametrize("code,kind,strategies", [
    ("55", "push", {E, B, S, IN}),
    ("4154", "push", {E, B, S, IN}),
    ("5d", "pop", {E, B, S, IN}),
    ("f30f1efa", "nop", {E, B, S, IN}),
    ("0f1f440000", "nop", {E, B, S, IN}),
    ("4990", "plain", {B, S, IN}),  # xchg r8, rax is not a nop
    ("eb10", "rel-branch", {E, S, IN}),
    ("0f8440000000", "rel-branch", {E, S, IN}),
    ("e840000000", "call", {E, S, IN}),
    ("c3", "ret", {E, S, IN}),
    ("ff2540000000", "indirect-branch", {E, S, IN}),
    ("64ff2425f0ffffff", "indirect-branch", {S, IN}),  # fs-relative: not emulated
    ("488b0540000000", "rip-relative", {B, S, IN}),
    ("0f05", "syscall", {S, IN}),
    ("9d", "flags", {S, IN}),  # popf may set TF: no boost
    ("d9e8", "x87", {S, IN}),  # FIP would name the boost slot
    ("d97c24f0", "x87", {B, S, IN}),  # fnstcw: a control instruction, FIP untouched
    ("f3a4", "string-rep", {B, S, IN}),
    ("0f0b", "undefined", {B, S, IN}),
    ("f4", "privileged", {B, S, IN}),
])
def test_classification(x86, code, kind, strategies):
    a = an(x86, code)
    assert a.refusal is None
    assert a.kind == kind
    assert set(a.strategies) == strategies


@pytest.mark.parametrize("code,words", [
    ("cc", "breakpoint instruction itself"),
    ("cd80", "int n"),
    ("f1", "int1"),
    ("48cf", "iret"),
    ("8ed0", "mov to ss"),
    ("c7f810000000", "xbegin"),
    ("0f34", "sysenter"),
    ("66eb10", "truncates the target"),
])
def test_refusals_name_their_reason(x86, code, words):
    a = an(x86, code)
    assert a.strategies == frozenset()
    assert words in a.refusal


def test_rip_relative_rewrite_picks_an_unused_scratch(x86):
    # cmpxchg16b reads rax rbx rcx rdx: the scratch must be none of them
    a = an(x86, "480fc70d40000000")
    assert a.plan.scratch not in {"rax", "rbx", "rcx", "rdx", "rsp"}
    assert a.plan.ssol_code[3] >> 6 == 2  # mod=10: [scratch + disp32]
    # EVEX: the inverted B bit is set so the scratch is not read as r8+
    a = an(x86, "62d1fe486f0540000000")
    assert a.plan.ssol_code[1] & 0x20


def test_x87_rip_relative_steps_near_its_operand(x86):
    a = an(x86, "dd0500001000", address=0x401000)
    assert a.plan.rebase and a.ssol_reach == 1 << 31
    assert a.ssol_near == 0x401006 + 0x100000


def test_boost_rebases_rip_relative_and_jumps_back(x86):
    a = an(x86, "488b0540000000", 0x401000)
    code = x86.boost(a, 0x401000 + 0x10000)
    disp = int.from_bytes(code[3:7], "little", signed=True)
    assert 0x10000 + 7 + disp == 7 + 0x40  # same absolute operand
    assert code[7] == 0xE9
    rel = int.from_bytes(code[8:12], "little", signed=True)
    assert 0x10000 + 12 + rel == 7  # back to the next instruction
    assert x86.boost(a, 0x401000 + (3 << 30)) is None  # out of rel32 reach


def test_libc_analysis_meets_the_targets(x86, libc_x86):
    from ubp_core.analyze import analyze_file

    fa = analyze_file(libc_x86).as_dict()
    assert fa["instructions"] > 50000
    assert fa["refused_percent"] < 0.5
    assert fa["no_extra_trap_percent"] > 99.0
    assert fa["seconds"] > 0  # how long is the benchmark's business, not a test's


@settings(max_examples=3000, deadline=None)
@given(st.binary(min_size=1, max_size=15), st.integers(0x1000, 1 << 46))
def test_arbitrary_bytes_only_raise_decode_error(x86, raw, address):
    try:
        insn = x86.decode(raw, address)
    except DecodeError:
        return
    a = x86.analyze(insn)
    assert check_analysis(x86, a) is None


def test_emulation_touches_memory_exactly_where_the_analysis_says(x86, libc_x86):
    """The flag the ptrace policy reads (`emulation_touches_memory`: boost such
    instructions, since each access is a system call) is proved by running the plugin's
    own emulator (itself proved against reference CPUs by the conformance kit) on every
    emulable instruction of a libc sample: unflagged ones never read or write memory."""
    import random

    from ubp_core.conformance.corpus import elf_cases
    from ubp_core.ptrace.regs import UserRegs

    cases, _total = elf_cases(x86, libc_x86, 20000, seed=7)
    rng = random.Random(7)
    flagged = touched = unflagged = 0
    for case in cases:
        try:
            analysis = x86.analyze(x86.decode(case.raw, case.address))
        except DecodeError:
            continue
        if E not in analysis.strategies:
            continue
        regs = UserRegs()
        for name in regs.names:
            regs[name] = rng.getrandbits(47) & ~7
        reads = []

        def read(address, size, reads=reads):
            reads.append(address)
            return bytes(size)

        effect = x86.emulate(analysis, regs, read)
        used = bool(reads) or bool(effect is not None and effect.mem)
        if analysis.emulation_touches_memory:
            flagged += 1
            touched += used
        else:
            unflagged += 1
            assert not used, (analysis.insn.text, reads, effect)
    assert unflagged > 1000 and flagged > 1000 and touched == flagged
