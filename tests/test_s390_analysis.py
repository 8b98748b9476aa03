"""s390x analysis decisions, read from the bits (the differential proof that each one is
right lives in test_s390_conformance.py and test_s390_programs.py)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ubp_core.conformance.kit import check_analysis, check_contract
from ubp_core.errors import DecodeError, MemoryFault
from ubp_core.types import Strategy

E, B, S, IN = Strategy.EMULATE, Strategy.BOOST, Strategy.SSOL, Strategy.INLINE
A = 0x10000400


@pytest.fixture(scope="module")
def s390(plugins):
    return plugins.arch("s390x")


def an(arch, hexbytes, address=A):
    return arch.analyze(arch.decode(bytes.fromhex(hexbytes), address))


def test_selected_from_the_elf_header(plugins):
    from ubp_core.elfinfo import elf_ident_of

    libc = "/usr/s390x-linux-gnu/lib/libc.so.6"
    try:
        ident = elf_ident_of(libc)
    except Exception:
        pytest.skip(f"{libc} not installed (Debian libc6-s390x-cross)")
    assert plugins.arch_for_elf(ident).name == "s390x"


def test_contract(s390):
    assert check_contract(s390) == []
    assert s390.breakpoint == b"\x00\x01" and s390.pc_after_trap == 2


def test_length_comes_from_the_top_two_bits(s390):
    """Every first byte, with every value of the second byte (the opcode extension of
    most formats) and of the last (that of the six-byte e3/eb/ec/ed/e7 families)."""
    decoded: dict[int, int] = {}
    for first in range(256):
        want = (2, 4, 4, 6)[first >> 6]
        rng = random.Random(first)
        for v in range(256):
            for raw in (bytes([first, v]) + rng.randbytes(4),
                        bytes([first]) + rng.randbytes(4) + bytes([v])):
                try:
                    insn = s390.decode(raw, A)
                except DecodeError:
                    continue
                assert insn.length == want, insn.text
                decoded[first] = decoded.get(first, 0) + 1
    # most first bytes are assigned (capstone 5 knows 203 of them): a decoder that
    # refused nearly everything must not pass this test
    assert len(decoded) >= 200, sorted(set(range(256)) - set(decoded))


@pytest.mark.parametrize("code,kind,strategies", [
    ("a7f40010", "rel-branch", {E, S, IN}),  # j
    ("a7840010", "rel-branch", {E, S, IN}),  # je
    ("c0f400000010", "rel-branch", {E, S, IN}),  # jg
    ("a7170010", "rel-branch", {E, S, IN}),  # brctg
    ("ec180010007e", "rel-branch", {E, S, IN}),  # cije: relative, whatever capstone groups say
    ("a7e50010", "rel-call", {E, S, IN}),  # bras
    ("c0e500000010", "rel-call", {E, S, IN}),  # brasl
    ("07fe", "abs-branch", {E, S, IN}),  # br r14
    ("47f01000", "abs-branch", {E, S, IN}),  # b 0(r1)
    ("ec123000a0e4", "abs-branch", {E, S, IN}),  # cgrb
    ("e31020000047", "abs-branch", {S, IN}),  # bic: its target comes from memory
    ("0de1", "abs-call", {E, S, IN}),  # basr
    ("4de02008", "abs-call", {E, S, IN}),  # bas
    ("07f0", "nop", {E, B, S, IN}),  # bcr 15,0: serialization, never branches
    ("0700", "nop", {E, B, S, IN}),
    ("4700f000", "nop", {E, B, S, IN}),
    ("c01000000010", "larl", {E, B, S, IN}),
    ("c41800000010", "rel-long", {E, B, S, IN}),  # lgrl
    ("c61a00000010", "rel-long", {E, B, S, IN}),  # clgrl
    ("c41b00000010", "rel-long", {B, S, IN}),  # stgrl: stores are not emulated
    ("44102000", "execute", {S, IN}),
    ("c61000000010", "execute", {S, IN}),  # exrl
    ("0a00", "syscall", {B, S, IN}),
    ("eb6ff0300024", "plain", {E, B, S, IN}),  # stmg r6,r15,48(r15)
    ("eb6520000024", "plain", {B, S, IN}),  # stmg through r2: its page may be read-only
    ("e3e0f0700024", "plain", {E, B, S, IN}),  # stg r14,112(r15)
    ("e31020080024", "plain", {B, S, IN}),  # stg r1,8(r2)
    ("b9040012", "plain", {E, B, S, IN}),  # lgr
    ("d20710002000", "plain", {B, S, IN}),  # mvc
    ("b98d0012", "psw", {B}),  # epsw: only a boost shows the program its own PSW
])
def test_classification(s390, code, kind, strategies):
    a = an(s390, code)
    assert a.refusal is None
    assert a.kind == kind
    assert set(a.strategies) == strategies
    assert check_analysis(s390, a) is None


@pytest.mark.parametrize("code,words", [
    ("0001", "breakpoint"),
    ("0002", "uprobes"),
    ("e56000000000", "tbegin"),
    ("e56100000000", "tbeginc"),
    ("b2f80000", "transaction"),
    ("010c", "24-bit"),
    ("010d", "31-bit"),
    ("0b12", "addressing mode"),
    ("0c12", "addressing-mode"),
    ("0101", "linkage-stack"),
    ("b2400012", "linkage stack"),
    ("b2180000", "linkage stack"),
    ("b2280012", "PSW"),
    ("b2580012", "address-space"),
    ("b25a0012", "dispatchable-unit"),
])
def test_refusals_name_their_reason(s390, code, words):
    a = an(s390, code)
    assert a.strategies == frozenset()
    assert words in a.refusal


def test_relative_targets_are_read_from_the_bits(s390):
    assert an(s390, "a7f4fff0").plan.target == A - 0x20
    assert an(s390, "c0f480000000").plan.target == (A - (1 << 32)) & ((1 << 64) - 1)
    assert an(s390, "ec12fff08076").plan.target == A - 0x20  # crj: RI4 at bytes 2-3
    assert an(s390, "c41800000100").plan.target == A + 0x200
    rel = an(s390, "c41800000100")
    assert rel.ssol_reach == 1 << 32 and rel.ssol_near == A + 0x200


@pytest.mark.parametrize("code,strategies", [
    ("c418f8000000", {IN}),  # lgrl
    ("c61df8000000", {IN}),  # crl
    ("c41ff8000000", {IN}),  # strl
    ("c610f8000000", {IN}),  # exrl
    ("c622f8000000", {E, IN}),  # pfdrl: a prefetch never faults
])
def test_an_operand_that_wraps_around_the_address_space_is_stepped_inline(s390, code,
                                                                         strategies):
    low = an(s390, code, 0x401000)  # 256 MiB below it: the top of the address space
    assert low.refusal is None and set(low.strategies) == strategies
    assert low.plan.target == (0x401000 - (1 << 28)) & ((1 << 64) - 1)
    assert check_analysis(s390, low) is None
    # the same bytes 256 MiB further up do not wrap: every strategy they support
    high = an(s390, code, 0x401000 + (1 << 28))
    assert S in high.strategies and high.plan.target == 0x401000


def test_boost_is_the_copy_and_a_brcl_back(s390):
    a = an(s390, "b9040012")
    slot = A + (1 << 30)
    code = s390.boost(a, slot)
    back = s390.decode(code[4:], slot + 4)
    assert code[:4] == a.insn.raw
    assert back.mnemonic == "jg" and int(back.op_str, 16) == A + 4
    assert s390.boost(a, A + (1 << 33)) is None  # beyond brcl's 4 GiB: fall back


def test_boost_rebases_relative_long_operands(s390):
    a = an(s390, "c01000000100")  # larl r1, A+0x200
    slot = A - (1 << 31)
    code = s390.boost(a, slot)
    moved = s390.decode(code[:6], slot)
    assert int(moved.op_str.split(",")[1], 16) == A + 0x200
    assert s390.boost(a, A + (1 << 32) + 4096) is None


def test_ssol_slot_of_a_relative_long_operand_must_reach_it(s390):
    a = an(s390, "c41800000100")
    regs = {r: 0 for r in s390.registers}
    step = s390.prepare_xol(a, A + (1 << 31), regs)
    moved = s390.decode(step.code, step.slot)
    assert int(moved.op_str.split(",")[1], 16) == A + 0x200
    assert not a.ssol_slot_ok(A + (1 << 32) + 8192)


def test_system_call_slot_ends_with_a_jump_back(s390):
    a = an(s390, "0a00")
    regs = {r: 0 for r in s390.registers}
    step = s390.prepare_xol(a, A + 4096, regs)
    back = s390.decode(step.code[2:], A + 4098)
    assert step.code[:2] == b"\x0a\x00" and int(back.op_str, 16) == A + 2


def _program(s390, pieces):
    """Code at A: (offset, hex) pieces on a page of nops; a reader over it."""
    page = bytearray(b"\x07\x00" * 2048)
    base = A & ~0xFFF
    for off, code in pieces:
        raw = bytes.fromhex(code)
        page[A - base + off:A - base + off + len(raw)] = raw

    def read(address, size):
        if not base <= address <= address + size <= base + 4096:
            raise MemoryFault(address, size)
        return bytes(page[address - base:address - base + size])

    return read


def test_an_exrl_target_is_refused_in_context(s390):
    read = _program(s390, [(0, "c61000000010"), (0x20, "d20010002000")])
    target = s390.analyze(s390.decode(read(A + 0x20, 6), A + 0x20))
    assert target.refusal is None
    got = s390.analyze_in_context(target, read)
    assert "EXECUTE" in got.refusal and got.strategies == frozenset()
    other = s390.analyze(s390.decode(read(A + 0x40, 2), A + 0x40))
    assert s390.analyze_in_context(other, read).refusal is None


def test_a_larl_then_ex_target_is_refused_in_context(s390):
    read = _program(s390, [(0, "c01000000008"), (6, "44401000"), (0x10, "d70010001000")])
    target = s390.analyze(s390.decode(read(A + 0x10, 6), A + 0x10))
    assert "EXECUTE" in s390.analyze_in_context(target, read).refusal
    # the same larl without an EX through r1: not an EXECUTE target
    read = _program(s390, [(0, "c01000000008"), (6, "44402000"), (0x10, "d70010001000")])
    target = s390.analyze(s390.decode(read(A + 0x10, 6), A + 0x10))
    assert s390.analyze_in_context(target, read).refusal is None


def test_every_refusal_has_a_case_and_every_kind_is_exercised(s390):
    from ubp_s390.analysis import REFUSALS

    kinds, refusals = set(), set()
    for raw, _note in s390.conformance_cases():
        a = s390.analyze(s390.decode(raw, A))
        kinds.add(a.kind)
        if a.refusal:
            refusals.add(a.refusal)
    assert set(REFUSALS.values()) <= refusals
    assert {"rel-branch", "rel-call", "abs-branch", "abs-call", "nop", "larl", "rel-long",
            "execute", "syscall", "plain", "psw"} <= kinds


# --------------------------------------------------------------------------- robustness
@settings(max_examples=3000, deadline=None)
@given(st.binary(min_size=0, max_size=8), st.integers(0, (1 << 63)))
def test_arbitrary_bytes_decode_or_raise_decode_error(s390, raw, address):
    try:
        insn = s390.decode(raw, address * 2)
    except DecodeError:
        return
    assert 2 <= insn.length <= 6 and insn.raw == raw[:insn.length]
    a = s390.analyze(insn)
    assert check_analysis(s390, a) is None


@settings(max_examples=1500, deadline=None)
@given(st.binary(min_size=6, max_size=6), st.randoms(use_true_random=False))
def test_hooks_never_raise_on_any_accepted_instruction(s390, raw, rng):
    try:
        insn = s390.decode(raw, A)
    except DecodeError:
        return
    a = s390.analyze(insn)
    if a.refusal is not None:
        return
    regs = {r: rng.getrandbits(64) for r in s390.registers}
    regs["pswa"] = A

    def read(address, size):
        if rng.random() < 0.3:
            raise MemoryFault(address, size)
        return rng.randbytes(size)

    if E in a.strategies:
        s390.emulate(a, dict(regs), read)
    if B in a.strategies:
        s390.boost(a, A + (1 << 30))
    slots = []
    if S in a.strategies and a.ssol_slot_ok(A + (1 << 30)):
        slots.append(A + (1 << 30))
    if IN in a.strategies:
        slots.append(A)  # inline: stepped in place, through the same hooks
    for slot in slots:
        step = s390.prepare_xol(a, slot, dict(regs))
        after = dict(regs, pswa=slot + insn.length)
        s390.post_xol(step, after, read)
        s390.abort_xol(step, after, read)


def test_decode_is_robust_at_odd_and_short_input(s390):
    with pytest.raises(DecodeError):
        s390.decode(b"\x07", A)
    with pytest.raises(DecodeError):
        s390.decode(b"\xc0\xf4\x00", A)
    with pytest.raises(DecodeError):
        s390.decode(b"\x07\xfe", A + 1)
    assert list(s390.decode_all(bytes.fromhex("07fe0700c0f400000010"), A)) != []
