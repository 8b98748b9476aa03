"""What each z/Architecture instruction needs to run away from its address.

Refusals sit in one table with their reasons (the Linux uprobes style).  Everything
else is classified from the instruction bits into an operation class that says how the
out-of-line step is fixed up, whether a boost survives the move, and whether the
instruction is emulated.  Every class is proven on the reference CPUs by the kit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ubp_core.types import Analysis, Insn, Strategy

from . import fields as f

E, B, S, IN = Strategy.EMULATE, Strategy.BOOST, Strategy.SSOL, Strategy.INLINE
REACH = 1 << 32  # a relative-long operand reaches pc - 4 GiB .. pc + 4 GiB - 2

BREAKPOINTS = (b"\x00\x01", b"\x00\x02")

# ---------------------------------------------------------------------------- refusals
REFUSALS: dict[str, str] = {
    "00.01": "0x0001 is the breakpoint instruction (GDB's, and UBP's)",
    "00.02": "0x0002 is the breakpoint instruction of Linux uprobes",
    "e5.60": "tbegin: a transaction that aborts resumes right after the tbegin, which "
             "out of line is the XOL slot, reached long after the step",
    "e5.61": "tbeginc: a transaction that aborts resumes right after the tbeginc, which "
             "out of line is the XOL slot, reached long after the step",
    "b2.f8": "tend: a single-step inside a transaction aborts it (Linux refuses it too)",
    "01.0c": "sam24 switches to 24-bit addressing: the step, the fixups and the jump "
             "back would all be computed in another addressing mode",
    "01.0d": "sam31 switches to 31-bit addressing: the step, the fixups and the jump "
             "back would all be computed in another addressing mode",
    "0b": "bsm sets the addressing mode from a register and branches: the mode and "
          "the link bit are outside what a 64-bit fixup can restore",
    "0c": "bassm saves an addressing-mode-tagged link and may change the mode",
    "01.01": "pr (program return) unstacks a linkage-stack entry saved with the "
             "address of another instruction",
    "b2.40": "bakr stacks the instruction address in the linkage stack, where no "
             "fixup can reach it",
    "b2.18": "pc (program call) saves the return address in the linkage stack",
    "b2.28": "pt (program transfer) loads the PSW from registers saved elsewhere",
    "b2.58": "bsg saves the return address tagged with the address-space mode",
    "b2.5a": "bsa saves the return address in the dispatchable-unit control table",
}


def _opkey(raw: bytes) -> str:
    if raw[0] == 0x00:
        return f"00.{raw[1]:02x}"
    return f.key(raw)


# ---------------------------------------------------------------------------- classes
# relative branches without a link: after a step, pc += correction, taken or not
REL_BRANCH = {
    "a7.4": "brc", "c0.4": "brcl", "a7.6": "brct", "a7.7": "brctg", "cc.6": "brcth",
    "84": "brxh", "85": "brxle", "ec..44": "brxhg", "ec..45": "brxlg",
    "ec..76": "crj", "ec..64": "cgrj", "ec..77": "clrj", "ec..65": "clgrj",
    "ec..7e": "cij", "ec..7c": "cgij", "ec..7f": "clij", "ec..7d": "clgij",
}
# relative branch and save: the link register receives the next instruction's address
REL_CALL = {"a7.5": "bras", "c0.5": "brasl"}
# absolute branches: taken, the pc is already right; not taken, it is slot + length
ABS_BRANCH = {
    "07": "bcr", "47": "bc", "06": "bctr", "46": "bct", "b9.46": "bctgr", "e3..46": "bctg",
    "86": "bxh", "87": "bxle", "eb..44": "bxhg", "eb..45": "bxleg", "e3..47": "bic",
    "ec..e4": "cgrb", "ec..e5": "clgrb", "ec..f6": "crb", "ec..f7": "clrb",
    "ec..fc": "cgib", "ec..fd": "clgib", "ec..fe": "cib", "ec..ff": "clib",
}
# absolute branch and save (bal/balr store the same 64-bit link as bas/basr in 64-bit mode)
ABS_CALL = {"0d": "basr", "05": "balr", "4d": "bas", "45": "bal"}
# relative-long operands (RIL-b/c): memory at pc + 2 * imm32
REL_LONG = {
    "c4.2": "llhrl", "c4.4": "lghrl", "c4.5": "lhrl", "c4.6": "llghrl", "c4.7": "sthrl",
    "c4.8": "lgrl", "c4.b": "stgrl", "c4.c": "lgfrl", "c4.d": "lrl", "c4.e": "llgfrl",
    "c4.f": "strl", "c6.2": "pfdrl", "c6.4": "cghrl", "c6.5": "chrl", "c6.6": "clghrl",
    "c6.7": "clhrl", "c6.8": "cgrl", "c6.a": "clgrl", "c6.c": "cgfrl", "c6.d": "crl",
    "c6.e": "clgfrl", "c6.f": "clrl",
}
EXECUTE = {"44": "ex", "c6.0": "exrl"}

# Plain instructions that are emulated (entry/exit code and the most common moves);
# everything else plain is boosted.  See emulate.py for the semantics.
EMULATED_PLAIN = {
    "eb..24": "stmg", "eb..04": "lmg", "b9.04": "lgr", "18": "lr", "41": "la",
    "e3..71": "lay", "a7.9": "lghi", "a7.8": "lhi", "a7.b": "aghi", "a7.a": "ahi",
    "e3..24": "stg", "e3..04": "lg", "b9.02": "ltgr", "12": "ltr", "b9.14": "lgfr",
    "a7.f": "cghi", "a7.e": "chi", "b9.20": "cgr", "19": "cr", "b9.21": "clgr",
    "15": "clr", "ec..d9": "aghik", "ec..d8": "ahik", "50": "st", "58": "l",
}


STACK_STORES = ("stmg", "stg", "st")


@dataclass(frozen=True, slots=True)
class Plan:
    """What the fixup, boost and emulation code needs to know about one instruction."""

    op: str  # mnemonic family, e.g. "brc", "basr", "lgrl", "plain"
    kind: str  # class: rel-branch, rel-call, abs-branch, abs-call, larl, rel-long, ...
    link: int | None = None  # register receiving the next instruction's address
    target: int | None = None  # static target: relative branch or relative-long operand
    imm_at: int = 2  # where the signed halfword-count immediate sits (rebasing)


def _wrapped(insn: Insn, k: str, target: int) -> Analysis:
    """A relative-long operand (or EXRL target) whose address wraps around the 64-bit
    address space: code in the lowest 4 GiB naming the highest 4 GiB, or the reverse.

    The CPU wraps the address, so in place the instruction reads the top (or bottom) of
    the address space.  Out of line, the displacement would have to be re-based from a
    slot within 4 GiB of that wrapped address, where UBP never places an XOL area (it
    maps them next to the probed code), and emulation needs that slot as its fallback
    when the operand does not read.  Only inline single-stepping runs it where it is;
    pfdrl, a prefetch that never faults, is also emulated as nothing."""
    plan = Plan(REL_LONG.get(k) or EXECUTE[k], "execute" if k in EXECUTE else "rel-long",
                target=target)
    strategies = {E, IN} if plan.op == "pfdrl" else {IN}
    return Analysis(insn, frozenset(strategies), None, plan.kind, plan)


def analyze(insn: Insn) -> Analysis:
    raw = insn.raw
    a = insn.address
    k = _opkey(raw)
    reason = REFUSALS.get(k)
    if reason is not None:
        return Analysis(insn, frozenset(), reason, "refused")
    if k == "b9.8d":
        # epsw copies the PSW mask, whose PER bit a single-step sets: only a boost
        # (no step) shows the program its own PSW
        return Analysis(insn, frozenset({B}), None, "psw", Plan("epsw", "psw"))
    if k in REL_BRANCH:
        off = 2 * (f.i32(raw) if k in ("c0.4", "cc.6") else f.i16(raw))
        target = (a + off) & f.MASK64
        return Analysis(insn, frozenset({E, S, IN}), None, "rel-branch",
                        Plan(REL_BRANCH[k], "rel-branch", target=target))
    if k in REL_CALL:
        off = 2 * (f.i32(raw) if k == "c0.5" else f.i16(raw))
        return Analysis(insn, frozenset({E, S, IN}), None, "rel-call",
                        Plan(REL_CALL[k], "rel-call", link=f.r1(raw),
                             target=(a + off) & f.MASK64))
    if k in ABS_BRANCH:
        op = ABS_BRANCH[k]
        never = (op == "bcr" and (f.r2(raw) == 0 or f.r1(raw) == 0)) or \
                (op == "bc" and f.r1(raw) == 0)
        if never:
            # mask 0 or no target register: never branches (nop, serialization)
            return Analysis(insn, frozenset({E, B, S, IN}), None, "nop", Plan(op, "nop"))
        emulated = op != "bic"  # bic loads its target from memory (z14): stepped
        return Analysis(insn, frozenset({E, S, IN} if emulated else {S, IN}), None,
                        "abs-branch", Plan(op, "abs-branch"))
    if k in ABS_CALL:
        return Analysis(insn, frozenset({E, S, IN}), None, "abs-call",
                        Plan(ABS_CALL[k], "abs-call", link=f.r1(raw)))
    if k == "c0.0":
        target = (a + 2 * f.i32(raw)) & f.MASK64
        return Analysis(insn, frozenset({E, B, S, IN}), None, "larl",
                        Plan("larl", "larl", target=target))
    if k in REL_LONG or k == "c6.0":
        off = 2 * f.i32(raw)
        target = (a + off) & f.MASK64
        if not 0 <= a + off <= f.MASK64:
            return _wrapped(insn, k, target)
    if k in REL_LONG:
        # stepped and boosted with the displacement re-based for the slot, which must
        # then lie within reach of the operand.  Stores are not emulated: the page may
        # be read-only, which only the CPU can tell (a tracer's write goes through)
        emulated = REL_LONG[k] not in ("stgrl", "strl", "sthrl")
        return Analysis(insn, frozenset({E, B, S, IN} if emulated else {B, S, IN}), None,
                        "rel-long",
                        Plan(REL_LONG[k], "rel-long", target=target),
                        ssol_reach=REACH, ssol_near=target)
    if k in EXECUTE:
        op = EXECUTE[k]
        if op == "exrl":
            target = (a + 2 * f.i32(raw)) & f.MASK64
            return Analysis(insn, frozenset({S, IN}), None, "execute",
                            Plan(op, "execute", target=target),
                            ssol_reach=REACH, ssol_near=target)
        return Analysis(insn, frozenset({S, IN}), None, "execute", Plan(op, "execute"))
    if raw[0] == 0x0A:
        return Analysis(insn, frozenset({B, S, IN}), None, "syscall", Plan("svc", "syscall"))
    op = EMULATED_PLAIN.get(k)
    if op in STACK_STORES and (f.b2(raw) != 15 or (op != "stmg" and f.x2(raw) != 0)):
        op = None  # a store emulates only through the stack pointer (see emulate.py)
    if op is not None:
        return Analysis(insn, frozenset({E, B, S, IN}), None, "plain", Plan(op, "plain"))
    return Analysis(insn, frozenset({B, S, IN}), None, "plain", Plan("plain", "plain"))
