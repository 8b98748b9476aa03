"""Emulation of the branches, relative-long and entry/exit instructions of s390x code.

Only instructions whose whole architectural effect is computed here are emulated.
When one execution cannot be reproduced exactly (memory that does not read, an operand
that is not aligned as the instruction demands, an overflow the program asked to trap)
None is returned and the engine steps the instruction, so the CPU raises what it raises.
Stores are emulated only through the stack pointer: a tracer's write succeeds on a
read-only page where the program's own store faults, and only the stack is known to be
writable.
"""

from __future__ import annotations

from collections.abc import Callable

from ubp_core.errors import MemoryFault
from ubp_core.types import Analysis, Effect, ReadMemory, Regs

from . import cc
from . import fields as f
from .analysis import Plan

MASK64 = f.MASK64
MASK32 = 0xFFFFFFFF
SP = 15

# relative-long loads and compares: (bytes, signed operand, width of the register part)
RL_LOAD = {"lgrl": (8, False, 64), "lrl": (4, False, 32), "lgfrl": (4, True, 64),
           "llgfrl": (4, False, 64), "lhrl": (2, True, 32), "lghrl": (2, True, 64),
           "llhrl": (2, False, 32), "llghrl": (2, False, 64)}
# compares: (bytes, operand signed, register bits, signed comparison)
RL_COMPARE = {"cgrl": (8, True, 64, True), "crl": (4, True, 32, True),
              "clgrl": (8, False, 64, False), "clrl": (4, False, 32, False),
              "cghrl": (2, True, 64, True), "chrl": (2, True, 32, True),
              "clghrl": (2, False, 64, False), "clhrl": (2, False, 32, False),
              "cgfrl": (4, True, 64, True), "clgfrl": (4, False, 64, False)}


def _r(regs: Regs, n: int) -> int:
    return regs[f"r{n}"]


def _low(value: int) -> int:
    return value & MASK32


def _set_low(old: int, low: int) -> int:
    return (old & ~MASK32 & MASK64) | (low & MASK32)


def _load(read: ReadMemory, address: int, size: int, signed: bool = False) -> int | None:
    try:
        raw = read(address & MASK64, size)
    except MemoryFault:
        return None
    return int.from_bytes(raw, "big", signed=signed)


class _Ctx:
    """One emulation: the instruction, its registers and the changes so far."""

    __slots__ = ("a", "eff", "n", "nxt", "raw", "read", "regs")

    def __init__(self, analysis: Analysis, regs: Regs, read: ReadMemory) -> None:
        self.raw = analysis.insn.raw
        self.a = analysis.insn.address
        self.n = analysis.insn.length
        self.nxt = (self.a + self.n) & MASK64
        self.regs = regs
        self.read = read
        self.eff = Effect()

    def r(self, n: int) -> int:
        return self.regs[f"r{n}"]

    def set(self, n: int, value: int) -> None:
        self.eff.regs[f"r{n}"] = value & MASK64

    def pc(self, value: int) -> Effect:
        self.eff.regs["pswa"] = value & MASK64
        return self.eff

    def set_cc(self, code: int) -> None:
        self.eff.regs["pswm"] = cc.put(self.regs["pswm"], code)

    @property
    def cc(self) -> int:
        return cc.get(self.regs["pswm"])


def emulate(analysis: Analysis, regs: Regs, read: ReadMemory) -> Effect | None:
    plan: Plan = analysis.plan
    handler = HANDLERS.get(plan.kind)
    if handler is None:
        return None
    return handler(_Ctx(analysis, regs, read), plan)


# ---------------------------------------------------------------------------- branches
def _rel_branch(c: _Ctx, plan: Plan) -> Effect | None:
    raw, op = c.raw, plan.op
    taken: bool
    if op in ("brc", "brcl"):
        taken = cc.taken(f.r1(raw), c.cc)
    elif op == "brct":
        low = (_low(c.r(f.r1(raw))) - 1) & MASK32
        c.set(f.r1(raw), _set_low(c.r(f.r1(raw)), low))
        taken = low != 0
    elif op == "brctg":
        value = (c.r(f.r1(raw)) - 1) & MASK64
        c.set(f.r1(raw), value)
        taken = value != 0
    elif op == "brcth":
        old = c.r(f.r1(raw))
        high = ((old >> 32) - 1) & MASK32
        c.set(f.r1(raw), (high << 32) | _low(old))
        taken = high != 0
    elif op in ("brxh", "brxle", "brxhg", "brxlg"):
        taken = _index(c, op.endswith("g"), op.startswith("brxh"))
    else:
        taken = _compare_and_branch(c, op)
    return c.pc(plan.target if taken else c.nxt)


