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

from ubp_core.rendezvous import CLOSED, LOCK, REGS, REQUEST, SITE, STATE, TID
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
    tail = relocated(analyses, tramp + len(code))
    return tail if isinstance(tail, str) else bytes(code + tail)


def relocated(analyses: Sequence[Analysis], at: int) -> bytes | str:
    """The covered instructions re-based to run at ``at``, then the jump back to the
    instruction after them; or why they cannot be."""
    code = bytearray()
    for a in analyses:
        why = relocation_refusal(a)
        if why is not None:
            return why
        moved = _rebased(a.insn.raw, a.plan, a.insn.address, at + len(code))
        if moved is None:
            return f"{a.insn.mnemonic} {a.insn.op_str}: its rip-relative operand is out of reach"
        code += moved
    last = analyses[-1].insn
    back = _jmp_back(at + len(code), last.address + last.length)
    if back is None:
        return "the trampoline is out of reach of the site"
    return bytes(code + back)


def jump_patch(site: int, tramp: int, length: int) -> bytes | None:
    back = _jmp_back(site, tramp)
    if back is None:
        return None
    return back + b"\xcc" * (length - JUMP_SIZE)


# ---------------------------------------------------------------- rendezvous trampolines
# Registers in the mailbox are laid out as struct user_regs_struct (ubp_core.ptrace.regs),
# so UBP reads and writes them through the same UserRegs it uses for ptrace.
USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax",
             "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp")
REG_OFF = {name: 8 * i for i, name in enumerate(USER_REGS)}
REG_NUM = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7,
           **{f"r{n}": n for n in range(8, 16)}}
#: what the trampoline pushes before its first system call (a syscall clobbers rax, rcx
#: and r11; the futex calls load rdi, rsi, rdx and r10), from the top of the stack down
PUSHED = ("r11", "r10", "rdi", "rsi", "rdx", "rcx", "rax", "eflags")
#: kept in their registers throughout: stored from and loaded into them directly
UNTOUCHED = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r9", "r8")
SYS_FUTEX, SYS_GETTID = 202, 186
FUTEX_WAIT, FUTEX_WAKE, FUTEX_LOCK_PI, FUTEX_UNLOCK_PI = 0, 1, 6, 7
FUTEX_TID_MASK = 0x3FFFFFFF


