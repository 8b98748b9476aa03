"""PowerPC decisions read from the instruction bits: decoding, refusals, branch targets,
fixups, boosts, the load-reserve/store-conditional rule, and the ELF/analysis side."""

from __future__ import annotations

import pytest
from test_powerpc_support import VARIANTS, libc_of

from ubp_core.analyze import analyze_file
from ubp_core.elfinfo import ElfImage
from ubp_core.errors import DecodeError, MemoryFault
from ubp_core.types import Strategy, XolStep

E, B, S, IN = Strategy.EMULATE, Strategy.BOOST, Strategy.SSOL, Strategy.INLINE
A = 0x10001000


@pytest.fixture(params=list(VARIANTS))
def arch(request, plugins):
    return plugins.arch(request.param)


@pytest.fixture
def ppc64le(plugins):
    return plugins.arch("ppc64le")


def enc(arch, *words):
    return b"".join(w.to_bytes(4, arch.byteorder) for w in words)


def an(arch, *words, at=A):
    return arch.analyze(arch.decode(enc(arch, *words), at))


def test_three_instances_selected_by_elf_header(plugins):
    for name in VARIANTS:
        with ElfImage(libc_of(name)) as img:
            assert plugins.arch_for_elf(img.ident).name == name


def test_breakpoint_is_tw_in_the_targets_byte_order(arch):
    assert arch.breakpoint == enc(arch, 0x7FE00008)
    assert arch.decode(arch.breakpoint, A).mnemonic in ("trap", "tw")
    assert "trap" in an(arch, 0x7FE00008).refusal


def test_decode_errors(arch):
    with pytest.raises(DecodeError):
        arch.decode(b"\0\0\0\0", A)  # primary opcode 0
    with pytest.raises(DecodeError):
        arch.decode(b"\x01\x02", A)
    with pytest.raises(DecodeError):
        arch.decode(enc(arch, 0x04100000), A)  # a prefix without its suffix
    with pytest.raises(DecodeError):
        arch.decode(enc(arch, 0x04100000, 0x00000000), A)  # not a valid suffix


def test_words_capstone_misses_are_decoded(arch):
    assert arch.decode(enc(arch, 0x7C642E14), A).mnemonic == "addo"  # OE=1
    assert arch.decode(enc(arch, 0x4E800460), A).mnemonic == "bctar"
    assert arch.decode(enc(arch, 0x44000001), A).mnemonic == "scv"
    insn = arch.decode(enc(arch, 0x04100000, 0xE4600010), A)
    assert (insn.length, insn.mnemonic) == (8, "pld")


@pytest.mark.parametrize("word,reason", [
    (0x7FE00008, "trap"), (0x0C030000, "trap"), (0x08030000, "trap"), (0x7C000088, "trap"),
    (0x44000002, "system call"), (0x44000001, "system call"),
    (0x7C6000A6, "privileged"), (0x7C000124, "privileged"), (0x7C000164, "privileged"),
    (0x7C7A02A6, "privileged"),  # mfspr SRR0
    (0x4C000024, "return-from-interrupt"), (0x4C000064, "return-from-interrupt"),
    (0x4C0002E4, "power-management"),
    (0x7CA0192D, "store-conditional"), (0x7CA019AD, "store-conditional"),
    (0x4E000420, "invalid form"),  # bcctr with CTR decrement
])
def test_refusal_table_gives_reasons(arch, word, reason):
    got = an(arch, word)
    assert got.refusal is not None and reason in got.refusal
    assert not got.strategies


def test_user_sprs_are_not_privileged(arch):
    for word in (0x7C0802A6, 0x7C0903A6, 0x7C6102A6):  # mflr, mtctr, mfxer
        assert an(arch, word).refusal is None


