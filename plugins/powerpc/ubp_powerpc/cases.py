"""Hand-picked PowerPC instructions for the conformance kit, and a random-word source.

Each case is here because it exercises one decision of the plugin: an emulation, a
branch fixup, a pc-relative rewrite, a boost-only load-reserve, a refusal.
"""

from __future__ import annotations

import random

# (words, note, 64-bit only)
CASES: list[tuple[tuple[int, ...], str, bool]] = [
    # branches: I-form
    ((0x48000100,), "b +0x100", False),
    ((0x4BFFFF00,), "b -0x100", False),
    ((0x48000000,), "b to itself", False),
    ((0x48000101,), "bl +0x100: LR = address + 4", False),
    ((0x48000001,), "bl to itself", False),
    ((0x48001002,), "ba 0x1000 (absolute)", False),
    ((0x48001003,), "bla 0x1000", False),
    # branches: B-form, taken or not by CR / CTR
    ((0x41820010,), "beq +0x10", False),
    ((0x40820010,), "bne +0x10", False),
    ((0x419D0010,), "bgt cr7 +0x10", False),
    ((0x4180FFF0,), "blt -0x10", False),
    ((0x42000010,), "bdnz +0x10 (CTR decremented)", False),
    ((0x42400010,), "bdz +0x10", False),
    ((0x41000011,), "bdnztl-style bcl 8,0", False),
    ((0x429F0005,), "bcl 20,31,$+4 (get the pc)", False),
    ((0x41820012,), "beqa 0x10 (absolute)", False),
    ((0x42800010,), "bc 20: branch always", False),
    # branches: XL-form through LR / CTR / TAR
    ((0x4E800020,), "blr", False),
    ((0x4E800021,), "blrl: target is the old LR", False),
    ((0x4D820020,), "beqlr", False),
    ((0x4C820021,), "bnelrl", False),
    ((0x4E000020,), "bdnzlr", False),
    ((0x4E800420,), "bctr", False),
    ((0x4E800421,), "bctrl", False),
    ((0x4D820420,), "beqctr", False),
    ((0x4E000420,), "bcctr with CTR decrement: invalid form, refused", False),
    ((0x4E800460,), "bctar (ISA 2.07)", True),
    # pc into a register
    ((0x4C600004,), "lnia r3 (addpcis r3,0)", True),
    ((0x4C7F0004,), "addpcis r3,+0x1f0000", True),
    ((0x4C60FFC5,), "addpcis r3, negative", True),
    # prefixed (ISA 3.1)
    ((0x04100000, 0xE4600010), "pld r3,16(0),1: pc-relative load", True),
    ((0x0413FFFF, 0xF460FFF8), "pstd r3,-8(0),1: pc-relative store", True),
    ((0x06100000, 0x80600020), "plwz r3,32(0),1", True),
    ((0x06100000, 0x38601000), "pla r3,0x1000", True),
    ((0x06100001, 0x3860F000), "pla r3,0x1f000", True),
    ((0x04000000, 0xE4640008), "pld r3,8(r4): not pc-relative", True),
    ((0x06000000, 0x38640005), "paddi r3,r4,5", True),
    ((0x07000000, 0x00000000), "pnop", True),
    # load-reserve / store-conditional
    ((0x7D201828,), "lwarx r9,0,r3: boost only", False),
    ((0x7D2018A8,), "ldarx r9,0,r3: boost only", True),
    ((0x7CA0192D,), "stwcx. r5,0,r3: refused", False),
    ((0x7CA019AD,), "stdcx. r5,0,r3: refused", True),
    # LR / CTR / CR moves
    ((0x7C0802A6,), "mflr r0", False),
    ((0x7C0803A6,), "mtlr r0", False),
    ((0x7D2903A6,), "mtctr r9", False),
    ((0x7C0902A6,), "mfctr r0", False),
    ((0x7C600026,), "mfcr r3", False),
    ((0x7C780026,), "mfocrf r3,0x80", False),
    ((0x7C6C42E6,), "mftb r3 (volatile)", False),
    # arithmetic, logic, compares (emulated)
    ((0x60000000,), "nop", False),
    ((0x38600001,), "li r3,1", False),
    ((0x3821FFE0,), "addi r1,r1,-32", False),
    ((0x3C620001,), "addis r3,r2,1", False),
    ((0x3C60FFFF,), "lis r3,-1", False),
    ((0x60630001,), "ori r3,r3,1", False),
    ((0x64630001,), "oris r3,r3,1", False),
    ((0x68630005,), "xori r3,r3,5", False),
    ((0x70630001,), "andi. r3,r3,1", False),
    ((0x74638000,), "andis. r3,r3,0x8000", False),
    ((0x7C832378,), "mr r3,r4", False),
    ((0x7C832379,), "mr. r3,r4", False),
    ((0x7C832838,), "and r3,r4,r5", False),
    ((0x7C832A78,), "xor r3,r4,r5", False),
    ((0x7C8328F8,), "nor r3,r4,r5", False),
    ((0x7C642A14,), "add r3,r4,r5", False),
    ((0x7C642A15,), "add. r3,r4,r5", False),
    ((0x7C642850,), "subf r3,r4,r5", False),
    ((0x7C642E14,), "addo r3,r4,r5: not emulated", False),
    ((0x7C6400D0,), "neg r3,r4", False),
    ((0x7C8307B4,), "extsw r3,r4", True),
    ((0x7C830774,), "extsb r3,r4", False),
    ((0x7C830735,), "extsh. r3,r4", False),
    ((0x2C030000,), "cmpwi r3,0", False),
    ((0x2FA30005,), "cmpdi cr7,r3,5", True),
    ((0x28030000,), "cmplwi r3,0", False),
    ((0x7CA32040,), "cmpld cr1,r3,r4", True),
    ((0x7C032000,), "cmpw r3,r4", False),
    ((0x7F832040,), "cmplw cr7,r3,r4", False),
    ((0x5483103A,), "slwi r3,r4,2 (rlwinm)", False),
    ((0x5483F87F,), "rlwinm. r3,r4,31,1,31", False),
    ((0x5483E13E,), "rlwinm r3,r4,28,4,31", False),
    ((0x5483083C,), "rlwinm r3,r4,1,0,30 (mb > me wraps? no)", False),
    ((0x548307FE,), "rlwinm r3,r4,0,31,31", False),
    ((0x54830FFE,), "rlwinm r3,r4,1,31,31", False),
    ((0x5483F0BE,), "rlwinm r3,r4,30,2,31", False),
    ((0x54831FC6,), "rlwinm r3,r4,3,31,3 (wrapping mask)", False),
    ((0x78830020,), "clrldi r3,r4,32", True),
    ((0x78831F24,), "sldi r3,r4,3", True),
    ((0x78830FC2,), "rldicl r3,r4,33,31", True),
    ((0x78830021,), "clrldi. r3,r4,32", True),
    # loads (emulated) and stores (boosted)
    ((0x80640004,), "lwz r3,4(r4)", False),
    ((0x84640004,), "lwzu r3,4(r4)", False),
    ((0x88640004,), "lbz r3,4(r4)", False),
    ((0xA0640004,), "lhz r3,4(r4)", False),
    ((0xA864FFFE,), "lha r3,-2(r4)", False),
    ((0x80600010,), "lwz r3,16(0)", False),
    ((0xE8610008,), "ld r3,8(r1)", True),
    ((0xE8610009,), "ldu r3,8(r1)", True),
    ((0xE861000A,), "lwa r3,8(r1)", True),
    ((0xF8610008,), "std r3,8(r1)", True),
    ((0xF821FFE1,), "stdu r1,-32(r1)", True),
    ((0x90640004,), "stw r3,4(r4)", False),
    ((0x9421FFF0,), "stwu r1,-16(r1)", False),
    ((0x98640004,), "stb r3,4(r4)", False),
    ((0x7C64282E,), "lwzx r3,r4,r5", False),
    ((0xC8240008,), "lfd f1,8(r4)", False),
    ((0xD8240008,), "stfd f1,8(r4)", False),
    ((0xFC22182A,), "fadd f1,f2,f3", False),
    # barriers and cache
    ((0x7C2004AC,), "lwsync", False),
    ((0x7C0004AC,), "sync", False),
    ((0x4C00012C,), "isync", False),
    ((0x7C00186C,), "dcbst 0,r3", False),
    # refused
    ((0x7FE00008,), "tw 31,0,0: the breakpoint itself", False),
    ((0x0C030000,), "twi 0,r3,0 (never traps): refused", False),
    ((0x7C000088,), "td 0,r0,r0: refused", True),
    ((0x44000002,), "sc: refused", False),
    ((0x7C6000A6,), "mfmsr r3: privileged", False),
    ((0x7C000164,), "mtmsrd r0: privileged", True),
    ((0x4C000024,), "rfid: refused", True),
    ((0x4C0002E4,), "stop: refused", True),
    ((0x7C7A02A6,), "mfspr r3,SRR0 (26): privileged SPR", False),
]


