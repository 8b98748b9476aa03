"""Trap-free counting probes on x86-64: a jmp to a trampoline instead of an int3.

The site's first instructions (at least 5 bytes) become ``jmp rel32`` to a trampoline
in an XOL area; the rest of the covered bytes become int3, never executed (the core has
checked that no branch of the function lands there).  The trampoline::

    lea  rsp, [rsp-128]        ; step over the red zone a leaf function may use
    pushfq                     ; the flags may be live anywhere but at an entry
    lock inc qword [rip+C]     ; the counter, in a page shared with UBP
    popfq
    lea  rsp, [rsp+128]
    <the covered instructions, re-based for their new address>
    jmp  site+covered

Only instructions that behave identically at another address and cannot fault on a
memory operand qualify: a fault in the trampoline would show the program's signal
handler a pc it never had.  The same rule as the kernel's optprobes (which also
refuses anything that is or may be a branch).
"""

from __future__ import annotations

from collections.abc import Sequence

from ubp_core.types import Analysis, Strategy

from .analysis import Plan, _mem_operand
from .fixups import _fits32, _jmp_back, _rebased

JUMP_SIZE = 5
PROLOGUE = bytes.fromhex("488d642480") + b"\x9c"  # lea rsp,[rsp-128]; pushfq
EPILOGUE = b"\x9d" + bytes.fromhex("488da42480000000")  # popfq; lea rsp,[rsp+128]
LOCK_INC_RIP = bytes.fromhex("f048ff05")  # lock inc qword [rip+disp32]
SAFE_OPS = frozenset({"plain", "nop", "push", "pop", "push-imm"})
LEA = 0x8D


def relocation_refusal(analysis: Analysis) -> str | None:
    """Why this instruction cannot run from a trampoline (None: it can)."""
    insn = analysis.insn
    what = f"{insn.mnemonic} {insn.op_str}".strip()
    if analysis.refusal is not None:
        return f"{what} cannot be probed: {analysis.refusal}"
    plan: Plan = analysis.plan
    if Strategy.BOOST not in analysis.strategies or plan.op not in SAFE_OPS or analysis.faults:
        return f"{what} ({analysis.kind}) does not run the same from another address"
    lay = plan.layout
    if lay.modrm is not None and lay.mod != 3 and not (lay.map == 0 and lay.opcode == LEA
                                                        and lay.vex is None):
        base, index, _, _ = _mem_operand(insn.raw, lay)
        tls = base is None and index is None and bool({0x64, 0x65} & set(lay.prefixes))
        if not tls and (base not in ("rsp", "rip") or index is not None):
            # a bad pointer would fault inside the trampoline, at a pc the program
            # never had; stack, rip-relative and fs:/gs: absolute (thread-local: the
            # stack protector's canary) operands do not fault in a running program
            return f"{what} reads or writes memory through a pointer that may fault"
    return None


def branch_targets(analysis: Analysis) -> tuple[int, ...] | None:
    """Where this instruction may jump to inside a function: its direct target(s), or
    None for a jump whose targets are unknown (a jump table)."""
    plan: Plan | None = analysis.plan
    if plan is None:
        return ()
    if plan.target is not None:
        return (plan.target,)
    if plan.op == "jmp-ind":
        # jmp [rip+GOT] is a tail call into another function; jmp reg / jmp [table+reg*8]
        # may come back anywhere in this one
        return () if plan.layout.rip_relative else None
    if plan.op == "far-jmp":
        return None
    return ()


def counting_trampoline(analyses: Sequence[Analysis], tramp: int, counter: int) -> bytes | str:
    code = bytearray(PROLOGUE)
    rel = counter - (tramp + len(code) + len(LOCK_INC_RIP) + 4)
    if not _fits32(rel):
        return "the counter is out of rip-relative reach of the trampoline"
    code += LOCK_INC_RIP + (rel & 0xFFFFFFFF).to_bytes(4, "little")
    code += EPILOGUE
    for a in analyses:
        why = relocation_refusal(a)
        if why is not None:
            return why
        moved = _rebased(a.insn.raw, a.plan, a.insn.address, tramp + len(code))
        if moved is None:
            return f"{a.insn.mnemonic} {a.insn.op_str}: its rip-relative operand is out of reach"
        code += moved
    last = analyses[-1].insn
    back = _jmp_back(tramp + len(code), last.address + last.length)
    if back is None:
        return "the trampoline is out of reach of the site"
    return bytes(code + back)


def jump_patch(site: int, tramp: int, length: int) -> bytes | None:
    back = _jmp_back(site, tramp)
    if back is None:
        return None
    return back + b"\xcc" * (length - JUMP_SIZE)