@pytest.mark.parametrize("word,target,link,absolute", [
    (0x48000100, A + 0x100, False, False),
    (0x4BFFFF00, A - 0x100, False, False),
    (0x49FFFFFC, A + 0x1FFFFFC, False, False),  # the largest forward b
    (0x4A000000, A - 0x2000000, False, False),  # sign bit of the 24-bit LI
    (0x48000101, A + 0x100, True, False),
    (0x48001002, 0x1000, False, True),
    (0x4BFFF003, -0x1000, True, True),  # ba to a negative (sign-extended) address
    (0x4182FFF0, A - 0x10, False, False),  # beq back: capstone's sign quirk territory
    (0x41827FFC, A + 0x7FFC, False, False),
    (0x41828000, A - 0x8000, False, False),
])
def test_branch_targets_from_the_bits(arch, word, target, link, absolute):
    got = an(arch, word)
    mask = (1 << arch.word_bits) - 1
    assert got.kind == "branch"
    assert got.plan.target == target & mask
    assert (got.plan.link, got.plan.absolute) == (link, absolute)
    assert got.strategies == {E, S, IN}


def test_bctar_is_stepped_only(arch):
    assert an(arch, 0x4E800460).strategies == {S, IN}  # TAR is not in the register file


def test_load_reserve_is_boost_only(arch):
    for word in (0x7D201828, 0x7D2018A8, 0x7D201868, 0x7D2018E8):  # lwarx ldarx lbarx lharx
        got = an(arch, word)
        assert got.strategies == {B} and got.kind == "load-reserve"


def _reader(arch, words, base):
    code = enc(arch, *words)

    def read(address, size):
        off = address - base
        if off < 0 or off + size > len(code):
            raise MemoryFault(address, size)
        return code[off:off + size]

    return read


def test_instructions_inside_an_atomic_sequence_are_refused(arch):
    # 1: lwarx r9,0,r3 ; cmpw r9,r4 ; bne- 2f ; stwcx. r5,0,r3 ; bne- 1b ; 2: isync
    seq = [0x7D201828, 0x7C092000, 0x40820010, 0x7CA0192D, 0x4082FFF0, 0x4C00012C]
    base = A
    read = _reader(arch, [0x60000000] * 4 + seq, base - 16)
    verdicts = []
    for i, w in enumerate(seq):
        a = base + 4 * i
        verdicts.append(arch.analyze_in_context(an(arch, w, at=a), read))
    assert verdicts[0].strategies == {B}  # the larx itself: boosted
    assert all("reservation" in v.refusal for v in verdicts[1:4])  # cmpw, bne, stwcx.
    assert verdicts[4].refusal is None and verdicts[5].refusal is None  # after the stcx.


def test_context_does_not_refuse_ordinary_code(arch):
    words = [0x7C832378, 0x38600001, 0x7C0802A6, 0x4E800020]
    read = _reader(arch, words, A)
    for i, w in enumerate(words):
        assert arch.analyze_in_context(an(arch, w, at=A + 4 * i), read).refusal is None


def test_addpcis_value_and_fixup(arch):
    got = an(arch, 0x4C7F0004)  # addpcis r3, 0x1f
    assert got.plan.value == (A + 4 + (0x3E << 16)) & ((1 << arch.word_bits) - 1)  # D = d0||d1||d2
    slot = 0x10800000
    step = arch.prepare_xol(got, slot, {"pc": A, "cr": 0, "ctr": 0})
    eff = arch.post_xol(step, {"pc": slot + 4, "r3": slot + 4 + (0x3E << 16)}, None)
    assert eff.regs == {"pc": A + 4, "r3": got.plan.value}


def test_prefixed_pc_relative_rebased_for_the_slot(ppc64le):
    got = an(ppc64le, 0x04100000, 0xE4600010)  # pld r3, 16(0), 1
    assert got.kind == "pc-relative" and got.plan.target == A + 16
    assert got.ssol_near == A + 16 and got.ssol_reach == 1 << 33
    slot = A + 0x100000
    step = ppc64le.prepare_xol(got, slot, {"pc": A})
    again = ppc64le.decode(step.code, slot)
    assert again.op_str == "r3, -0xffff0(0), 1"  # A + 16 - slot
    assert ppc64le.boost(got, A + (1 << 34)) is None  # the displacement does not reach


