"""What each x86-64 instruction needs to run away from its address.

Every refusal sits in one table with its reason (the Linux uprobes style); everything
else is accepted, with the strategies that the reference CPUs prove correct for it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from ubp_core.types import Analysis, Insn, Strategy

from .layout import SEGMENT_PREFIXES, Layout, LayoutError, parse

E, B, S, IN = Strategy.EMULATE, Strategy.BOOST, Strategy.SSOL, Strategy.INLINE

# ---------------------------------------------------------------------------- refusals
# (map, opcode, modrm test) -> reason.  A modrm test is None (any), or (mod_is_reg,
# reg) where either part may be None.
REFUSALS: list[tuple[int, int, tuple[bool | None, int | None] | None, str]] = [
    (0, 0xCC, None, "int3 is a breakpoint instruction itself"),
    (0, 0xCD, None, "int n raises its signal after the instruction, indistinguishable "
                    "from the single-step trap"),
    (0, 0xF1, None, "int1 (icebp) raises a debug trap indistinguishable from the "
                    "single-step trap"),
    (0, 0xCF, None, "iret reloads the flags, trap flag included, from the stack; "
                    "the single-step trap around it is not reliable"),
    (0, 0x8E, (None, 2), "mov to ss holds off the single-step trap for one instruction"),
    (0, 0xC7, (True, 7), "xbegin's abort address is relative to where it runs and is "
                         "used long after the step"),
    (1, 0x34, None, "sysenter returns through the 32-bit vDSO, never to the next "
                    "instruction"),
    (1, 0x78, None, "0f 78 is vmread on Intel and extrq/insertq on AMD, with different "
                    "lengths: no decoder can know how much to copy"),
    (1, 0x79, None, "0f 79 is vmwrite on Intel and extrq/insertq on AMD, with different "
                    "lengths: no decoder can know how much to copy"),
]

# Registers whose value after the instruction is not reproducible run to run.
VOLATILE = {
    (1, 0x31): frozenset({"rax", "rdx"}),  # rdtsc
    (1, 0x33): frozenset({"rax", "rdx"}),  # rdpmc
}

CONDITION_NAMES = ("o", "no", "b", "ae", "e", "ne", "be", "a",
                   "s", "ns", "p", "np", "l", "ge", "le", "g")

GPR64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

# Scratch registers for rewriting rip-relative operands: encodable in ModRM.rm without
# REX.B and without a SIB byte (so not rsp), least likely to be implicit operands first.
SCRATCH_ORDER = ("rsi", "rdi", "rbx", "rcx", "rbp", "rdx", "rax")
SCRATCH_CODE = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rbp": 5, "rsi": 6, "rdi": 7}


@dataclass(frozen=True, slots=True)
class Plan:
    """What the fixup, boost and emulation code needs to know about one instruction."""

    layout: Layout
    op: str  # operation class: see classify()
    absolute: bool = False  # after an out-of-line step the pc is already right
    call: bool = False  # pushes a return address that must be corrected
    target: int | None = None  # relative branch/call target
    cond: int | None = None  # jcc condition / loop kind
    reg: str | None = None  # register operand of push/pop/jmp/call
    imm: int = 0
    ssol_code: bytes | None = None  # rip-relative operand rewritten onto ``scratch``
    scratch: str | None = None
    rep: bool = False  # iterates: a single-step may stop before it finishes
    tf_fix: bool = False  # pushes the flags image (the single-step TF leaks into it)
    fip: bool = False  # x87 non-control instruction: sets the FPU instruction pointer
    rebase: bool = False  # SSOL re-bases the rip-relative displacement (slot in reach)
    mem: tuple[str | None, str | None, int, int] | None = None  # base, index, scale, disp


def _int(raw: bytes) -> int:
    return int.from_bytes(raw, "little", signed=True)


def _gpr_family(name: str) -> str | None:
    """Map a capstone register name (eax, r9d, sil, ah ...) to its 64-bit register."""
    n = name.lower()
    if n in GPR64:
        return n
    table = {
        "eax": "rax", "ax": "rax", "al": "rax", "ah": "rax",
        "ecx": "rcx", "cx": "rcx", "cl": "rcx", "ch": "rcx",
        "edx": "rdx", "dx": "rdx", "dl": "rdx", "dh": "rdx",
        "ebx": "rbx", "bx": "rbx", "bl": "rbx", "bh": "rbx",
        "esp": "rsp", "sp": "rsp", "spl": "rsp", "ebp": "rbp", "bp": "rbp", "bpl": "rbp",
        "esi": "rsi", "si": "rsi", "sil": "rsi", "edi": "rdi", "di": "rdi", "dil": "rdi",
    }
    if n in table:
        return table[n]
    if n.startswith("r") and n[1:].rstrip("dwb").isdigit():
        return "r" + n[1:].rstrip("dwb")
    return None


class Analyzer:
    """Turns a decoded instruction into an Analysis (stateless apart from capstone)."""

    def __init__(self) -> None:
        self._detail = Cs(CS_ARCH_X86, CS_MODE_64)
        self._detail.detail = True

    # ------------------------------------------------------------------ refusal table
    @staticmethod
    def _refusal(lay: Layout) -> str | None:
        mod_is_reg = None if lay.modrm is None else lay.modrm >> 6 == 3
        for op_map, opcode, test, reason in REFUSALS:
            if lay.map != op_map or lay.opcode != opcode or lay.vex is not None:
                continue
            if test is not None:
                want_reg, want_digit = test
                if lay.modrm is None:
                    continue
                if want_reg is not None and want_reg != mod_is_reg:
                    continue
                if want_digit is not None and want_digit != lay.reg:
                    continue
                if opcode == 0xC7 and lay.rm != 0:  # c7 f8: only xbegin, not mov
                    continue
            return reason
        return None

    # ------------------------------------------------------------------ main entry
    def analyze(self, insn: Insn) -> Analysis:
        raw = insn.raw
        try:
            lay = parse(raw, len(raw))
        except LayoutError as exc:
            return Analysis(insn, frozenset(), f"unparsable encoding: {exc}", "invalid")
        reason = self._refusal(lay)
        if reason is not None:
            return Analysis(insn, frozenset(), reason, "refused")
        if lay.has(0x66) and lay.vex is None and lay.map in (0, 1) and _relative_branch(lay):
            return Analysis(insn, frozenset(), "an operand-size prefix on a relative branch "
                            "truncates the target to 16 bits on some CPUs (AMD), so the "
                            "result depends on where it runs", "rel-branch")
        plan, kind, strategies = self._classify(insn, lay)
        if lay.rip_relative:
            plan, strategies, reason = self._rip_relative(insn, lay, plan, strategies)
            if reason is not None:
                return Analysis(insn, frozenset(), reason, "rip-relative")
            kind = kind if kind != "plain" else "rip-relative"
        volatile = VOLATILE.get((lay.map, lay.opcode), frozenset()) if lay.vex is None else frozenset()
        if lay.map == 1 and lay.opcode == 0x01 and lay.modrm == 0xF9:
            volatile = frozenset({"rax", "rdx", "rcx"})  # rdtscp
        if lay.map == 1 and lay.opcode == 0xC7 and lay.mod == 3 and lay.reg in (6, 7) \
                and lay.vex is None and not lay.has(0xF3):
            # rdrand / rdseed: the destination and CF
            volatile = frozenset({GPR64[lay.rm + (8 if lay.rex_b else 0)], "eflags"})
        faults = kind == "undefined"
        reach, near = 0, None
        if plan.rebase:  # the slot must reach the operand
            assert lay.disp_off is not None
            disp = int.from_bytes(raw[lay.disp_off:lay.disp_off + 4], "little", signed=True)
            reach, near = 1 << 31, (insn.address + insn.length + disp) & ((1 << 64) - 1)
        touches = kind in ("push", "pop", "ret") or plan.call or plan.mem is not None
        return Analysis(insn, frozenset(strategies), None, kind, plan, volatile, faults,
                        reach, near, emulation_touches_memory=touches)

    # ------------------------------------------------------------------ classification
    def _classify(self, insn: Insn, lay: Layout) -> tuple[Plan, str, set[Strategy]]:
        raw, a, n = insn.raw, insn.address, insn.length
        op, m = lay.opcode, lay.map
        pre = set(lay.prefixes)
        odd_prefix = bool(pre - {0x2E, 0x3E, 0xF2})  # branch hints, bnd: harmless
        vex = lay.vex is not None
        rex_b = 8 if lay.rex_b else 0
        nxt = a + n

        def rel(size: int) -> int:
            return (nxt + _int(raw[n - size:n])) & ((1 << 64) - 1)

        if not vex and m == 0:
            if 0x70 <= op <= 0x7F:
                return self._branch(lay, "jcc", rel(1), op & 15, odd_prefix)
            if op in (0xEB, 0xE9):
                return self._branch(lay, "jmp", rel(1 if op == 0xEB else 4), None, odd_prefix)
            if op == 0xE8:
                plan = Plan(lay, "call", call=True, target=rel(4))
                return plan, "call", ({E, S, IN} if not odd_prefix else {S, IN})
            if 0xE0 <= op <= 0xE3:
                odd = odd_prefix or lay.has(0x67)
                return self._branch(lay, "loop", rel(1), op - 0xE0, odd)
            if op in (0xC3, 0xC2):
                imm = int.from_bytes(raw[n - 2:n], "little") if op == 0xC2 else 0
                plan = Plan(lay, "ret", absolute=True, imm=imm)
                ok_e = not (pre - {0xF2}) and not lay.rex_w
                return plan, "ret", ({E, S, IN} if ok_e else {S, IN})
            if op in (0xCA, 0xCB):
                return Plan(lay, "far-ret", absolute=True), "far-transfer", {S, IN}
            if 0x50 <= op <= 0x57 and not pre:
                return Plan(lay, "push", reg=GPR64[op - 0x50 + rex_b]), "push", {E, B, S, IN}
            if 0x58 <= op <= 0x5F and not pre:
                return Plan(lay, "pop", reg=GPR64[op - 0x58 + rex_b]), "pop", {E, B, S, IN}
            if op in (0x68, 0x6A) and not pre:
                imm = _int(raw[n - (1 if op == 0x6A else 4):n])
                return Plan(lay, "push-imm", imm=imm), "push", {E, B, S, IN}
            if op == 0x90 and not lay.rex_b and not (pre - {0x66, 0xF3}):
                return Plan(lay, "nop"), "nop", {E, B, S, IN}
            if op == 0x9C:
                return Plan(lay, "pushf", tf_fix=True), "flags", {B, S, IN}
            if op == 0x9D:
                # popf may set TF: out of line the trap would fire after the jump back
                return Plan(lay, "popf"), "flags", {S, IN}
            if op == 0xFF and lay.reg in (2, 3, 4, 5):
                return self._indirect(raw, lay, odd_prefix)
            if op in (0xA4, 0xA5, 0xA6, 0xA7, 0xAA, 0xAB, 0xAC, 0xAD, 0xAE, 0xAF) \
                    and (pre & {0xF2, 0xF3}):
                return Plan(lay, "rep", rep=True), "string-rep", {B, S, IN}
            if 0xD8 <= op <= 0xDF:
                if _x87_control(lay):
                    return Plan(lay, "x87-control"), "x87", {B, S, IN}
                # the FPU records the address of the last x87 instruction (FIP): out of
                # line it records the slot; a step can correct it, a boost cannot
                return Plan(lay, "x87", fip=True), "x87", {S, IN}

        if not vex and m == 1:
            if 0x80 <= op <= 0x8F:
                return self._branch(lay, "jcc", rel(4), op & 15, odd_prefix)
            if op == 0x05:
                return Plan(lay, "syscall"), "syscall", {S, IN}
            if op == 0x1F and not (pre - {0x66}):
                return Plan(lay, "nop"), "nop", {E, B, S, IN}
            if op == 0x1E and lay.has(0xF3) and lay.modrm in (0xFA, 0xFB) \
                    and not (pre - {0xF3}) and not lay.rex:
                return Plan(lay, "nop"), "nop", {E, B, S, IN}  # endbr64 / endbr32
            if op in (0x0B, 0xB9, 0xFF):
                return Plan(lay, "ud"), "undefined", {B, S, IN}
        if _umip(lay):
            # with UMIP the kernel emulates these after a #GP, and a single-step trap
            # gets lost in the emulation: the step runs on into whatever follows
            return Plan(lay, "umip"), "umip", {B}
        if _privileged(lay):
            # faults in user mode: identical wherever it runs (a fault at the probe)
            rep = lay.map == 0 and 0x6C <= op <= 0x6F and bool(pre & {0xF2, 0xF3})
            return Plan(lay, "privileged", rep=rep), "privileged", {B, S, IN}
        return Plan(lay, "plain"), "plain", {B, S, IN}

    @staticmethod
    def _branch(lay: Layout, op: str, target: int, cond: int | None,
                odd_prefix: bool) -> tuple[Plan, str, set[Strategy]]:
        plan = Plan(lay, op, target=target, cond=cond)
        # operand-size/segment prefixes change how a branch truncates its target:
        # leave those to the CPU
        return plan, "rel-branch", ({S, IN} if odd_prefix else {E, S, IN})

    @staticmethod
    def _indirect(raw: bytes, lay: Layout, odd_prefix: bool) -> tuple[Plan, str, set[Strategy]]:
        digit = lay.reg
        far = digit in (3, 5)
        call = digit in (2, 3)
        op = ("call-ind" if digit == 2 else "far-call" if digit == 3
              else "jmp-ind" if digit == 4 else "far-jmp")
        kind = "far-transfer" if far else ("indirect-call" if call else "indirect-branch")
        reg = mem = None
        if lay.mod == 3:
            reg = GPR64[lay.rm + (8 if lay.rex_b else 0)]
        elif not far:
            mem = _mem_operand(raw, lay)
        plan = Plan(lay, op, absolute=True, call=call, reg=reg, mem=mem)
        seg = bool(set(lay.prefixes) & (SEGMENT_PREFIXES - {0x3E, 0x2E}))
        emulable = not far and not odd_prefix and not seg and (reg is not None or mem is not None)
        return plan, kind, ({E, S, IN} if emulable else {S, IN})

    # ------------------------------------------------------------------ rip-relative
    def _rip_relative(self, insn: Insn, lay: Layout, plan: Plan,
                      strategies: set[Strategy]) -> tuple[Plan, set[Strategy], str | None]:
        """Choose a scratch register and pre-build the rewritten SSOL copy.

        The ModRM becomes mod=10 rm=scratch, so [rip+disp32] turns into
        [scratch+disp32] with scratch loaded with the original address of the next
        instruction: the same length, the same address, from any slot.
        """
        if plan.fip:
            # x87: the FPU records this instruction's opcode and ModRM (FOP); a rewrite
            # would show there, so re-base the displacement from a slot within reach
            return replace(plan, rebase=True), strategies, None
        used = self._registers_used(insn)
        scratch = next((r for r in SCRATCH_ORDER if r not in used), None)
        if scratch is None:
            if strategies & {B, E}:
                return plan, strategies - {S}, None
            return plan, set(), "rip-relative operand and every scratch register is in use"
        code = bytearray(insn.raw)
        assert lay.modrm_off is not None
        code[lay.modrm_off] = 0x80 | (lay.modrm & 0x38) | SCRATCH_CODE[scratch]
        if lay.rex_off is not None:
            code[lay.rex_off] &= ~1 & 0xFF  # REX.B would select r8..r15
        if lay.vex in ("vex3", "xop", "evex"):
            assert lay.vex_off is not None
            code[lay.vex_off + 1] |= 0x20  # ~B (inverted): 1 = no extension
        return replace(plan, ssol_code=bytes(code), scratch=scratch), strategies, None

    def _registers_used(self, insn: Insn) -> set[str]:
        used = {"rsp", "rax", "rdx"}  # stack, and the classic implicit operands
        try:
            ci = next(self._detail.disasm(insn.raw, insn.address, 1))
            read, written = ci.regs_access()
            for r in (*read, *written):
                fam = _gpr_family(ci.reg_name(r) or "")
                if fam:
                    used.add(fam)
        except (StopIteration, Exception):
            used.update(GPR64)
        return used


def _relative_branch(lay: Layout) -> bool:
    op = lay.opcode
    if lay.map == 0:
        return 0x70 <= op <= 0x7F or op in (0xE8, 0xE9, 0xEB) or 0xE0 <= op <= 0xE3
    return 0x80 <= op <= 0x8F


# Two-byte opcodes that need CPL 0 (they fault in a user program).
PRIVILEGED_2 = frozenset({0x06, 0x07, 0x08, 0x09, 0x20, 0x21, 0x22, 0x23, 0x30, 0x32, 0x35})
PRIVILEGED_0F01 = frozenset({0xC1, 0xC2, 0xC3, 0xC4, 0xC8, 0xC9, 0xCA, 0xCB, 0xCF, 0xD8,
                             0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xF8})


def _privileged(lay: Layout) -> bool:
    if lay.vex is not None:
        return False
    if lay.map == 0:
        return lay.opcode in (0xF4, 0xFA, 0xFB, 0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE,
                              0xEF, 0x6C, 0x6D, 0x6E, 0x6F)
    if lay.map != 1:
        return False
    if lay.opcode in PRIVILEGED_2:
        return True
    if lay.opcode == 0x00:
        return lay.reg in (2, 3)  # lldt, ltr
    if lay.opcode == 0x01 and lay.modrm is not None:
        if lay.mod == 3:
            return lay.modrm in PRIVILEGED_0F01
        return lay.reg in (2, 3, 6, 7)  # lgdt, lidt, lmsw, invlpg
    return False


def _umip(lay: Layout) -> bool:
    """sgdt, sidt, smsw, sldt, str: the instructions UMIP makes fault in user mode."""
    if lay.vex is not None or lay.map != 1 or lay.modrm is None:
        return False
    if lay.opcode == 0x01:
        return lay.reg in (0, 1, 4) and (lay.mod != 3 or lay.reg == 4)
    return lay.opcode == 0x00 and lay.reg in (0, 1)


def _x87_control(lay: Layout) -> bool:
    """x87 control instructions, which leave the FPU instruction pointer alone."""
    op, modrm = lay.opcode, lay.modrm
    if modrm is None:
        return False
    mem = modrm >> 6 != 3
    digit = (modrm >> 3) & 7
    return ((op == 0xD9 and mem and digit in (4, 5, 6, 7))
            or (op == 0xDD and mem and digit in (4, 6, 7))
            or (op == 0xDF and modrm == 0xE0)
            or (op == 0xDB and modrm in (0xE0, 0xE1, 0xE2, 0xE3, 0xE4)))  # feni fdisi fsetpm


def _mem_operand(raw: bytes, lay: Layout) -> tuple[str | None, str | None, int, int]:
    """(base, index, scale, disp) of a ModRM memory operand; base "rip" when rip-relative."""
    assert lay.modrm is not None
    disp = _int(raw[lay.disp_off:lay.disp_off + lay.disp_size]) if lay.disp_off is not None else 0
    if lay.rip_relative:
        return ("rip", None, 1, disp)
    rex_b = 8 if lay.rex & 1 else 0
    rex_x = 8 if lay.rex & 2 else 0
    base: str | None
    index: str | None = None
    scale = 1
    if lay.rm == 4:
        assert lay.sib_off is not None
        sib = raw[lay.sib_off]
        scale = 1 << (sib >> 6)
        idx = ((sib >> 3) & 7) + rex_x
        index = None if idx == 4 else GPR64[idx]
        b = sib & 7
        base = None if (b == 5 and lay.mod == 0) else GPR64[b + rex_b]
    else:
        base = GPR64[lay.rm + rex_b]
    return (base, index, scale, disp)
