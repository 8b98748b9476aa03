"""Hand-picked s390x instructions for the conformance kit, random encodings, and the
register and memory set-up that makes a case safe and meaningful to run.

Each case is here because it exercises one decision of the plugin: an emulation, a
fixup, a re-based displacement, an EXECUTE target, a refusal.
"""

from __future__ import annotations

import random

from ubp_core.types import Analysis, Insn, Placement, Regs

from . import fields as f
from .analysis import Plan
from .refcpus import USER_PSW

H = bytes.fromhex


def _all(template: str, values: range, at: int) -> list[tuple[bytes, str]]:
    """One case per value of the nibble at hex digit ``at`` of ``template``."""
    return [(H(template[:at] + f"{v:x}" + template[at + 1:]), f"{template} nibble {v}")
            for v in values]


CASES: list[tuple[bytes, str]] = [
    # relative branches: every mask, both directions, to itself
    *_all("a7040010", range(16), 2),
    (H("a7f4fff0"), "j backwards"),
    (H("a7f40000"), "j to itself"),
    (H("c0f400000010"), "jg"),
    (H("c08400000010"), "jge (brcl 8)"),
    (H("c0f480000000"), "jg -4 GiB"),
    (H("a7160010"), "brct r1"),
    (H("a7170010"), "brctg r1"),
    (H("cc160000000a"), "brcth r1"),
    (H("84120010"), "brxh r1,r2 (odd comparand r3)"),
    (H("85130010"), "brxle r1,r3 (comparand r3 itself)"),
    (H("ec1200100044"), "brxhg r1,r2"),
    (H("ec1300100045"), "brxlg r1,r3"),
    *_all("ec1200108076", range(0, 16, 2), 8),  # crj masks
    (H("ec120010a064"), "cgrj"),
    (H("ec1200104077"), "clrj"),
    (H("ec1200102065"), "clgrj"),
    (H("ec18001000 7e".replace(" ", "")), "cije r1,0"),
    (H("ec1a0010807c"), "cgijnl r1,-128"),
    (H("ec1400107f7f"), "clijl r1,127"),
    (H("ec1600108f7d"), "clgijnh r1,143"),
    # relative branch and save
    (H("a7e50010"), "bras r14"),
    (H("a7050010"), "bras r0"),
    (H("c0e500000010"), "brasl r14"),
    (H("c01500001000"), "brasl r1 far"),
    (H("c0e5fffffffd"), "brasl to itself"),
    # absolute branches
    (H("07fe"), "br r14"),
    (H("0781"), "bcr 8,r1"),
    (H("0770"), "bcr 7,r0: no target register, never branches"),
    (H("07f0"), "bcr 15,0: serialization"),
    (H("07e0"), "bcr 14,0: fast serialization"),
    (H("0702"), "bcr 0,r2: mask 0"),
    (H("47f01000"), "b 0(r1)"),
    (H("47823008"), "bc 8,8(r2,r3)"),
    (H("4700f000"), "nop 0(r15)"),
    (H("0612"), "bctr r1,r2"),
    (H("0610"), "bctr r1,0: count only"),
    (H("46102000"), "bct r1,0(r2)"),
    (H("b9460012"), "bctgr r1,r2"),
    (H("b9460010"), "bctgr r1,0"),
    (H("e31020000046"), "bctg r1,0(r2)"),
    (H("86124000"), "bxh r1,r2,0(r4)"),
    (H("87134000"), "bxle r1,r3,0(r4)"),
    (H("eb1240000044"), "bxhg r1,r2,0(r4)"),
    (H("eb1340000045"), "bxleg r1,r3,0(r4)"),
    (H("ec123000a0e4"), "cgrbhe r1,r2,0(r3)"),
    (H("ec1230008 0e5".replace(" ", "")), "clgrbe"),
    (H("ec1230002 0f6".replace(" ", "")), "crbh"),
    (H("ec1230004 0f7".replace(" ", "")), "clrbl"),
    (H("ec18300000fc"), "cgibe r1,0"),
    (H("ec14300080fd"), "clgibl r1,128"),
    (H("ec1a3000fffe"), "cibhe r1,-1"),
    (H("ec1630000aff"), "clibne r1,10"),
    (H("e310200000 47".replace(" ", "")), "bio 0(r2): branch indirect (z14)"),
    # absolute branch and save
    (H("0de1"), "basr r14,r1"),
    (H("0de0"), "basr r14,0: link only"),
    (H("0dee"), "basr r14,r14: target is the old r14"),
    (H("05e1"), "balr r14,r1"),
    (H("4de02008"), "bas r14,8(r2)"),
    (H("45e02008"), "bal r14,8(r2)"),
    # relative long
    (H("c01000000010"), "larl r1,+32"),
    (H("c0e0fffffff0"), "larl r14,-32"),
    (H("c01080000000"), "larl r1,-4 GiB"),
    (H("c0107fffffff"), "larl r1,+4 GiB"),
    (H("c41800000100"), "lgrl r1"),
    (H("c41800000101"), "lgrl r1, 2 mod 8: specification exception"),
    (H("c41d00000100"), "lrl r1"),
    (H("c41c00000101"), "lgfrl r1, 2 mod 4"),
    (H("c41e00000100"), "llgfrl r1"),
    (H("c41500000101"), "lhrl r1"),
    (H("c41400000100"), "lghrl r1"),
    (H("c41200000103"), "llhrl r1"),
    (H("c41600000100"), "llghrl r1"),
    (H("c41b00000100"), "stgrl r1"),
    (H("c41f00000100"), "strl r1"),
    (H("c41700000101"), "sthrl r1"),
    (H("c61800000100"), "cgrl r1"),
    (H("c61d00000100"), "crl r1"),
    (H("c61a00000100"), "clgrl r1"),
    (H("c61f00000100"), "clrl r1"),
    (H("c61400000100"), "cghrl r1"),
    (H("c61500000101"), "chrl r1"),
    (H("c61600000100"), "clghrl r1"),
    (H("c61700000100"), "clhrl r1"),
    (H("c61c00000100"), "cgfrl r1"),
    (H("c61e00000100"), "clgfrl r1"),
    (H("c62200000100"), "pfdrl 2"),
    (H("c4180000fff0"), "lgrl r1, below the instruction"),
    # operands 256 MiB below the case: the address wraps to the top of the address space
    (H("c418f8000000"), "lgrl r1, wraps below 0: inline only"),
    (H("c61df8000000"), "crl r1, wraps below 0: inline only"),
    (H("c41ff8000000"), "strl r1, wraps below 0: inline only"),
    (H("c622f8000000"), "pfdrl 2, wraps below 0: emulated as nothing"),
    (H("c610f8000000"), "exrl r1, wraps below 0: inline only"),
    # EXECUTE (the target is placed by prepare_case)
    (H("44102000"), "ex r1,0(r2)"),
    (H("44003000"), "ex r0,0(r3): no modifier"),
    (H("44123008"), "ex r1,8(r2,r3)"),
    (H("44000100"), "ex r0,0x100: absolute target"),
    (H("44202000"), "ex r2,0(r2): the modifier is the address"),
    (H("c61000000080"), "exrl r1,+0x100"),
    (H("c600ffffff80"), "exrl r0,-0x100"),
    (H("c63000000200"), "exrl r3,+0x400"),
    (H("c64000000100"), "exrl r4,+0x200"),
    (H("44004000"), "ex r0,0(r4)"),
    (H("44503000"), "ex r5,0(r3)"),
    (H("c650ffffff00"), "exrl r5,-0x200"),
    # system calls
    (H("0a00"), "svc 0 (number in r1)"),
    (H("0a14"), "svc 20 (getpid)"),
    # emulated plain instructions
    (H("eb6ff0300024"), "stmg r6,r15,48(r15)"),
    (H("ebeff0700024"), "stmg r14,r15,112(r15)"),
    (H("eb2ff0100024"), "stmg r2,r15,16(r15)"),
    (H("ebf1f0000024"), "stmg r15,r1,0(r15): wraps"),
    (H("eb6520000024"), "stmg r6,r5,0(r2): not the stack"),
    (H("eb6ff0a00004"), "lmg r6,r15,160(r15)"),
    (H("eb1f10000004"), "lmg r1,r15,0(r1): base among the loaded"),
    (H("b9040012"), "lgr r1,r2"),
    (H("1812"), "lr r1,r2"),
    (H("b9140012"), "lgfr r1,r2"),
    (H("41123008"), "la r1,8(r2,r3)"),
    (H("4110f0a0"), "la r1,160(r15)"),
    (H("e3f0ff60ff71"), "lay r15,-160(r15)"),
    (H("a719ffff"), "lghi r1,-1"),
    (H("a7187fff"), "lhi r1,32767"),
    (H("a71b0001"), "aghi r1,1"),
    (H("a7fbff60"), "aghi r15,-160"),
    (H("a71a8000"), "ahi r1,-32768"),
    (H("ec127fff00d9"), "aghik r1,r2,32767"),
    (H("ec12ffff00d8"), "ahik r1,r2,-1"),
    (H("b9020012"), "ltgr r1,r2"),
    (H("1211"), "ltr r1,r1"),
    (H("a71f0000"), "cghi r1,0"),
    (H("a71effff"), "chi r1,-1"),
    (H("b9200012"), "cgr r1,r2"),
    (H("1912"), "cr r1,r2"),
    (H("b9210012"), "clgr r1,r2"),
    (H("1512"), "clr r1,r2"),
    (H("e3e0f0700024"), "stg r14,112(r15)"),
    (H("e31020080024"), "stg r1,8(r2): not the stack"),
    (H("5010f008"), "st r1,8(r15)"),
    (H("e31020080004"), "lg r1,8(r2)"),
    (H("58102008"), "l r1,8(r2)"),
    # plain, boosted
    (H("d20710002000"), "mvc 0(8,r1),0(r2)"),
    (H("d7ff10001000"), "xc 0(256,r1),0(r1)"),
    (H("d50310002000"), "clc 0(4,r1),0(r2)"),
    (H("ba123000"), "cs r1,r2,0(r3)"),
    (H("eb1230000030"), "csg r1,r2,0(r3)"),
    (H("b2220010"), "ipm r1"),
    (H("0410"), "spm r1"),
    (H("b24f0010"), "ear r1,a0"),
    (H("b24e0021"), "sar a2,r1"),
    (H("b3c10012"), "ldgr f1,r2"),
    (H("b3cd0012"), "lgdr r1,f2"),
    (H("6020f008"), "std f2,8(r15)"),
    (H("e70010000006"), "vl v0,0(r1)"),
    (H("ec12000f3f55"), "risbg r1,r2,0,15,63"),
    (H("b25e0012"), "srst r1,r2"),
    (H("b25d0012"), "clst r1,r2"),
    (H("b9970022"), "dlr r2,r2: divides by what r2 holds"),
    (H("e31020000008"), "ag r1,0(r2): overflow when the program mask asks"),
    (H("b2b00100"), "stfle 0x100"),
    (H("b98d0012"), "epsw r1,r2: boost only (the step's PER bit)"),
    (H("010e"), "sam64"),
    (H("82001000"), "lpsw: privileged"),
    (H("b2b21000"), "lpswe: privileged"),
    (H("83120000"), "diag: privileged"),
    (H("ac001000"), "stnsm: privileged"),
    (H("01ff"), "trap2"),
    # refused
    (H("0001"), "breakpoint: refused"),
    (H("0002"), "uprobes breakpoint: refused"),
    (H("e56000000000"), "tbegin: refused"),
    (H("e56100000000"), "tbeginc: refused"),
    (H("b2f80000"), "tend: refused"),
    (H("010c"), "sam24: refused"),
    (H("010d"), "sam31: refused"),
    (H("0b12"), "bsm: refused"),
    (H("0c12"), "bassm: refused"),
    (H("0101"), "pr: refused"),
    (H("b2400012"), "bakr: refused"),
    (H("b2180000"), "pc: refused"),
    (H("b2280012"), "pt: refused"),
    (H("b2580012"), "bsg: refused"),
    (H("b25a0012"), "bsa: refused"),
]