def test_pla_result_is_fixed(ppc64le):
    got = an(ppc64le, 0x06100000, 0x38601000)  # pla r3, 0x1000
    assert got.plan.value == A + 0x1000 and E in got.strategies
    eff = ppc64le.emulate(got, {"pc": A}, None)
    assert eff.regs == {"r3": A + 0x1000, "pc": A + 8}


def test_prefixed_across_a_64_byte_boundary_is_refused(ppc64le):
    got = an(ppc64le, 0x04000000, 0xE4640008, at=A + 60)
    assert "64-byte" in got.refusal


@pytest.mark.parametrize("word,taken_pc,link", [
    (0x48000101, A + 0x100, True),  # bl
    (0x48001002, 0x1000, False),  # ba: absolute, kept
    (0x4E800021, 0x7000, True),  # blrl: the old LR, kept
    (0x4D820020, None, False),  # beqlr not taken (cr = 0): next instruction
])
def test_ssol_fixups(arch, word, taken_pc, link):
    got = an(arch, word)
    slot = 0x10800000
    regs = {"pc": A, "cr": 0, "ctr": 5, "lr": 0x7000}
    step: XolStep = arch.prepare_xol(got, slot, regs)
    assert step.regs == {"pc": slot} and step.code == enc(arch, word)
    if word == 0x48000101:
        after = slot + 0x100
    elif taken_pc is None:
        after = slot + 4
    else:
        after = taken_pc
    eff = arch.post_xol(step, {"pc": after, "lr": slot + 4}, None)
    assert eff.regs.get("pc", after) == (taken_pc if taken_pc is not None else A + 4)
    assert ("lr" in eff.regs) == link
    if link:
        assert eff.regs["lr"] == A + 4


def test_boost_jumps_back_within_32_mib(arch):
    got = an(arch, 0x7C832378)  # mr r3,r4
    near = arch.boost(got, A + (16 << 20))
    assert near[:4] == enc(arch, 0x7C832378)
    back = int.from_bytes(near[4:8], arch.byteorder)
    assert back >> 26 == 18 and not back & 3
    assert arch.decode(near[4:8], A + (16 << 20) + 4).op_str.endswith(hex(A + 4))
    assert arch.boost(got, A + (40 << 20)) is None  # out of reach: the engine falls back
    assert arch.boost(an(arch, 0x48000100), A + 0x1000) is None  # branches are not boosted


def test_emulation_covers_the_common_instructions(arch):
    for word in (0x60000000, 0x38600001, 0x7C832378, 0x2C030000, 0x80640004, 0x7C0802A6,
                 0x7C0803A6, 0x5483103A, 0x7C642A14, 0x70630001):
        assert E in an(arch, word).strategies, hex(word)
    for word in (0x90640004, 0x9421FFF0, 0x7C642E14):  # stores and OE forms are stepped
        assert E not in an(arch, word).strategies, hex(word)


def test_analyze_reports_the_mix_of_the_ppc64le_libc():
    fa = analyze_file(libc_of("ppc64le"))
    d = fa.as_dict()
    assert d["arch"] == "ppc64le" and d["instructions"] > 100000
    assert d["no_extra_trap_percent"] > 90
    assert any("store-conditional" in r for r in d["refusals"])
    assert any("inside a load-reserve" in r for r in d["refusals"])
    assert fa.seconds < 120  # about 5 s on an idle core; the CPU is shared


def test_big_endian_elfv1_descriptors_resolve_to_code():
    with ElfImage(libc_of("ppc64")) as img:
        funcs = img.functions()
        code = img.executable_ranges()
        assert len(funcs) > 1000
        assert all(any(lo <= f.address < hi for lo, hi in code) for f in funcs)
