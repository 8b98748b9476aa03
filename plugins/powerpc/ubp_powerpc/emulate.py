"""Emulation of the PowerPC instructions that dominate real code.

The set is what ``ubp analyze`` counts most often in the three Debian libcs: branches
of every form, the nop, immediate and register arithmetic/logic, compares, moves to and
from LR/CTR, rotates, and D/DS-form loads.  Only encodings whose whole
effect is computed here get a key; when one execution cannot be done faithfully (memory
that cannot be read) None is returned and the engine single-steps it instead.
"""

from __future__ import annotations

from ubp_core.errors import MemoryFault
from ubp_core.types import Analysis, Effect, ReadMemory, Regs

from .encoding import bits, opcode, ra, rb, rt, sext, spr, xo10

SO, OV, CA = 0x80000000, 0x40000000, 0x20000000

# D-form loads and stores: primary opcode -> (size, load?, update?, sign-extend?)
D_FORM = {32: (4, True, False, False), 33: (4, True, True, False),
          34: (1, True, False, False), 35: (1, True, True, False),
          36: (4, False, False, False), 37: (4, False, True, False),
          38: (1, False, False, False), 39: (1, False, True, False),
          40: (2, True, False, False), 41: (2, True, True, False),
          42: (2, True, False, True), 43: (2, True, True, True),
          44: (2, False, False, False), 45: (2, False, True, False)}
# DS-form loads (primary 58): low two bits -> (size, update?, sign-extend?)
DS_LOAD = {0: (8, False, False), 1: (8, True, False), 2: (4, False, True)}
# X-form logical ops (primary 31): xo -> function of (rs, rb, mask)
LOGICAL = {
    28: lambda s, b, m: s & b, 60: lambda s, b, m: s & ~b & m, 124: lambda s, b, m: ~(s | b) & m,
    284: lambda s, b, m: ~(s ^ b) & m, 316: lambda s, b, m: s ^ b, 412: lambda s, b, m: (s | ~b) & m,
    444: lambda s, b, m: s | b, 476: lambda s, b, m: ~(s & b) & m,
}


def key(w: int, word_bits: int) -> str | None:
    """The emulation routine for word ``w``, or None when it is not emulated."""
    op = opcode(w)
    if w == 0x60000000:
        return "nop"
    if op in (14, 15):
        return "addi"
    if op in (24, 25, 26, 27, 28, 29):
        return "logical-imm"
    if op in (10, 11):
        if bits(w, 9, 9) or (word_bits == 32 and bits(w, 10, 10)):
            return None
        return "cmpi"
    if op in D_FORM:
        _, load, update, _ = D_FORM[op]
        if not load:
            # a store's page may be read-only for the program while a tracer can write
            # it: only the CPU knows whether it faults, so stores are boosted instead
            return None
        if update and (ra(w) == 0 or ra(w) == rt(w)):
            return None  # invalid forms
        return "d-form"
    if word_bits == 64 and op == 58 and (w & 3) in DS_LOAD:
        _, update, _ = DS_LOAD[w & 3]
        if update and (ra(w) == 0 or ra(w) == rt(w)):
            return None
        return "ds-load"
    if op == 21:
        return "rlwinm"
    if word_bits == 64 and op == 30 and bits(w, 27, 29) in (0, 1):
        return "rldic-lr"
    if op == 31:
        xo = xo10(w)
        if xo in LOGICAL:
            return "logical"
        if xo in (0, 32) and not bits(w, 9, 9) and not (word_bits == 32 and bits(w, 10, 10)):
            return "cmp"
        if (w >> 1) & 0x1FF in (266, 40) and not bits(w, 21, 21):  # add, subf; OE=0
            return "add"
        if (w >> 1) & 0x1FF == 104 and not bits(w, 21, 21) and rb(w) == 0:
            return "neg"
        if xo in (954, 922) or (word_bits == 64 and xo == 986):
            return "exts" if rb(w) == 0 else None
        if xo in (MFSPR, MTSPR) and spr(w) in (8, 9):
            return "spr"
        if xo == 19 and not bits(w, 11, 11):
            return "mfcr"
    return None


MFSPR, MTSPR = 339, 467


class Context:
    """The mode an emulation runs in (register width, byte order)."""

    def __init__(self, word_bits: int, byteorder: str) -> None:
        self.bits = word_bits
        self.mask = (1 << word_bits) - 1
        self.order = byteorder

    def signed(self, v: int) -> int:
        return sext(v, self.bits)


def condition(bo: int, bi: int, regs: Regs, ctx: Context) -> tuple[bool, int | None]:
    """(taken, new CTR or None) of a conditional branch before it executes."""
    ctr = None
    ctr_ok = True
    if not bo & 0b00100:
        ctr = (regs["ctr"] - 1) & ctx.mask
        ctr_ok = (ctr != 0) != bool(bo & 0b00010)
    cond_ok = bool(bo & 0b10000) or (bool(regs["cr"] >> (31 - bi) & 1) == bool(bo & 0b01000))
    return ctr_ok and cond_ok, ctr


