"""What each PowerPC instruction needs to run away from its address.

Every refusal sits in a table with its reason (the Linux uprobes style); everything else
is accepted, with the strategies the reference CPUs prove correct for it.  Decisions are
made from the instruction bits, never from capstone's groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from ubp_core.types import Analysis, Insn, Strategy

from . import emulate, prefixed
from .encoding import aa, addpcis_d, bd, bits, li, lk, opcode, rt, spr, xo10

E, B, S, IN = Strategy.EMULATE, Strategy.BOOST, Strategy.SSOL, Strategy.INLINE

# ---------------------------------------------------------------------------- refusals
TRAP = ("a trap instruction raises SIGTRAP when its condition holds, which cannot be told "
        "apart from the breakpoint or the single-step trap")
SYSCALL = ("a system call may not come back to the next instruction (sigreturn, exit, "
           "exec, a clone child starting after it in the XOL slot)")
PRIVILEGED = "a privileged instruction: a program never executes it successfully"
RFI = "a return-from-interrupt form: it loads the pc and machine state from registers"
POWER = "a power-management instruction: privileged, it stops the processor"
STCX = ("store-conditional: a breakpoint trap between load-reserve and store-conditional "
        "clears the reservation on every pass, so the store always fails and the "
        "program's retry loop never ends")
INSIDE_ATOMIC = ("inside a load-reserve/store-conditional sequence: a breakpoint trap here "
                 "clears the reservation on every pass, so the store-conditional always "
                 "fails and the program's retry loop never ends")

# primary opcode -> reason
REFUSED_PRIMARY: dict[int, str] = {2: TRAP, 3: TRAP}
# (primary, extended opcode) -> reason
REFUSED_XO: dict[tuple[int, int], str] = {
    (31, 4): TRAP, (31, 68): TRAP,  # tw, td
    (19, 18): RFI, (19, 50): RFI, (19, 51): RFI, (19, 38): RFI, (19, 274): RFI,
    (19, 306): RFI, (19, 82): RFI, (19, 146): RFI,  # rfid rfi rfci rfmci hrfid urfid rfscv rfebb
    (19, 370): POWER, (19, 402): POWER, (19, 434): POWER, (19, 466): POWER,
    (19, 498): POWER,  # stop doze nap sleep rvwinkle
    (31, 146): PRIVILEGED, (31, 178): PRIVILEGED, (31, 83): PRIVILEGED,  # mtmsr mtmsrd mfmsr
    (31, 306): PRIVILEGED, (31, 274): PRIVILEGED, (31, 566): PRIVILEGED,  # tlbie tlbiel tlbsync
    (31, 434): PRIVILEGED, (31, 498): PRIVILEGED, (31, 402): PRIVILEGED,  # slbie slbia slbmte
    (31, 851): PRIVILEGED, (31, 915): PRIVILEGED,  # slbmfev slbmfee
    (31, 210): PRIVILEGED, (31, 242): PRIVILEGED, (31, 595): PRIVILEGED,
    (31, 659): PRIVILEGED,  # mtsr mtsrin mfsr mfsrin
    (31, 131): PRIVILEGED, (31, 163): PRIVILEGED,  # wrtee wrteei
    (31, 323): PRIVILEGED, (31, 451): PRIVILEGED,  # mfdcr mtdcr
    (31, 206): PRIVILEGED, (31, 238): PRIVILEGED,  # msgsnd msgclr
    (31, 150): STCX, (31, 214): STCX, (31, 182): STCX, (31, 694): STCX, (31, 726): STCX,
}
LARX = frozenset({20, 84, 52, 116, 276})  # lwarx ldarx lbarx lharx lqarx (primary 31)
MTSPR, MFSPR, MFTB, DARN = 467, 339, 371, 755
TIME_BASE_SPRS = frozenset({268, 269})
#: larx/stcx. sequences are short; GDB looks 16 instructions ahead for the stcx.
ATOMIC_WINDOW = 16


@dataclass(frozen=True, slots=True)
class Plan:
    """What the fixup, boost and emulation code needs to know about one instruction."""

    op: str  # see classify(); "plain" needs nothing but pc += correction
    words: tuple[int, ...]
    link: bool = False  # sets LR = address + 4 (taken or not)
    absolute: bool = False  # b/bc with AA=1: the target is not relative to the pc
    target: int | None = None  # b/bc target (relative branches resolved)
    bo: int = 0
    bi: int = 0
    rt: int = 0  # addpcis / pla result register
    value: int = 0  # addpcis / pla: the result in place
    pcrel: prefixed.Prefixed | None = None  # prefixed pc-relative load/store/paddi
    emu: str | None = None  # key of the emulation routine


def _branch_ok(bo: int) -> bool:
    """bcctr may not decrement CTR (an invalid form whose outcome is undefined)."""
    return bool(bo & 0b00100)


class Analyzer:
    """Turns a decoded instruction into an Analysis; stateless."""

    def __init__(self, word_bits: int, byteorder: str) -> None:
        self.word_bits = word_bits
        self.mask = (1 << word_bits) - 1
        self.byteorder = byteorder

    def words(self, raw: bytes) -> tuple[int, ...]:
        return tuple(int.from_bytes(raw[i:i + 4], self.byteorder) for i in range(0, len(raw), 4))

    def analyze(self, insn: Insn) -> Analysis:
        words = self.words(insn.raw)
        a = insn.address
        if len(words) == 2:
            return self._prefixed(insn, words)
        w = words[0]
        op = opcode(w)
        reason = REFUSED_PRIMARY.get(op)
        if op == 17:
            reason = SYSCALL
        if reason is None and op in (19, 31):
            reason = REFUSED_XO.get((op, xo10(w)))
        if reason is None and op == 31 and xo10(w) in (MTSPR, MFSPR) and spr(w) & 0x10:
            reason = PRIVILEGED  # SPRs with this bit of their number set are privileged
        if reason is not None:
            kind = "store-conditional" if reason is STCX else "refused"
            return Analysis(insn, frozenset(), reason, kind)
        nxt = (a + 4) & self.mask
        if op == 18:
            disp = li(w)
            target = (disp if aa(w) else a + disp) & self.mask
            plan = Plan("b", words, link=lk(w), absolute=aa(w), target=target, bo=0b10100)
            return Analysis(insn, frozenset({E, S, IN}), None, "branch", plan)
        if op == 16:
            disp = bd(w)
            target = (disp if aa(w) else a + disp) & self.mask
            plan = Plan("bc", words, link=lk(w), absolute=aa(w), target=target,
                        bo=rt(w), bi=bits(w, 11, 15))
            return Analysis(insn, frozenset({E, S, IN}), None, "branch", plan)
        if op == 19 and xo10(w) in (16, 528, 560):
            name = {16: "bclr", 528: "bcctr", 560: "bctar"}[xo10(w)]
            bo = rt(w)
            if name != "bclr" and not _branch_ok(bo):
                return Analysis(insn, frozenset(), f"{name} with a CTR decrement is an "
                                "invalid form: its outcome is undefined", "refused")
            plan = Plan(name, words, link=lk(w), bo=bo, bi=bits(w, 11, 15))
            strategies = {E, S, IN} if name != "bctar" else {S, IN}  # TAR is not visible
            return Analysis(insn, frozenset(strategies), None, "branch", plan)
        if op == 19 and (w >> 1) & 0x1F == 2:  # addpcis / lnia: RT = next pc + D << 16
            value = (nxt + (addpcis_d(w) << 16)) & self.mask
            plan = Plan("addpcis", words, rt=rt(w), value=value)
            return Analysis(insn, frozenset({E, S, IN}), None, "pc-relative", plan)
        if op == 31 and xo10(w) in LARX:
            # a boost runs it and goes on to the store-conditional without a trap in
            # between, so the reservation holds; a step would trap right after it
            plan = Plan("larx", words)
            return Analysis(insn, frozenset({B}), None, "load-reserve", plan)
        volatile: frozenset[str] = frozenset()
        if op == 31 and (xo10(w) == MFTB or (xo10(w) == MFSPR and spr(w) in TIME_BASE_SPRS)
                         or xo10(w) == DARN):
            volatile = frozenset({f"r{rt(w)}"})  # the time base / a random number
        key = emulate.key(w, self.word_bits)
        strategies = {B, S, IN} | ({E} if key else set())
        kind = "nop" if key == "nop" else "plain"
        return Analysis(insn, frozenset(strategies), None, kind, Plan("plain", words, emu=key),
                        volatile)

    def _prefixed(self, insn: Insn, words: tuple[int, ...]) -> Analysis:
        a = insn.address
        if a % 64 == 60:
            return Analysis(insn, frozenset(), "a prefixed instruction that crosses a 64-byte "
                            "boundary raises an alignment interrupt in place; a copy in an "
                            "XOL slot would not", "refused")
        p = prefixed.decode(*words)
        assert p is not None  # decode() accepted it
        if not p.pcrel:
            return Analysis(insn, frozenset({B, S, IN}), None, "prefixed", Plan("plain", words))
        target = (a + p.d34) & self.mask
        if p.name == "paddi":  # pla: the result is the address itself
            plan = Plan("pla", words, rt=p.rt, value=target, pcrel=p)
            return Analysis(insn, frozenset({E, S, IN}), None, "pc-relative", plan)
        # a load/store whose address is relative to the pc: the copy gets its displacement
        # re-based, so the slot must lie within the 34-bit reach of the operand
        plan = Plan("pcrel", words, pcrel=p, target=target)
        return Analysis(insn, frozenset({B, S, IN}), None, "pc-relative", plan,
                        ssol_reach=1 << 33, ssol_near=target)


XO_MASK = 0xFC0007FE  # primary opcode and 10-bit extended opcode
LARX_KEYS = frozenset(31 << 26 | xo << 1 for xo in LARX)
STCX_KEYS = frozenset(31 << 26 | xo << 1 for (p, xo), why in REFUSED_XO.items() if why is STCX)


def in_atomic_sequence(address: int, read_words) -> bool:
    """True when ``address`` lies after a load-reserve and up to its store-conditional.

    ``read_words(address, count, keep_end)`` returns up to ``count`` instruction words
    from ``address``, fewer where the code ends (``keep_end``: the words nearest the
    end of the window survive).  Looks back for a larx with no
    stcx. in between, then forward from it for the stcx. (GDB's window of 16).
    """
    lo = max(0, address - 4 * ATOMIC_WINDOW)
    before = read_words(lo, (address - lo) // 4, True)
    lo = address - 4 * len(before)
    larx_at = None
    for i in range(len(before) - 1, -1, -1):
        k = before[i] & XO_MASK
        if k in LARX_KEYS:
            larx_at = lo + 4 * i
            break
        if k in STCX_KEYS:
            return False
    if larx_at is None:
        return False
    ahead = read_words(address, ATOMIC_WINDOW - (address - larx_at) // 4 + 1)
    return any(w & XO_MASK in STCX_KEYS for w in ahead)
