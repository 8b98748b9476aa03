"""Instruction fields of z/Architecture, read from the bits.

Every decision of the plugin (is it a branch, where is its target, which register
receives a link address, where is a relative-long operand) is made from these fields,
never from capstone's groups or operand tables, which are incomplete for SystemZ.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1


def insn_length(first_byte: int) -> int:
    """2, 4 or 6 bytes, from the top two bits of the first byte."""
    return (2, 4, 4, 6)[first_byte >> 6]


def signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def key(raw: bytes) -> str:
    """A stable opcode key: ``"07"``, ``"a7.4"``, ``"c0.5"``, ``"b2.22"``, ``"e3..04"``.

    One byte for most RR/RX/RS/SI/SS formats, first byte and low nibble of the second
    for RI/RIL, two bytes for the b2/b3/b9/e5/01 families, first and last byte for
    the six-byte e3/eb/ec/ed/e7 families.
    """
    op = raw[0]
    if op in (0xA5, 0xA7, 0xC0, 0xC2, 0xC4, 0xC6, 0xC8, 0xCC):
        return f"{op:02x}.{raw[1] & 0xF:x}"
    if op in (0x01, 0xB2, 0xB3, 0xB9, 0xE5, 0xA4, 0xA6, 0xB6, 0xB7, 0xE4):
        return f"{op:02x}.{raw[1]:02x}"
    if op in (0xE3, 0xEB, 0xEC, 0xED, 0xE7, 0xE6, 0xC5, 0xC7):
        if op in (0xC5, 0xC7):
            return f"{op:02x}"
        return f"{op:02x}..{raw[5]:02x}"
    return f"{op:02x}"


def r1(raw: bytes) -> int:
    return raw[1] >> 4


def r2(raw: bytes) -> int:
    return raw[1] & 0xF


def x2(raw: bytes) -> int:
    """The index register of RX/RXY formats (same nibble as r2 of RR)."""
    return raw[1] & 0xF


def b2(raw: bytes) -> int:
    return raw[2] >> 4


def d12(raw: bytes) -> int:
    """Unsigned 12-bit displacement of RX/RS/SI formats (bytes 2-3)."""
    return ((raw[2] & 0xF) << 8) | raw[3]


def d20(raw: bytes) -> int:
    """Signed 20-bit displacement of RXY/RSY/SIY formats: DL (12 bits) then DH (8)."""
    low = ((raw[2] & 0xF) << 8) | raw[3]
    return signed((raw[4] << 12) | low, 20)


def i16(raw: bytes, at: int = 2) -> int:
    return signed(int.from_bytes(raw[at:at + 2], "big"), 16)


def i32(raw: bytes, at: int = 2) -> int:
    return signed(int.from_bytes(raw[at:at + 4], "big"), 32)


def address(regs: dict[str, int] | object, base: int, index: int, disp: int) -> int:
    """Effective address in 64-bit mode: register 0 as base or index means none."""
    ea = disp
    if base:
        ea += regs[f"r{base}"]  # type: ignore[index]
    if index:
        ea += regs[f"r{index}"]  # type: ignore[index]
    return ea & MASK64