def _cr_field(value: int, ctx: Context, xer: int, width: int | None = None) -> int:
    """LT/GT/EQ/SO of ``value`` compared with zero (record forms)."""
    v = sext(value, width or ctx.bits)
    c = 0b1000 if v < 0 else 0b0100 if v > 0 else 0b0010
    return c | (1 if xer & SO else 0)


def _set_field(cr: int, field: int, value: int) -> int:
    shift = 28 - 4 * field
    return (cr & ~(0xF << shift) & 0xFFFFFFFF) | (value << shift)


def _gpr(regs: Regs, n: int) -> int:
    return regs[f"r{n}"]


def _load(read: ReadMemory, ea: int, size: int, ctx: Context) -> int | None:
    try:
        return int.from_bytes(read(ea, size), ctx.order)
    except MemoryFault:
        return None


def emulate(analysis: Analysis, regs: Regs, read: ReadMemory, ctx: Context) -> Effect | None:
    plan = analysis.plan
    a = analysis.insn.address
    nxt = (a + analysis.insn.length) & ctx.mask
    op = plan.op
    out: dict[str, int] = {}
    if op in ("b", "bc", "bclr", "bcctr"):
        taken, ctr = condition(plan.bo, plan.bi, regs, ctx)
        if ctr is not None:
            out["ctr"] = ctr
        if not taken:
            target = nxt
        elif op == "bclr":
            target = regs["lr"] & ~3
        elif op == "bcctr":
            target = regs["ctr"] & ~3
        else:
            target = plan.target
        if plan.link:
            out["lr"] = nxt
        out["pc"] = target & ctx.mask
        return Effect(out)
    if op in ("addpcis", "pla"):
        return Effect({f"r{plan.rt}": plan.value, "pc": nxt})
    fn = ROUTINES.get(plan.emu or "")
    if fn is None:
        return None
    w = plan.words[0]
    mem: list[tuple[int, bytes]] = []
    if not fn(w, regs, read, ctx, out, mem):
        return None
    out["pc"] = nxt
    return Effect(out, mem)


# --------------------------------------------------------------------------- routines
# Each takes (word, regs, read, ctx, out regs, out memory) and returns False to decline.

def _nop(w, regs, read, ctx, out, mem) -> bool:
    return True


def _addi(w, regs, read, ctx, out, mem) -> bool:
    imm = sext(w & 0xFFFF, 16)
    if opcode(w) == 15:
        imm <<= 16
    base = _gpr(regs, ra(w)) if ra(w) else 0
    out[f"r{rt(w)}"] = (base + imm) & ctx.mask
    return True


def _logical_imm(w, regs, read, ctx, out, mem) -> bool:
    op = opcode(w)
    imm = w & 0xFFFF
    if op in (25, 27, 29):
        imm <<= 16
    s = _gpr(regs, rt(w))
    if op in (24, 25):
        v = s | imm
    elif op in (26, 27):
        v = s ^ imm
    else:
        v = s & imm
    out[f"r{ra(w)}"] = v
    if op in (28, 29):  # andi. andis. always record
        out["cr"] = _set_field(regs["cr"], 0, _cr_field(v, ctx, regs["xer"]))
    return True


def _compare(a_: int, b_: int, signed: bool, width: int, xer: int) -> int:
    if signed:
        a_, b_ = sext(a_, width), sext(b_, width)
    else:
        m = (1 << width) - 1
        a_, b_ = a_ & m, b_ & m
    c = 0b1000 if a_ < b_ else 0b0100 if a_ > b_ else 0b0010
    return c | (1 if xer & SO else 0)


def _cmpi(w, regs, read, ctx, out, mem) -> bool:
    width = 64 if bits(w, 10, 10) else 32
    signed = opcode(w) == 11
    imm = sext(w & 0xFFFF, 16) if signed else w & 0xFFFF
    c = _compare(_gpr(regs, ra(w)), imm & ((1 << 64) - 1), signed, width, regs["xer"])
    out["cr"] = _set_field(regs["cr"], bits(w, 6, 8), c)
    return True


def _cmp(w, regs, read, ctx, out, mem) -> bool:
    width = 64 if bits(w, 10, 10) else 32
    signed = xo10(w) == 0
    c = _compare(_gpr(regs, ra(w)), _gpr(regs, rb(w)), signed, width, regs["xer"])
    out["cr"] = _set_field(regs["cr"], bits(w, 6, 8), c)
    return True


def _record(w, v, regs, ctx, out) -> None:
    if w & 1:
        out["cr"] = _set_field(regs["cr"], 0, _cr_field(v, ctx, regs["xer"]))


