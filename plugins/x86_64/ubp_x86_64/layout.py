"""Where the fields of an x86-64 instruction sit: prefixes, REX/VEX/EVEX, opcode, ModRM.

Capstone gives the length and the text; the fields that decide correctness (is there a
ModRM, is the operand rip-relative, where is its displacement, which register-extension
bits must change when the operand is rewritten) are read from the bytes here, the way
the Linux instruction decoder does, so no decision depends on a disassembler's detail
tables.
"""

from __future__ import annotations

from dataclasses import dataclass

LEGACY_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67})
SEGMENT_PREFIXES = frozenset({0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65})


def _bits(spec: str) -> frozenset[int]:
    out: set[int] = set()
    for part in spec.split():
        lo, _, hi = part.partition("-")
        out.update(range(int(lo, 16), int(hi or lo, 16) + 1))
    return frozenset(out)


# One-byte opcodes that take a ModRM byte (64-bit mode).
MODRM_1 = _bits(
    "00-03 08-0b 10-13 18-1b 20-23 28-2b 30-33 38-3b 63 69 6b 80-8f c0 c1 c4-c7 d0-d3 "
    "d8-df f6 f7 fe ff")
# Two-byte (0f xx) opcodes that take a ModRM byte.
MODRM_2 = _bits(
    "00-03 0d 0f 10-1f 20-23 28-2f 38 3a 40-4f 50-76 78-7f 90-9f a3-a5 ab-af b0-b7 b8-bf "
    "c0-c7 d0-ff")


@dataclass(slots=True)
class Layout:
    """Byte offsets of an instruction's fields (None where a field is absent)."""

    length: int
    prefixes: bytes  # legacy prefixes, in order
    rex: int  # 0 when absent
    rex_off: int | None
    vex: str | None  # "vex2", "vex3", "evex", "xop" or None
    vex_off: int | None
    map: int  # 0: one-byte, 1: 0f, 2: 0f38, 3: 0f3a (VEX/EVEX mmm); 8-10: XOP
    opcode: int
    opcode_off: int
    modrm_off: int | None
    modrm: int | None
    sib_off: int | None
    disp_off: int | None
    disp_size: int

    @property
    def mod(self) -> int | None:
        return None if self.modrm is None else self.modrm >> 6

    @property
    def reg(self) -> int | None:
        return None if self.modrm is None else (self.modrm >> 3) & 7

    @property
    def rm(self) -> int | None:
        return None if self.modrm is None else self.modrm & 7

    @property
    def rip_relative(self) -> bool:
        return self.modrm is not None and self.modrm >> 6 == 0 and self.modrm & 7 == 5

    @property
    def memory_operand(self) -> bool:
        return self.modrm is not None and self.modrm >> 6 != 3

    @property
    def rex_w(self) -> bool:
        if self.vex in ("vex3", "xop"):
            return False  # VEX.W is an opcode extension, not an operand size
        return bool(self.rex & 8)

    @property
    def rex_b(self) -> bool:
        return bool(self.rex & 1)

    def has(self, prefix: int) -> bool:
        return prefix in self.prefixes


class LayoutError(ValueError):
    pass


def parse(code: bytes, length: int) -> Layout:
    """Fields of the instruction occupying ``code[:length]`` (length from a decoder)."""
    i = 0
    prefixes = bytearray()
    rex, rex_off = 0, None
    while i < length:
        b = code[i]
        if b in LEGACY_PREFIXES:
            prefixes.append(b)
            rex, rex_off = 0, None  # a REX not right before the opcode is ignored
        elif 0x40 <= b <= 0x4F:
            rex, rex_off = b, i
        else:
            break
        i += 1
    if i >= length:
        raise LayoutError("prefixes only")
    vex, vex_off, op_map = None, None, 0
    b0 = code[i]
    if b0 == 0xC5 and i + 2 < length:
        vex, vex_off, op_map = "vex2", i, 1
        i += 2
    elif b0 == 0xC4 and i + 3 < length:
        vex, vex_off, op_map = "vex3", i, code[i + 1] & 0x1F
        i += 3
    elif b0 == 0x62 and i + 4 < length:
        vex, vex_off, op_map = "evex", i, code[i + 1] & 0x07
        i += 4
    elif b0 == 0x8F and i + 3 < length and (code[i + 1] & 0x1F) >= 8:
        vex, vex_off, op_map = "xop", i, code[i + 1] & 0x1F
        i += 3
    elif b0 == 0x0F:
        i += 1
        if i < length and code[i] in (0x38, 0x3A):
            op_map = 2 if code[i] == 0x38 else 3
            i += 1
        else:
            op_map = 1
    if i >= length:
        raise LayoutError("no opcode byte")
    opcode_off = i
    opcode = code[i]
    i += 1
    if vex is not None:
        has_modrm = not (op_map == 1 and opcode == 0x77)  # vzeroupper / vzeroall
    elif op_map == 0:
        has_modrm = opcode in MODRM_1
    elif op_map == 1:
        has_modrm = opcode in MODRM_2 or opcode == 0x0F  # 3DNow! 0f 0f /r ib
    else:
        has_modrm = True
    modrm_off = modrm = sib_off = disp_off = None
    disp_size = 0
    if has_modrm:
        if i >= length:
            raise LayoutError("ModRM missing")
        modrm_off, modrm = i, code[i]
        i += 1
        mod, rm = modrm >> 6, modrm & 7
        if op_map == 1 and vex is None and 0x20 <= opcode <= 0x23:
            # mov to/from control/debug registers: always the register form
            mod, modrm = 3, modrm | 0xC0
        if mod != 3:
            if rm == 4:
                if i >= length:
                    raise LayoutError("SIB missing")
                sib_off = i
                base = code[i] & 7
                i += 1
                if mod == 0 and base == 5:
                    disp_size = 4
            elif mod == 0 and rm == 5:
                disp_size = 4
            if mod == 1:
                disp_size = 1
            elif mod == 2:
                disp_size = 4
            if disp_size:
                disp_off = i
                i += disp_size
    if i > length:
        raise LayoutError("instruction shorter than its fields")
    return Layout(length, bytes(prefixes), rex, rex_off, vex, vex_off, op_map, opcode,
                  opcode_off, modrm_off, modrm, sib_off, disp_off, disp_size)
