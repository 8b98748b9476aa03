"""Instruction fields, read from the bits (the ISA numbers bits 0..31 from the left).

Capstone's PowerPC details are incomplete (branch groups, a sign-extension quirk in
branch targets, no ISA 3.1 prefixed instructions), so every field that decides how an
instruction may run away from its address is taken from the word itself.
"""

from __future__ import annotations


def bits(word: int, start: int, end: int) -> int:
    """Bits ``start``..``end`` (inclusive, ISA numbering: bit 0 is the most significant)."""
    return (word >> (31 - end)) & ((1 << (end - start + 1)) - 1)


def sext(value: int, nbits: int) -> int:
    value &= (1 << nbits) - 1
    return value - (1 << nbits) if value >> (nbits - 1) else value


def opcode(word: int) -> int:
    return word >> 26


def xo10(word: int) -> int:
    """Extended opcode of X/XL/XFX forms (bits 21..30)."""
    return (word >> 1) & 0x3FF


def rt(word: int) -> int:
    return bits(word, 6, 10)


def ra(word: int) -> int:
    return bits(word, 11, 15)


def rb(word: int) -> int:
    return bits(word, 16, 20)


def spr(word: int) -> int:
    """The SPR number of mfspr/mtspr (its two halves are swapped in the encoding)."""
    return bits(word, 16, 20) << 5 | bits(word, 11, 15)


def li(word: int) -> int:
    """I-form displacement (b): 24 bits, word aligned, signed."""
    return sext(word & 0x03FFFFFC, 26)


def bd(word: int) -> int:
    """B-form displacement (bc): 14 bits, word aligned, signed."""
    return sext(word & 0xFFFC, 16)


def aa(word: int) -> bool:
    return bool(word & 2)


def lk(word: int) -> bool:
    return bool(word & 1)


def addpcis_d(word: int) -> int:
    """addpcis: D = d0 || d1 || d2 (16 bits, signed)."""
    d0 = bits(word, 16, 25)
    d1 = bits(word, 11, 15)
    d2 = word & 1
    return sext(d0 << 6 | d1 << 1 | d2, 16)


def encode_b(displacement: int, link: bool = False) -> int | None:
    """``b``/``bl`` to a relative displacement, or None when it does not reach."""
    if displacement & 3 or not -(1 << 25) <= displacement < (1 << 25):
        return None
    return 0x48000000 | (displacement & 0x03FFFFFC) | int(link)