# first bytes worth drawing more often: the families the plugin treats specially
INTERESTING = (0x07, 0x05, 0x06, 0x0D, 0x0A, 0x44, 0x45, 0x46, 0x47, 0x4D, 0x84, 0x85, 0x86,
               0x87, 0xA7, 0xC0, 0xC4, 0xC6, 0xCC, 0xE3, 0xEB, 0xEC, 0xB9, 0xB2, 0x01)


def random_encoding(rng: random.Random) -> bytes:
    head = rng.choice(INTERESTING) if rng.random() < 0.6 else rng.randrange(256)
    return bytes([head]) + rng.randbytes(5)


# ---------------------------------------------------------------------------- EXECUTE
EXECUTE_TARGETS = {
    # plain: any modifier keeps them plain (a length, a register, an opcode extension
    # that stays within a7.a, a7.b, a7.e, a7.f)
    "plain": ("d2001000f000", "d70010001000", "d50020003000", "1823", "4120f008",
              "a72a0001"),
    "link": ("0de2", "4de0f000", "0d10"),
    "branch": ("07f2", "47f0f000", "0782"),
    "relative": ("a7f40010", "c03000000010", "a7e50010", "c41800000004"),
}


def execute_target_kind(insn: Insn) -> str:
    """Which kind of target the conformance kit places for an EX/EXRL case.

    Derived from the instruction and its address alone (so a reference CPU can tell in
    advance that it runs one kind unfaithfully); consecutive cases cycle the kinds.
    Where the modifier register is also an address register its low byte is not free,
    and only modifier-proof (plain) targets are used.
    """
    raw = insn.raw
    r1 = f.r1(raw)
    if raw[0] == 0x44 and r1 and r1 in (f.b2(raw), f.x2(raw)):
        return "plain"
    return ("plain", "link", "branch", "relative", "plain")[(insn.address >> 1) % 5]