def _index(c: _Ctx, wide: bool, high: bool) -> bool:
    """Branch on index (bxh/bxle families): r1 += r3, compared with r3|1 before the add."""
    raw = c.raw
    n1, n3 = f.r1(raw), f.r2(raw)
    bits = 64 if wide else 32
    increment = cc.to_signed(c.r(n3), bits)
    comparand = cc.to_signed(c.r(n3 | 1), bits)
    total = cc.to_signed(cc.to_signed(c.r(n1), bits) + increment, bits)
    c.set(n1, total & MASK64 if wide else _set_low(c.r(n1), total))
    return total > comparand if high else total <= comparand


# compare-and-branch families: (register bits, signed, immediate operand)
_CB = {
    "crj": (32, True, False), "cgrj": (64, True, False), "clrj": (32, False, False),
    "clgrj": (64, False, False), "cij": (32, True, True), "cgij": (64, True, True),
    "clij": (32, False, True), "clgij": (64, False, True),
    "crb": (32, True, False), "cgrb": (64, True, False), "clrb": (32, False, False),
    "clgrb": (64, False, False), "cib": (32, True, True), "cgib": (64, True, True),
    "clib": (32, False, True), "clgib": (64, False, True),
}


def _compare_and_branch(c: _Ctx, op: str) -> bool:
    raw = c.raw
    bits, signed, immediate = _CB[op]
    first = c.r(f.r1(raw))
    if immediate:  # RIE-c / RIS: R1 M3 ... I2 in byte 4
        mask = f.r2(raw)
        second = f.signed(raw[4], 8) if signed else raw[4]
    else:  # RIE-b / RRS: R1 R2 ... M3 in the high nibble of byte 4
        mask = raw[4] >> 4
        second = c.r(f.r2(raw))
    if signed:
        first = cc.to_signed(first, bits)
        if not immediate:
            second = cc.to_signed(second, bits)
    else:
        first &= (1 << bits) - 1
        if not immediate:
            second &= (1 << bits) - 1
    return cc.taken(mask, cc.compare(first, second))


def _rel_call(c: _Ctx, plan: Plan) -> Effect | None:
    assert plan.link is not None
    c.set(plan.link, c.nxt)
    return c.pc(plan.target)


def _abs_target(c: _Ctx, op: str) -> int:
    """The branch address of an absolute branch, computed before any register changes."""
    raw = c.raw
    if op in ("bcr", "bctr", "basr", "balr"):
        return c.r(f.r2(raw))
    if op in ("bctgr",):
        return c.r(raw[3] & 0xF)
    if op in ("bc", "bct", "bas", "bal"):
        return f.address(c.regs, f.b2(raw), f.x2(raw), f.d12(raw))
    if op in ("bctg",):
        return f.address(c.regs, f.b2(raw), f.x2(raw), f.d20(raw))
    if op in ("bxh", "bxle") or op in _CB:
        return f.address(c.regs, f.b2(raw), 0, f.d12(raw))
    if op in ("bxhg", "bxleg"):
        return f.address(c.regs, f.b2(raw), 0, f.d20(raw))
    raise KeyError(op)


def _abs_branch(c: _Ctx, plan: Plan) -> Effect | None:
    raw, op = c.raw, plan.op
    target = _abs_target(c, op)
    if op in ("bcr", "bc"):
        taken = cc.taken(f.r1(raw), c.cc)
    elif op in ("bctr", "bct"):
        low = (_low(c.r(f.r1(raw))) - 1) & MASK32
        c.set(f.r1(raw), _set_low(c.r(f.r1(raw)), low))
        taken = low != 0 and (op == "bct" or f.r2(raw) != 0)
    elif op in ("bctgr", "bctg"):
        n1 = raw[3] >> 4 if op == "bctgr" else f.r1(raw)
        value = (c.r(n1) - 1) & MASK64
        c.set(n1, value)
        taken = value != 0 and (op == "bctg" or (raw[3] & 0xF) != 0)
    elif op in ("bxh", "bxle", "bxhg", "bxleg"):
        taken = _index(c, op.endswith("g"), op.startswith("bxh"))
    elif op in _CB:
        taken = _compare_and_branch(c, op)
    else:
        return None
    return c.pc(target if taken else c.nxt)