def _logical(w, regs, read, ctx, out, mem) -> bool:
    v = LOGICAL[xo10(w)](_gpr(regs, rt(w)), _gpr(regs, rb(w)), ctx.mask) & ctx.mask
    out[f"r{ra(w)}"] = v
    _record(w, v, regs, ctx, out)
    return True


def _add(w, regs, read, ctx, out, mem) -> bool:
    x, y = _gpr(regs, ra(w)), _gpr(regs, rb(w))
    v = (x + y if (w >> 1) & 0x1FF == 266 else y - x) & ctx.mask
    out[f"r{rt(w)}"] = v
    _record(w, v, regs, ctx, out)
    return True


def _neg(w, regs, read, ctx, out, mem) -> bool:
    v = -_gpr(regs, ra(w)) & ctx.mask
    out[f"r{rt(w)}"] = v
    _record(w, v, regs, ctx, out)
    return True


def _exts(w, regs, read, ctx, out, mem) -> bool:
    width = {954: 8, 922: 16, 986: 32}[xo10(w)]
    v = sext(_gpr(regs, rt(w)), width) & ctx.mask
    out[f"r{ra(w)}"] = v
    _record(w, v, regs, ctx, out)
    return True


def _spr(w, regs, read, ctx, out, mem) -> bool:
    name = "lr" if spr(w) == 8 else "ctr"
    if xo10(w) == MFSPR:
        out[f"r{rt(w)}"] = regs[name]
    else:
        out[name] = _gpr(regs, rt(w))
    return True


def _mfcr(w, regs, read, ctx, out, mem) -> bool:
    out[f"r{rt(w)}"] = regs["cr"] & 0xFFFFFFFF
    return True


def _rotl32(v: int, n: int) -> int:
    v &= 0xFFFFFFFF
    v = ((v << n) | (v >> (32 - n))) & 0xFFFFFFFF if n else v
    return v | (v << 32)  # ROTL32 replicates the word in both halves


def _mask64(mb: int, me: int) -> int:
    """MASK(mb, me) in 64-bit ISA numbering (bit 0 is the most significant)."""
    if mb <= me:
        return ((1 << (64 - mb)) - 1) & ~((1 << (63 - me)) - 1)
    return (((1 << (64 - mb)) - 1) | ~((1 << (63 - me)) - 1)) & ((1 << 64) - 1)


def _rlwinm(w, regs, read, ctx, out, mem) -> bool:
    sh, mb, me = bits(w, 16, 20), bits(w, 21, 25), bits(w, 26, 30)
    v = _rotl32(_gpr(regs, rt(w)), sh) & _mask64(mb + 32, me + 32) & ctx.mask
    out[f"r{ra(w)}"] = v
    _record(w, v, regs, ctx, out)
    return True


def _rldic_lr(w, regs, read, ctx, out, mem) -> bool:
    sh = bits(w, 16, 20) | bits(w, 30, 30) << 5
    m6 = bits(w, 21, 26)
    m = (m6 >> 1) | (m6 & 1) << 5  # mb/me is stored with its low bit first
    s = _gpr(regs, rt(w))
    rot = ((s << sh) | (s >> (64 - sh))) & ((1 << 64) - 1) if sh else s
    mask = _mask64(m, 63) if bits(w, 27, 29) == 0 else _mask64(0, m)
    v = rot & mask
    out[f"r{ra(w)}"] = v
    _record(w, v, regs, ctx, out)
    return True


def _load_into(w, regs, read, ctx, out, size, update, signed, disp) -> bool:
    base = _gpr(regs, ra(w)) if ra(w) else 0
    ea = (base + disp) & ctx.mask
    v = _load(read, ea, size, ctx)
    if v is None:
        return False  # the step raises the fault for real
    if signed:
        v = sext(v, 8 * size)
    out[f"r{rt(w)}"] = v & ctx.mask
    if update:
        out[f"r{ra(w)}"] = ea
    return True


def _d_form(w, regs, read, ctx, out, mem) -> bool:
    size, _, update, signed = D_FORM[opcode(w)]
    return _load_into(w, regs, read, ctx, out, size, update, signed, sext(w & 0xFFFF, 16))


def _ds_load(w, regs, read, ctx, out, mem) -> bool:
    size, update, signed = DS_LOAD[w & 3]
    return _load_into(w, regs, read, ctx, out, size, update, signed, sext(w & 0xFFFC, 16))


ROUTINES = {
    "nop": _nop, "addi": _addi, "logical-imm": _logical_imm, "cmpi": _cmpi, "cmp": _cmp,
    "logical": _logical, "add": _add, "neg": _neg, "exts": _exts, "spr": _spr,
    "mfcr": _mfcr, "rlwinm": _rlwinm, "rldic-lr": _rldic_lr, "d-form": _d_form,
    "ds-load": _ds_load,
}
