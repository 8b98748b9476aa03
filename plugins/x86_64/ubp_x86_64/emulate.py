"""Emulation of the x86-64 instructions that dominate function entries and branches.

Only instructions whose whole architectural effect is computed here are emulated; when
one execution would fault (a stack that cannot be read, a target that is not a
canonical address) None is returned and the engine single-steps it instead, so the
fault is raised by the CPU at the right address.
"""

from __future__ import annotations

from ubp_core.errors import MemoryFault
from ubp_core.types import Analysis, Effect, ReadMemory, Regs

from .analysis import Plan

MASK64 = (1 << 64) - 1
CF, PF, ZF, SF, OF = 0x1, 0x4, 0x40, 0x80, 0x800


def canonical48(address: int) -> bool:
    top = address >> 47
    return top == 0 or top == (1 << 17) - 1


def condition(cc: int, flags: int) -> bool:
    c, z, s, o, p = (bool(flags & f) for f in (CF, ZF, SF, OF, PF))
    base = cc >> 1
    if base == 0:
        r = o
    elif base == 1:
        r = c
    elif base == 2:
        r = z
    elif base == 3:
        r = c or z
    elif base == 4:
        r = s
    elif base == 5:
        r = p
    elif base == 6:
        r = s != o
    else:
        r = z or (s != o)
    return r != bool(cc & 1)


def _q(value: int) -> bytes:
    return (value & MASK64).to_bytes(8, "little")


def _load(read: ReadMemory, address: int) -> int | None:
    try:
        return int.from_bytes(read(address & MASK64, 8), "little")
    except MemoryFault:
        return None


def emulate(analysis: Analysis, regs: Regs, read: ReadMemory) -> Effect | None:
    plan: Plan = analysis.plan
    insn = analysis.insn
    nxt = (insn.address + insn.length) & MASK64
    op = plan.op
    r = {}
    if op == "nop":
        r["rip"] = nxt
        return Effect(r)
    if op in ("jmp", "jcc", "loop"):
        taken = True
        if op == "jcc":
            taken = condition(plan.cond, regs["eflags"])
        elif op == "loop":
            rcx = regs["rcx"]
            if plan.cond == 3:  # jrcxz
                taken = rcx == 0
            else:
                rcx = (rcx - 1) & MASK64
                r["rcx"] = rcx
                zf = bool(regs["eflags"] & ZF)
                taken = rcx != 0 and (plan.cond == 2 or (zf if plan.cond == 1 else not zf))
        target = plan.target if taken else nxt
        if not canonical48(target):
            return None
        r["rip"] = target
        return Effect(r)
    rsp = regs["rsp"]
    if op == "push" or op == "push-imm":
        value = regs[plan.reg] if op == "push" else plan.imm
        sp = (rsp - 8) & MASK64
        return Effect({"rsp": sp, "rip": nxt}, [(sp, _q(value))])
    if op == "pop":
        value = _load(read, rsp)
        if value is None:
            return None
        r["rsp"] = (rsp + 8) & MASK64
        r[plan.reg] = value  # pop rsp: the loaded value wins
        r["rip"] = nxt
        return Effect(r)
    if op == "ret":
        value = _load(read, rsp)
        if value is None or not canonical48(value):
            return None
        return Effect({"rsp": (rsp + 8 + plan.imm) & MASK64, "rip": value})
    if op == "call":
        if not canonical48(plan.target):
            return None
        sp = (rsp - 8) & MASK64
        return Effect({"rsp": sp, "rip": plan.target}, [(sp, _q(nxt))])
    if op in ("jmp-ind", "call-ind"):
        if plan.reg is not None:
            target = regs[plan.reg]
        else:
            base, index, scale, disp = plan.mem
            ea = disp
            if base == "rip":
                ea += nxt
            elif base is not None:
                ea += regs[base]
            if index is not None:
                ea += regs[index] * scale
            target = _load(read, ea)
            if target is None:
                return None
        if not canonical48(target):
            return None
        if op == "jmp-ind":
            return Effect({"rip": target})
        sp = (rsp - 8) & MASK64
        return Effect({"rsp": sp, "rip": target}, [(sp, _q(nxt))])
    return None