class _Asm:
    """Just enough of an assembler for the trampoline: bytes plus rel32 label fixups."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []

    def emit(self, data: bytes | str) -> None:
        self.code += bytes.fromhex(data) if isinstance(data, str) else data

    def here(self) -> int:
        return self.base + len(self.code)

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def jump(self, opcode: str, name: str) -> None:
        """jmp/jcc rel32 to a label (opcode: "e9", "0f84" je, "0f85" jne)."""
        self.emit(opcode)
        self.fixups.append((len(self.code), name))
        self.emit(b"\0\0\0\0")

    def rip_rel(self, prefix: str, target: int) -> bool:
        """An instruction whose last four bytes are a rip-relative disp32 to target."""
        self.emit(prefix)
        rel = target - (self.here() + 4)
        if not _fits32(rel):
            return False
        self.emit((rel & 0xFFFFFFFF).to_bytes(4, "little"))
        return True

    def movabs(self, reg: str, value: int) -> None:
        n = REG_NUM[reg]
        self.emit(bytes([0x48 | (n >> 3), 0xB8 | (n & 7)]) + value.to_bytes(8, "little"))

    def store(self, base: str, disp: int, reg: str) -> None:
        """mov [base+disp32], reg (64-bit)."""
        self._modrm(0x89, reg, base, disp)

    def load(self, reg: str, base: str, disp: int) -> None:
        """mov reg, [base+disp32] (64-bit)."""
        self._modrm(0x8B, reg, base, disp)

    def _modrm(self, opcode: int, reg: str, base: str, disp: int) -> None:
        r, b = REG_NUM[reg], REG_NUM[base]
        rex = 0x48 | (4 if r >= 8 else 0) | (1 if b >= 8 else 0)
        short = -128 <= disp < 128
        out = bytes([rex, opcode, (0x40 if short else 0x80) | (r & 7) << 3 | (b & 7)])
        if b & 7 == 4:
            out += b"\x24"  # rsp/r12 as a base need a SIB byte
        self.emit(out + (disp & 0xFF).to_bytes(1, "little") if short
                  else out + (disp & 0xFFFFFFFF).to_bytes(4, "little"))

    def syscall(self) -> None:
        self.emit("b8" + SYS_FUTEX.to_bytes(4, "little").hex() + "0f05")  # mov eax, nr

    def finish(self) -> bytes:
        for at, name in self.fixups:
            rel = self.labels[name] - (at + 4)
            self.code[at:at + 4] = (rel & 0xFFFFFFFF).to_bytes(4, "little")
        return bytes(self.code)


def rendezvous_trampoline(analyses: Sequence[Analysis], tramp: int, counter: int,
                          mailbox: int, site_id: int, missed: int) -> bytes | str:
    """A trap-free probe whose handler runs in UBP, synchronously (ubp_core.rendezvous).

    The thread saves its registers into the mailbox shared with UBP, wakes UBP's
    rendezvous thread with a futex and sleeps on the mailbox's state word until UBP has
    run the handler; then it takes the (possibly changed) registers back, runs the
    relocated instructions and jumps back.  One mailbox serves every thread: its lock
    is a PI futex, whose owner word holds the owner's thread id (the hit's tid): taken
    in user space when free, by FUTEX_LOCK_PI when not.  A probe hit again by the owner
    itself -- from a signal handler that interrupted the rendezvous -- sees its own tid
    there and runs on as a counted miss instead of a deadlock (the kernel's kprobes
    count the same "missed" hits).
    """
    asm = _Asm(tramp)
    asm.emit(PROLOGUE)  # lea rsp,[rsp-128]; pushfq
    if not asm.rip_rel("f048ff05", counter):  # lock inc qword [rip+counter]: every entry
        return "the counter is out of rip-relative reach of the trampoline"
    for reg in reversed(PUSHED[:-1]):  # eflags is already pushed
        n = REG_NUM[reg]
        asm.emit(bytes([0x41, 0x50 | (n & 7)]) if n >= 8 else bytes([0x50 | n]))
    stack = {reg: 8 * i for i, reg in enumerate(PUSHED)}
    frame = 8 * len(PUSHED) + 128  # from rsp here back to the program's rsp

    asm.movabs("rdi", mailbox + LOCK)
    asm.emit(f"837f{STATE - LOCK:02x}{CLOSED:02x}")  # cmp dword [rdi+STATE], CLOSED
    asm.jump("0f84", "missed")
    # the PI-futex protocol's user-space fast path: lock word 0 -> our tid
    asm.emit("b8" + SYS_GETTID.to_bytes(4, "little").hex() + "0f05" "89c2")  # edx = tid
    asm.emit("8b0f" "81e1" + FUTEX_TID_MASK.to_bytes(4, "little").hex() + "39d1")
    asm.jump("0f84", "missed")  # the lock is our own: a nested hit (signal handler)
    asm.emit("31c0" "f00fb117")  # xor eax, eax; lock cmpxchg [rdi], edx
    asm.jump("0f84", "locked")
    asm.emit(f"be{FUTEX_LOCK_PI:02x}000000" "31d2" "4531d2")  # esi=op, edx=0, r10=NULL
    asm.syscall()
    asm.emit("85c0")  # test eax, eax: EDEADLK (our own lock: a nested hit), ESRCH ...
    asm.jump("0f85", "missed")
    asm.label("locked")

    # the registers, in user_regs_struct order, at mailbox+REGS
    asm.movabs("rdi", mailbox + REGS)
    for reg in UNTOUCHED:
        asm.store("rdi", REG_OFF[reg], reg)
    for reg in PUSHED:
        asm.load("rax", "rsp", stack[reg])
        asm.store("rdi", REG_OFF[reg], "rax")
    asm.emit("488d8424" + frame.to_bytes(4, "little").hex())  # lea rax, [rsp+frame]
    asm.store("rdi", REG_OFF["rsp"], "rax")
    site = analyses[0].insn.address
    asm.movabs("rax", site)
    asm.store("rdi", REG_OFF["rip"], "rax")
    asm.emit("48c7c0ffffffff")  # mov rax, -1: not in a system call
    asm.store("rdi", REG_OFF["orig_rax"], "rax")
    # the hit: its site and thread (the lock word holds our tid, maybe | FUTEX_WAITERS)
    asm.movabs("rdi", mailbox)
    asm.emit(f"8b47{LOCK:02x}" "25" + FUTEX_TID_MASK.to_bytes(4, "little").hex())
    asm.emit(f"8947{TID:02x}")  # mov [rdi+TID], eax
    asm.emit(f"c747{SITE:02x}" + site_id.to_bytes(4, "little").hex())

    # STATE := REQUEST unless UBP has closed the mailbox meanwhile
    asm.label("publish")
    asm.emit(f"8b47{STATE:02x}" f"83f8{CLOSED:02x}")  # mov eax,[rdi+STATE]; cmp eax,CLOSED
    asm.jump("0f84", "missed_locked")
    asm.emit(f"b9{REQUEST:02x}000000" f"f00fb14f{STATE:02x}")  # lock cmpxchg [..], ecx
    asm.jump("0f85", "publish")
    asm.emit(f"488d7f{STATE:02x}")  # lea rdi, [rdi+STATE]
    asm.emit(f"be{FUTEX_WAKE:02x}000000" "ba01000000")
    asm.syscall()
    asm.label("wait")  # until UBP answers (or closes): sleep while STATE == REQUEST
    asm.emit(f"833f{REQUEST:02x}")
    asm.jump("0f85", "answered")
    asm.emit(f"be{FUTEX_WAIT:02x}000000" f"ba{REQUEST:02x}000000" "4531d2")
    asm.syscall()
    asm.jump("e9", "wait")
    asm.label("answered")
    asm.emit(f"833f{CLOSED:02x}")  # closed before the handler ran: keep our registers
    asm.jump("0f84", "missed_locked")

    # the registers back, as the handler left them (pc and sp excepted)
    asm.movabs("rdi", mailbox + REGS)
    for reg in UNTOUCHED:
        asm.load(reg, "rdi", REG_OFF[reg])
    for reg in PUSHED:
        asm.load("rax", "rdi", REG_OFF[reg])
        asm.store("rsp", stack[reg], "rax")

    asm.label("unlock")  # user-space release when nobody waits, else FUTEX_UNLOCK_PI
    asm.movabs("rdi", mailbox + LOCK)
    asm.emit("8b07" "25" + FUTEX_TID_MASK.to_bytes(4, "little").hex() + "31c9" "f00fb10f")
    asm.jump("0f84", "done")
    asm.emit(f"be{FUTEX_UNLOCK_PI:02x}000000")
    asm.syscall()
    asm.label("done")
    for reg in PUSHED[:-1]:
        n = REG_NUM[reg]
        asm.emit(bytes([0x41, 0x58 | (n & 7)]) if n >= 8 else bytes([0x58 | n]))
    asm.emit(EPILOGUE)  # popfq; lea rsp,[rsp+128]
    tail = relocated(analyses, asm.here())
    if isinstance(tail, str):
        return tail
    asm.emit(tail)

    for name, after in (("missed", "done"), ("missed_locked", "unlock")):
        asm.label(name)
        if not asm.rip_rel("f048ff05", missed):
            return "the missed-hit counter is out of rip-relative reach of the trampoline"
        asm.jump("e9", after)
    return asm.finish()