def cases(byteorder: str, word_bits: int) -> list[tuple[bytes, str]]:
    out = []
    for words, note, only64 in CASES:
        if only64 and word_bits != 64:
            continue
        out.append((b"".join(w.to_bytes(4, byteorder) for w in words), note))
    return out


# primary opcodes weighted like compiled code: loads/stores, arithmetic, branches, 31
COMMON = (14, 15, 24, 32, 36, 58, 62, 31, 31, 31, 31, 16, 18, 19, 21, 30, 11, 10, 28,
          34, 38, 40, 44, 48, 50, 54, 59, 63, 4, 60, 61)


def random_encoding(rng: random.Random, byteorder: str) -> bytes:
    if rng.random() < 0.08:
        ptype = rng.choice((0, 2))
        prefix = 0x04000000 | ptype << 24 | (rng.random() < 0.5) << 20 | rng.getrandbits(18)
        sop = rng.choice((14, 32, 34, 36, 38, 40, 42, 44, 48, 50) if ptype == 2
                         else (41, 56, 57, 60, 61))
        r = prefix >> 20 & 1
        suffix = sop << 26 | rng.getrandbits(5) << 21 | (0 if r else rng.getrandbits(5)) << 16 \
            | rng.getrandbits(16)
        return prefix.to_bytes(4, byteorder) + suffix.to_bytes(4, byteorder)
    word = rng.choice(COMMON) << 26 | rng.getrandbits(26)
    return word.to_bytes(4, byteorder) + rng.randbytes(4)
