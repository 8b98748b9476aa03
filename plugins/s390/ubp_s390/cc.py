"""The condition code and the branch conditions that read it (PSW bits 18-19)."""

from __future__ import annotations

CC_SHIFT = 44  # PSW bits 18-19 of the 64-bit mask, counted from the left
CC_MASK = 3 << CC_SHIFT
FIXED_OVERFLOW_MASK = 1 << 43  # PSW bit 20: fixed-point overflow raises an exception


def get(pswm: int) -> int:
    return (pswm >> CC_SHIFT) & 3


def put(pswm: int, cc: int) -> int:
    return (pswm & ~CC_MASK) | (cc << CC_SHIFT)


def taken(mask: int, cc: int) -> bool:
    """Branch-on-condition: mask bit 8 >> cc selects condition code cc."""
    return bool(mask & (8 >> cc))


def compare(a: int, b: int) -> int:
    """0 equal, 1 first operand low, 2 first operand high (values already signed or not)."""
    return 0 if a == b else (1 if a < b else 2)


def sign(value: int) -> int:
    """0 zero, 1 negative, 2 positive (a signed value)."""
    return 0 if value == 0 else (1 if value < 0 else 2)


def to_signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value
