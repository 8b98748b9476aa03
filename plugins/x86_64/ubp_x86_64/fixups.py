"""Out-of-line execution for x86-64: the slot contents and the fixups around a step.

correction = original address - slot address.  After a single-step in the slot:
- the pc is corrected unless the instruction set it absolutely (ret, indirect jmp/call);
- a call's pushed return address points into the slot and is replaced;
- a rip-relative operand was rewritten onto a scratch register, which is restored;
- pushf pushed the single-step trap flag, which the program never set;
- syscall left the slot's address in rcx;
- an iterating (rep) instruction may need more steps.
"""

from __future__ import annotations

from ubp_core.errors import MemoryFault
from ubp_core.types import Analysis, Effect, ReadMemory, Regs, Strategy, XolStep

from .analysis import Plan


def _records_x87_pointers() -> bool:
    """Does this CPU keep the x87 last-instruction pointer (FIP) for every x87
    instruction?  Intel does; AMD stores FIP/FDP/FOP only while an x87 exception is
    pending (reads back 0 otherwise, seen here on an AMD EPYC), so an SSOL fixup that
    sets FIP would create a difference rather than remove one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip() not in ("AuthenticAMD",
                                                                 "HygonGenuine")
    except OSError:
        pass
    return True


RECORDS_FIP = _records_x87_pointers()

MASK64 = (1 << 64) - 1
TF = 0x100


def _fits32(value: int) -> bool:
    return -(1 << 31) <= value < (1 << 31)


def _jmp_back(slot_next: int, target: int) -> bytes | None:
    rel = target - (slot_next + 5)
    if not _fits32(rel):
        return None
    return b"\xe9" + (rel & 0xFFFFFFFF).to_bytes(4, "little")


def prepare(analysis: Analysis, slot: int, regs: Regs) -> XolStep:
    plan: Plan = analysis.plan
    insn = analysis.insn
    a, n = insn.address, insn.length
    code = insn.raw
    write = {"rip": slot}
    state: dict = {}
    if slot != a:
        if plan.rebase:
            code = _rebased(insn.raw, plan, a, slot)
            if code is None:
                raise ValueError(f"slot {slot:#x} out of reach of {a:#x}")
        if plan.scratch is not None:
            assert plan.ssol_code is not None
            code = plan.ssol_code
            state["scratch"] = regs[plan.scratch]
            write[plan.scratch] = (a + n) & MASK64
        # The step traps before the jump back runs.  A thread that leaves the slot
        # without a step trap still finds its way: a child created by clone/fork/vfork
        # starts right after a syscall, in the slot.
        code = code + (_jmp_back(slot + n, a + n) or b"")
    if plan.tf_fix or plan.op == "syscall":
        state["eflags"] = regs["eflags"]
    if plan.op == "popf":
        state["rsp"] = regs["rsp"]
    # what post() below would do is only the pc correction
    pc_only = (not plan.absolute and not plan.call and not plan.rep and not plan.tf_fix
               and plan.scratch is None and plan.op not in ("syscall", "popf")
               and not (plan.fip and RECORDS_FIP))
    return XolStep(analysis, slot, code, write, state, pc_only)


def post(step: XolStep, regs: Regs, read: ReadMemory) -> Effect:
    plan: Plan = step.analysis.plan
    insn = step.analysis.insn
    a, n, slot = insn.address, insn.length, step.slot
    pc = regs["rip"]
    if (plan.rep or plan.op == "syscall") and pc == slot:
        # a rep iteration finished but not the instruction (or a restarted syscall)
        return Effect(step_again=True)
    eff = Effect()
    corr = a - slot
    if plan.op == "syscall":
        if pc == slot + n:
            eff.regs["rip"] = a + n
            if regs["rcx"] == slot + n:
                eff.regs["rcx"] = a + n
        if not step.state["eflags"] & TF and regs["r11"] & TF:
            eff.regs["r11"] = regs["r11"] & ~TF  # syscall saved the step's trap flag
    elif not plan.absolute and corr:
        eff.regs["rip"] = (pc + corr) & MASK64
    if plan.call and corr:
        eff.mem.append((regs["rsp"], ((a + n) & MASK64).to_bytes(8, "little")))
    if "scratch" in step.state:
        eff.regs[plan.scratch] = step.state["scratch"]
    if plan.tf_fix and not step.state["eflags"] & TF:
        try:
            pushed = int.from_bytes(read(regs["rsp"], 8), "little")
        except MemoryFault:
            pushed = None
        if pushed is not None and pushed & TF:
            eff.mem.append((regs["rsp"], (pushed & ~TF).to_bytes(8, "little")))
    if plan.op == "popf" and regs["eflags"] & TF:
        # Linux leaves the step's TF set after a popf (it takes popf to be setting TF
        # itself); clear it unless the popped image really had it
        try:
            image = int.from_bytes(read(step.state["rsp"], 8), "little")
        except MemoryFault:
            image = TF
        if not image & TF:
            eff.regs["eflags"] = regs["eflags"] & ~TF
    if plan.fip and corr and RECORDS_FIP:
        eff.extra["fip"] = a
    return eff


def abort(step: XolStep, regs: Regs, read: ReadMemory) -> Effect:
    plan: Plan = step.analysis.plan
    insn = step.analysis.insn
    eff = Effect(regs={"rip": insn.address})
    if "scratch" in step.state:
        eff.regs[plan.scratch] = step.state["scratch"]
    slot = step.slot
    if plan.call and slot != insn.address:
        # a call that faults on its target has already written the return address
        where = (regs["rsp"] - 8) & MASK64
        try:
            if int.from_bytes(read(where, 8), "little") == slot + insn.length:
                eff.mem.append((where, (insn.address + insn.length).to_bytes(8, "little")))
        except MemoryFault:
            pass
    return eff


def _rebased(raw: bytes, plan: Plan, a: int, slot: int) -> bytes | None:
    """The instruction with its rip-relative displacement re-based for ``slot``."""
    lay = plan.layout
    if not lay.rip_relative:
        return raw
    assert lay.disp_off is not None
    off = lay.disp_off
    code = bytearray(raw)
    new = int.from_bytes(code[off:off + 4], "little", signed=True) + (a - slot)
    if not _fits32(new):
        return None
    code[off:off + 4] = (new & 0xFFFFFFFF).to_bytes(4, "little")
    return bytes(code)


def boost(analysis: Analysis, slot: int) -> bytes | None:
    if Strategy.BOOST not in analysis.strategies:
        return None
    insn = analysis.insn
    a, n = insn.address, insn.length
    code = _rebased(insn.raw, analysis.plan, a, slot)
    back = _jmp_back(slot + n, a + n)
    if code is None or back is None:
        return None
    return code + back