def _abs_call(c: _Ctx, plan: Plan) -> Effect | None:
    raw, op = c.raw, plan.op
    assert plan.link is not None
    target = _abs_target(c, op)
    branches = op in ("bas", "bal") or f.r2(raw) != 0
    c.set(plan.link, c.nxt)
    return c.pc(target if branches else c.nxt)


def _nop(c: _Ctx, plan: Plan) -> Effect | None:
    return c.pc(c.nxt)


# ---------------------------------------------------------------------------- relative long
def _larl(c: _Ctx, plan: Plan) -> Effect | None:
    c.set(f.r1(c.raw), plan.target)
    return c.pc(c.nxt)


def _rel_long(c: _Ctx, plan: Plan) -> Effect | None:
    op, target = plan.op, plan.target
    assert target is not None
    n1 = f.r1(c.raw)
    if op == "pfdrl":
        return c.pc(c.nxt)
    if op in RL_LOAD:
        size, signed, bits = RL_LOAD[op]
        if target % size:
            return None  # specification exception: the CPU raises it
        value = _load(c.read, target, size, signed)
        if value is None:
            return None
        c.set(n1, value & MASK64 if bits == 64 else _set_low(c.r(n1), value))
        return c.pc(c.nxt)
    if op in RL_COMPARE:
        size, operand_signed, bits, signed = RL_COMPARE[op]
        if target % size:
            return None
        second = _load(c.read, target, size, operand_signed)
        if second is None:
            return None
        first = c.r(n1)
        first = cc.to_signed(first, bits) if signed else first & ((1 << bits) - 1)
        c.set_cc(cc.compare(first, second))
        return c.pc(c.nxt)
    return None


# ---------------------------------------------------------------------------- plain
def _rre(raw: bytes) -> tuple[int, int]:
    return raw[3] >> 4, raw[3] & 0xF


def _plain(c: _Ctx, plan: Plan) -> Effect | None:
    fn = PLAIN.get(plan.op)
    if fn is None:
        return None
    if fn(c) is None:
        return None
    return c.pc(c.nxt)


def _stmg(c: _Ctx) -> bool | None:
    raw = c.raw
    if f.b2(raw) != SP:
        return None  # only the stack is known to be writable
    ea = f.address(c.regs, f.b2(raw), 0, f.d20(raw))
    n1, n3 = f.r1(raw), f.r2(raw)
    count = (n3 - n1) % 16 + 1
    data = b"".join(c.r((n1 + i) % 16).to_bytes(8, "big") for i in range(count))
    if _load(c.read, ea, len(data)) is None:
        return None
    c.eff.mem.append((ea, data))
    return True


def _lmg(c: _Ctx) -> bool | None:
    raw = c.raw
    ea = f.address(c.regs, f.b2(raw), 0, f.d20(raw))
    n1, n3 = f.r1(raw), f.r2(raw)
    count = (n3 - n1) % 16 + 1
    try:
        data = c.read(ea, 8 * count)
    except MemoryFault:
        return None
    for i in range(count):
        c.set((n1 + i) % 16, int.from_bytes(data[8 * i:8 * i + 8], "big"))
    return True


def _store(c: _Ctx, size: int, long_disp: bool) -> bool | None:
    raw = c.raw
    if f.b2(raw) != SP or f.x2(raw) != 0:
        return None  # only the stack is known to be writable
    ea = f.address(c.regs, f.b2(raw), 0, f.d20(raw) if long_disp else f.d12(raw))
    if _load(c.read, ea, size) is None:
        return None
    value = c.r(f.r1(raw)) & ((1 << (8 * size)) - 1)
    c.eff.mem.append((ea, value.to_bytes(size, "big")))
    return True


def _load_rx(c: _Ctx, size: int, long_disp: bool) -> bool | None:
    raw = c.raw
    ea = _address(c, long_disp)
    value = _load(c.read, ea, size)
    if value is None:
        return None
    n1 = f.r1(raw)
    c.set(n1, value if size == 8 else _set_low(c.r(n1), value))
    return True


