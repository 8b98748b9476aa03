"""Where an s390x instruction reads or writes memory, for making that memory appear.

unicorn's s390x MMU raises an addressing exception for unmapped memory instead of
calling the unmapped-memory hooks, so the reference CPU maps the pages an instruction
is about to touch before it runs.  This is test-bench plumbing, not a probe decision:
ranges are generous (a page more rather than less), and capstone's operand details
(base, index, displacement, SS length) are good enough to find them.
"""

from __future__ import annotations

from collections.abc import Callable

from capstone import CS_ARCH_SYSZ, CS_MODE_BIG_ENDIAN, Cs, CsError
from capstone import sysz_const as sc

from . import fields as f
from .analysis import EXECUTE, REL_LONG

Regs = Callable[[int], int]  # register number -> value

DEFAULT_SIZE = 16
# register-pair and multiple-register forms whose extent the operand table does not give
MULTIPLE = {"stmg": 8, "lmg": 8, "stm": 4, "lm": 4, "stmy": 4, "lmy": 4, "stmh": 4,
            "lmh": 4, "stam": 4, "lam": 4, "stamy": 4, "lamy": 4}
# instructions that address memory through registers (first operand, second operand)
REGISTER_ADDRESSED = {"mvcl": (0, 1), "clcl": (0, 1), "mvcle": (0, 1), "clcle": (0, 1),
                      "mvclu": (0, 1), "clclu": (0, 1), "srst": (1,), "srstu": (1,),
                      "clst": (0, 1), "mvst": (0, 1), "cuse": (0, 1), "cksm": (1,),
                      "trtt": (0, 1), "trto": (0, 1), "trot": (0, 1), "troo": (0, 1),
                      "cu12": (0, 1), "cu14": (0, 1), "cu21": (0, 1), "cu24": (0, 1),
                      "cu41": (0, 1), "cu42": (0, 1), "tre": (0,), "mvpg": (0, 1)}


class Operands:
    """Memory ranges of one instruction given its bytes and the registers."""

    def __init__(self) -> None:
        self._cs = Cs(CS_ARCH_SYSZ, CS_MODE_BIG_ENDIAN)
        self._cs.detail = True

    def ranges(self, raw: bytes, address: int, reg: Regs,
               fetch: Callable[[int, int], bytes | None]) -> list[tuple[int, int]]:
        """(address, size) ranges ``raw`` at ``address`` touches; ``fetch`` reads memory
        (None where it cannot) to find what EX/EXRL runs."""
        k = f.key(raw)
        if k in REL_LONG:
            return [((address + 2 * f.i32(raw)) & f.MASK64, 8)]
        if k in EXECUTE:
            return self._execute(raw, address, reg, fetch, k)
        try:
            insn = next(self._cs.disasm(raw, address, 1))
        except (StopIteration, CsError):
            return []
        out: list[tuple[int, int]] = []
        regs_seen: list[int] = []
        for op in insn.operands:
            if op.type == sc.SYSZ_OP_REG and sc.SYSZ_REG_0 <= op.reg <= sc.SYSZ_REG_15:
                regs_seen.append(op.reg - sc.SYSZ_REG_0)
            if op.type != sc.SYSZ_OP_MEM:
                continue
            mem = op.mem
            ea = mem.disp
            for r in (mem.base, mem.index):
                if sc.SYSZ_REG_0 < r <= sc.SYSZ_REG_15:  # register 0 means none
                    ea += reg(r - sc.SYSZ_REG_0)
            size = mem.length or DEFAULT_SIZE
            per = MULTIPLE.get(insn.mnemonic)
            if per and len(regs_seen) >= 2:
                size = per * ((regs_seen[1] - regs_seen[0]) % 16 + 1)
            out.append((ea & f.MASK64, size))
        which = REGISTER_ADDRESSED.get(insn.mnemonic)
        if which and regs_seen:
            for i in which:
                if i < len(regs_seen):
                    out.append((reg(regs_seen[i]) & f.MASK64, DEFAULT_SIZE))
        return out

    def _execute(self, raw: bytes, address: int, reg: Regs,
                 fetch: Callable[[int, int], bytes | None], k: str) -> list[tuple[int, int]]:
        if k == "c6.0":
            target = (address + 2 * f.i32(raw)) & f.MASK64
        else:
            target = f.d12(raw)
            for r in (f.b2(raw), f.x2(raw)):
                if r:
                    target += reg(r)
            target &= f.MASK64
        head = fetch(target, 2)
        if head is None:
            return [(target, 6)]
        n = f.insn_length(head[0])
        rest = fetch(target + 2, n - 2) if n > 2 else b""
        if rest is None:
            return [(target, 6)]
        r1 = f.r1(raw)
        modifier = reg(r1) & 0xFF if r1 else 0
        executed = bytes([head[0], head[1] | modifier]) + rest
        if f.key(executed) in EXECUTE:
            return []  # an execute exception: nothing is touched
        return self.ranges(executed, target, reg, fetch)
