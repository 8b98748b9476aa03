"""Out-of-line execution for PowerPC: the slot contents and the fixups around a step.

correction = original address - slot address.  After a single-step in the slot:
- the pc is corrected (pc += correction), except after a taken branch whose target is
  absolute (AA=1) or comes from a register (bclr/bcctr/bctar): the step stops before the
  target is fetched, so a relative target is right once corrected and an absolute one is
  right as it is; a branch not taken leaves the pc at slot + 4, corrected like any other;
- LK=1 wrote slot + 4 into LR (taken or not): it becomes address + 4;
- addpcis/lnia and pla wrote the slot's address into a register: it gets the value the
  instruction computes in place;
- a prefixed pc-relative load/store had its 34-bit displacement re-based for the slot
  before the step, so the operand is the same memory.
"""

from __future__ import annotations

from ubp_core.types import Analysis, Effect, ReadMemory, Regs, Strategy, XolStep

from . import prefixed
from .analysis import Plan
from .emulate import Context, condition
from .encoding import encode_b


def _bytes(words: tuple[int, ...], ctx: Context) -> bytes:
    return b"".join(w.to_bytes(4, ctx.order) for w in words)


def _rebased(plan: Plan, address: int, slot: int, ctx: Context) -> bytes | None:
    """The instruction as it must sit at ``slot`` (None: its operand is out of reach)."""
    if plan.op != "pcrel" or slot == address:
        return _bytes(plan.words, ctx)
    assert plan.pcrel is not None and plan.target is not None
    pair = prefixed.with_displacement(plan.words[0], plan.words[1], plan.target - slot)
    return None if pair is None else _bytes(pair, ctx)


def prepare(analysis: Analysis, slot: int, regs: Regs, ctx: Context) -> XolStep:
    plan: Plan = analysis.plan
    code = _rebased(plan, analysis.insn.address, slot, ctx)
    if code is None:
        raise ValueError(f"slot {slot:#x} is out of reach of the operand at {plan.target:#x}")
    state: dict = {}
    if plan.op in ("b", "bc", "bclr", "bcctr"):
        state["taken"] = condition(plan.bo, plan.bi, regs, ctx)[0]
    return XolStep(analysis, slot, code, {"pc": slot}, state)


def post(step: XolStep, regs: Regs, read: ReadMemory, ctx: Context) -> Effect:
    plan: Plan = step.analysis.plan
    insn = step.analysis.insn
    a, n, slot = insn.address, insn.length, step.slot
    corr = a - slot
    pc = regs["pc"]
    eff = Effect()
    if not corr:
        return eff  # an inline step ran it in place
    op = plan.op
    if op in ("b", "bc"):
        fix = not (step.state["taken"] and plan.absolute)
    elif op in ("bclr", "bcctr"):
        fix = not step.state["taken"]
    elif op == "bctar":
        fix = pc == (slot + 4) & ctx.mask  # TAR is not visible; it never names a slot
    else:
        fix = True
    if fix:
        eff.regs["pc"] = (pc + corr) & ctx.mask
    if plan.link:
        eff.regs["lr"] = (a + n) & ctx.mask
    if op in ("addpcis", "pla"):
        eff.regs[f"r{plan.rt}"] = plan.value
    return eff


def abort(step: XolStep, regs: Regs, read: ReadMemory, ctx: Context) -> Effect:
    # nothing PowerPC writes before a fault names the slot: only the pc goes back
    return Effect(regs={"pc": step.analysis.insn.address})


def boost(analysis: Analysis, slot: int, ctx: Context) -> bytes | None:
    if Strategy.BOOST not in analysis.strategies:
        return None
    insn = analysis.insn
    a, n = insn.address, insn.length
    code = _rebased(analysis.plan, a, slot, ctx)
    back = encode_b((a + n) - (slot + n))
    if code is None or back is None:
        return None
    return code + back.to_bytes(4, ctx.order)