def _add_imm(c: _Ctx, bits: int, source: int, imm: int, dest: int) -> bool | None:
    first = cc.to_signed(c.r(source), bits)
    exact = first + imm
    result = cc.to_signed(exact, bits)
    overflow = exact != result
    if overflow and c.regs["pswm"] & cc.FIXED_OVERFLOW_MASK:
        return None  # the program asked for a fixed-point-overflow exception
    c.set(dest, result & MASK64 if bits == 64 else _set_low(c.r(dest), result))
    c.set_cc(3 if overflow else cc.sign(result))
    return True


def _compare(c: _Ctx, bits: int, signed: bool, first: int, second: int) -> bool:
    if signed:
        first, second = cc.to_signed(first, bits), cc.to_signed(second, bits)
    else:
        first &= (1 << bits) - 1
        second &= (1 << bits) - 1
    c.set_cc(cc.compare(first, second))
    return True


def _test(c: _Ctx, bits: int, dest: int, source: int) -> bool:
    value = c.r(source)
    c.set(dest, value if bits == 64 else _set_low(c.r(dest), value))
    c.set_cc(cc.sign(cc.to_signed(value, bits)))
    return True


def _move(c: _Ctx, bits: int, dest: int, value: int) -> bool:
    c.set(dest, value if bits == 64 else _set_low(c.r(dest), value))
    return True


def _address(c: _Ctx, long_disp: bool) -> int:
    raw = c.raw
    return f.address(c.regs, f.b2(raw), f.x2(raw), f.d20(raw) if long_disp else f.d12(raw))


def _rr(c: _Ctx) -> tuple[int, int]:
    return f.r1(c.raw), f.r2(c.raw)


PLAIN: dict[str, Callable[[_Ctx], bool | None]] = {
    "stmg": _stmg,
    "lmg": _lmg,
    "lgr": lambda c: _move(c, 64, _rre(c.raw)[0], c.r(_rre(c.raw)[1])),
    "lr": lambda c: _move(c, 32, f.r1(c.raw), c.r(f.r2(c.raw))),
    "lgfr": lambda c: _move(c, 64, _rre(c.raw)[0], cc.to_signed(c.r(_rre(c.raw)[1]), 32)),
    "la": lambda c: _move(c, 64, f.r1(c.raw), _address(c, False)),
    "lay": lambda c: _move(c, 64, f.r1(c.raw), _address(c, True)),
    "lghi": lambda c: _move(c, 64, f.r1(c.raw), f.i16(c.raw)),
    "lhi": lambda c: _move(c, 32, f.r1(c.raw), f.i16(c.raw)),
    "aghi": lambda c: _add_imm(c, 64, f.r1(c.raw), f.i16(c.raw), f.r1(c.raw)),
    "ahi": lambda c: _add_imm(c, 32, f.r1(c.raw), f.i16(c.raw), f.r1(c.raw)),
    "aghik": lambda c: _add_imm(c, 64, f.r2(c.raw), f.i16(c.raw), f.r1(c.raw)),
    "ahik": lambda c: _add_imm(c, 32, f.r2(c.raw), f.i16(c.raw), f.r1(c.raw)),
    "ltgr": lambda c: _test(c, 64, *_rre(c.raw)),
    "ltr": lambda c: _test(c, 32, *_rr(c)),
    "cghi": lambda c: _compare(c, 64, True, c.r(f.r1(c.raw)), f.i16(c.raw)),
    "chi": lambda c: _compare(c, 32, True, c.r(f.r1(c.raw)), f.i16(c.raw)),
    "cgr": lambda c: _compare(c, 64, True, *map(c.r, _rre(c.raw))),
    "cr": lambda c: _compare(c, 32, True, *map(c.r, _rr(c))),
    "clgr": lambda c: _compare(c, 64, False, *map(c.r, _rre(c.raw))),
    "clr": lambda c: _compare(c, 32, False, *map(c.r, _rr(c))),
    "stg": lambda c: _store(c, 8, True),
    "st": lambda c: _store(c, 4, False),
    "lg": lambda c: _load_rx(c, 8, True),
    "l": lambda c: _load_rx(c, 4, False),
}

HANDLERS: dict[str, Callable[[_Ctx, Plan], Effect | None]] = {
    "rel-branch": _rel_branch,
    "rel-call": _rel_call,
    "abs-branch": _abs_branch,
    "abs-call": _abs_call,
    "nop": _nop,
    "larl": _larl,
    "rel-long": _rel_long,
    "plain": _plain,
}