def _execute(analysis: Analysis, regs: Regs, rng: random.Random) -> list[Placement]:
    insn = analysis.insn
    raw, a, n = insn.raw, insn.address, insn.length
    plan: Plan = analysis.plan
    kind = execute_target_kind(insn)
    target_bytes = H(rng.choice(EXECUTE_TARGETS[kind]))
    r1 = f.r1(raw)
    if plan.op == "exrl":
        assert plan.target is not None
        where = plan.target
    else:
        page = a & ~0xFFF
        where = a + 0x100 if (a - page) + 0x100 + 6 <= 0x1000 else a - 0x100
        b, x, d = f.b2(raw), f.x2(raw), f.d12(raw)
        if b and x and b == x:
            if (where - d) % 2:
                return []
            regs[f"r{b}"] = ((where - d) // 2) & f.MASK64
        elif b:
            regs[f"r{b}"] = (where - d - (regs[f"r{x}"] if x else 0)) & f.MASK64
        elif x:
            regs[f"r{x}"] = (where - d) & f.MASK64
        else:
            where = d
    if kind != "plain" and r1:
        regs[f"r{r1}"] &= ~0xFF  # no modifier: the kind stays what was chosen
    if where % 2 or (where < a + n and a < where + len(target_bytes)):
        return []
    return [Placement(where, target_bytes, code=True)]


# ---------------------------------------------------------------------------- set-up
def prepare(analysis: Analysis, regs: Regs, rng: random.Random) -> list[Placement]:
    """A problem-state 64-bit PSW with a random condition code, 32-bit access registers,
    getpid for a system call, and the target of an EXECUTE in executable memory."""
    regs["pswm"] = USER_PSW | (rng.randrange(4) << 44)
    for i in range(16):
        regs[f"acr{i}"] &= 0xFFFFFFFF
    plan: Plan | None = analysis.plan
    if plan is None:
        return []
    if plan.kind == "syscall" and analysis.insn.raw[1] == 0:
        regs["r1"] = 20  # getpid: harmless wherever it runs for real
    if plan.kind == "execute":
        return _execute(analysis, regs, rng)
    return []


SAFE_SYSCALLS = frozenset({20, 24, 47, 49, 50, 236})  # getpid, getuid, getgid, ... gettid


def hazard(analysis: Analysis) -> str | None:
    raw = analysis.insn.raw
    if raw[0] == 0x0A and raw[1] and raw[1] not in SAFE_SYSCALLS:
        return f"svc {raw[1]} makes system call {raw[1]} for real, with random arguments"
    return None
