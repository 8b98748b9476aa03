"""ISA 3.1 prefixed instructions (primary opcode 1): 8 bytes, decoded from the bits.

Capstone 5 does not know them.  What matters for running one away from its address is
the R bit of the 8LS/MLS prefix forms: with R=1 the effective address (or, for paddi,
the result) is the instruction's own address + a signed 34-bit displacement.
"""

from __future__ import annotations

from dataclasses import dataclass

from .encoding import bits, opcode, sext

# MLS (prefix type 2) suffix opcodes: D-form instructions with a 34-bit displacement
MLS = {14: "paddi", 32: "plwz", 34: "plbz", 36: "pstw", 38: "pstb", 40: "plhz",
       42: "plha", 44: "psth", 48: "plfs", 50: "plfd", 52: "pstfs", 54: "pstfd"}
# 8LS (prefix type 0) suffix opcodes
EIGHT_LS = {41: "plwa", 42: "plxsd", 43: "plxssp", 46: "pstxsd", 47: "pstxssp",
            50: "plxv", 51: "plxv", 54: "pstxv", 55: "pstxv", 56: "plq", 57: "pld",
            58: "plxvp", 60: "pstq", 61: "pstd", 62: "pstxvp"}
# 8RR (type 1) and MMIRR (type 3) suffixes: register-only VSX/MMA operations
EIGHT_RR = {32: "xxsplti32dx", 34: "xxpermx"}
MMIRR = {59: "pmxvger"}
STORES = {"pstw", "pstb", "psth", "pstfs", "pstfd", "pstxsd", "pstxssp", "pstxv", "pstq",
          "pstd", "pstxvp"}
FPR_FORMS = {"plfs", "plfd", "pstfs", "pstfd"}
VSR_FORMS = {"plxsd", "plxssp", "pstxsd", "pstxssp", "plxv", "pstxv", "plxvp", "pstxvp"}
PNOP_PREFIX = 0x07000000


@dataclass(frozen=True, slots=True)
class Prefixed:
    name: str
    form: str  # "mls", "8ls", "8rr", "mmirr", "pnop"
    rt: int
    ra: int
    pcrel: bool
    d34: int

    @property
    def store(self) -> bool:
        return self.name in STORES

    def text(self) -> str:
        if self.form == "pnop":
            return "pnop"
        if self.form in ("8rr", "mmirr"):
            return self.name
        reg = ("f" if self.name in FPR_FORMS else "vs" if self.name in VSR_FORMS else "r")
        if self.name == "paddi":
            if self.pcrel:
                return f"pla r{self.rt}, {self.d34:#x}"
            return f"paddi r{self.rt}, r{self.ra}, {self.d34:#x}"
        base = "0" if self.ra == 0 else f"r{self.ra}"
        return f"{self.name} {reg}{self.rt}, {self.d34:#x}({base}){', 1' if self.pcrel else ''}"


def decode(prefix: int, suffix: int) -> Prefixed | None:
    """The prefixed instruction ``prefix``/``suffix``, or None for an invalid pair."""
    if opcode(prefix) != 1:
        return None
    ptype = bits(prefix, 6, 7)
    st = bits(prefix, 8, 8)
    r = bool(bits(prefix, 11, 11))
    d34 = sext(bits(prefix, 14, 31) << 16 | (suffix & 0xFFFF), 34)
    sop = opcode(suffix)
    rt_, ra_ = bits(suffix, 6, 10), bits(suffix, 11, 15)
    if prefix == PNOP_PREFIX:
        return Prefixed("pnop", "pnop", 0, 0, False, 0) if suffix == 0 else None
    if ptype in (0, 2):
        table = EIGHT_LS if ptype == 0 else MLS
        if st != 0 or sop not in table or bits(prefix, 9, 10) or bits(prefix, 12, 13):
            return None
        name = table[sop]
        if r and ra_ != 0:
            return None  # invalid form: R=1 needs RA=0
        if name in ("plxv", "pstxv"):
            rt_ |= (sop & 1) << 5
        return Prefixed(name, "8ls" if ptype == 0 else "mls", rt_, ra_, r, d34)
    if ptype == 1 and sop in EIGHT_RR:
        return Prefixed(EIGHT_RR[sop], "8rr", rt_, ra_, False, 0)
    if ptype == 3 and sop in MMIRR:
        return Prefixed(MMIRR[sop], "mmirr", rt_, ra_, False, 0)
    return None


def with_displacement(prefix: int, suffix: int, d34: int) -> tuple[int, int] | None:
    """The pair with its 34-bit displacement replaced (None when it does not fit)."""
    if not -(1 << 33) <= d34 < (1 << 33):
        return None
    d34 &= (1 << 34) - 1
    return (prefix & ~0x3FFFF) | (d34 >> 16), (suffix & ~0xFFFF) | (d34 & 0xFFFF)
