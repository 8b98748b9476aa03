"""Out-of-line execution for s390x: the slot contents and the fixups around a step.

correction = original address - slot address.  After a single-step in the slot:
- relative branches need nothing but pc += correction: the step stops before the
  target is fetched, so a taken branch lands at slot + offset, and the correction
  turns that into the original target;
- absolute branches already hold the right pc when taken; not taken, pc is
  slot + length and becomes original + length;
- branch-and-save forms also left slot + length in their link register;
- larl computed its address from the slot: the register gets the original one;
- relative-long loads, stores and compares (and EXRL's target) run with their
  displacement re-based so that they address the same memory from the slot;
- EX/EXRL run their target where it is; the target is read back after the step to
  correct a link register it may have written;
- a system call gets a jump back after it (a child of clone/fork starts right after
  it, in the slot, without any step trap).

A boost is the copy followed by ``brcl 15,back`` (6 bytes, +-4 GiB).
"""

from __future__ import annotations

from ubp_core.errors import MemoryFault
from ubp_core.types import Analysis, Effect, ReadMemory, Regs, Strategy, XolStep

from . import fields as f
from .analysis import ABS_CALL, REL_CALL, Plan

MASK64 = f.MASK64
PC = "pswa"


def _fits32(value: int) -> bool:
    return -(1 << 31) <= value < (1 << 31)


def brcl_back(slot_next: int, target: int) -> bytes | None:
    """``brcl 15,target`` placed at ``slot_next``, or None when out of reach."""
    delta = target - slot_next
    if delta % 2 or not _fits32(delta // 2):
        return None
    return b"\xc0\xf4" + ((delta // 2) & 0xFFFFFFFF).to_bytes(4, "big")


def rebased(raw: bytes, target: int, slot: int) -> bytes | None:
    """A relative-long instruction with its displacement re-based to reach ``target``
    from ``slot``, or None when it does not fit."""
    delta = target - slot
    if delta % 2 or not _fits32(delta // 2):
        return None
    return raw[:2] + ((delta // 2) & 0xFFFFFFFF).to_bytes(4, "big") + raw[6:]


def execute_target(analysis: Analysis, regs: Regs) -> int:
    """Where EX/EXRL fetches the instruction it runs (from the registers before it)."""
    raw = analysis.insn.raw
    plan: Plan = analysis.plan
    if plan.op == "exrl":
        assert plan.target is not None
        return plan.target
    return f.address(regs, f.b2(raw), f.x2(raw), f.d12(raw))


def prepare(analysis: Analysis, slot: int, regs: Regs) -> XolStep:
    plan: Plan = analysis.plan
    insn = analysis.insn
    a, n = insn.address, insn.length
    code = insn.raw
    state: dict = {}
    if slot != a:
        if plan.kind == "rel-long" or plan.op == "exrl":
            assert plan.target is not None
            moved = rebased(code, plan.target, slot)
            if moved is None:
                raise ValueError(f"slot {slot:#x} is out of reach of {plan.target:#x}")
            code = moved
        if plan.kind == "syscall":
            code = code + (brcl_back(slot + n, a + n) or b"")
    if plan.kind == "execute":
        state["target"] = execute_target(analysis, regs)
        r1 = f.r1(insn.raw)
        state["modifier"] = regs[f"r{r1}"] & 0xFF if r1 else 0
    return XolStep(analysis, slot, code, {PC: slot}, state)


def post(step: XolStep, regs: Regs, read: ReadMemory) -> Effect:
    plan: Plan = step.analysis.plan
    insn = step.analysis.insn
    a, n, slot = insn.address, insn.length, step.slot
    pc = regs[PC]
    corr = a - slot
    eff = Effect()
    kind = plan.kind
    if kind == "syscall":
        if pc == slot:
            return Effect(step_again=True)  # restarted: the kernel rewound to the svc
        if pc == slot + n:
            eff.regs[PC] = (a + n) & MASK64
        return eff
    if kind == "execute" and pc == slot:
        # stopped between EXECUTE and its target (qemu's stub steps them apart; the
        # architecture, PER and unicorn count one instruction): once more
        return Effect(step_again=True)
    if kind in ("abs-branch", "abs-call", "execute"):
        if pc == (slot + n) & MASK64:
            eff.regs[PC] = (a + n) & MASK64  # not taken (or not a branch at all)
    elif corr:
        eff.regs[PC] = (pc + corr) & MASK64
    if kind in ("rel-call", "abs-call"):
        assert plan.link is not None
        eff.regs[f"r{plan.link}"] = (a + n) & MASK64
    elif kind == "larl":
        assert plan.target is not None
        eff.regs[f"r{f.r1(insn.raw)}"] = plan.target
    elif kind == "execute" and corr:
        link = _executed_link(step, read)
        if link is not None and regs[f"r{link}"] in ((slot + n) & MASK64, (slot + n + 1) & MASK64):
            eff.regs[f"r{link}"] = (regs[f"r{link}"] + corr) & MASK64
    return eff


def _executed_link(step: XolStep, read: ReadMemory) -> int | None:
    """The link register of the instruction EX/EXRL ran, if it is a branch-and-save."""
    target = step.state["target"]
    try:
        head = bytearray(read(target, 2))
        length = f.insn_length(head[0])
        raw = bytes(head) + (read(target + 2, length - 2) if length > 2 else b"")
    except MemoryFault:
        return None
    raw = bytes([raw[0], raw[1] | step.state["modifier"]]) + raw[2:]
    k = f.key(raw)
    if k in ABS_CALL or k in REL_CALL or k == "0c":  # bassm links too (mode bit in bit 63)
        return f.r1(raw)
    return None


def abort(step: XolStep, regs: Regs, read: ReadMemory) -> Effect:
    # program exceptions nullify or suppress: nothing but the pc names the slot
    return Effect(regs={PC: step.analysis.insn.address})


def boost(analysis: Analysis, slot: int) -> bytes | None:
    if Strategy.BOOST not in analysis.strategies:
        return None
    plan: Plan = analysis.plan
    insn = analysis.insn
    a, n = insn.address, insn.length
    code: bytes | None = insn.raw
    if plan.kind in ("rel-long", "larl"):
        assert plan.target is not None
        code = rebased(insn.raw, plan.target, slot)
    back = brcl_back(slot + n, a + n)
    if code is None or back is None:
        return None
    return code + back
