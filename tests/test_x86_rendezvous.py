"""The x86-64 rendezvous trampoline (trap-free probes with a handler), proved by
differential execution on unicorn.

For each site -- the benchmark's two and a sample of libc function entries -- the
covered instructions run twice from the same random registers: once in place (the
reference), once through the plugin's trampoline, with the kernel's futex and gettid
calls and UBP's side of the mailbox played by the syscall hook.  UBP's side checks that
the mailbox holds exactly the thread's registers at the site, then changes rbx as a
handler may.  After the jump back, every general register, the flags and the stack
from the red zone up must equal the reference's (with rbx changed before the covered
instructions ran).  Then the paths that must not run the handler: the lock already
ours (a signal handler hit the probe during a rendezvous), the mailbox closed before
and during the wait; and the contended paths through FUTEX_LOCK_PI / FUTEX_UNLOCK_PI.
"""

from __future__ import annotations

import random

import pytest

from ubp_core.errors import DecodeError
from ubp_core.fastcount import COUNTER_BYTES
from ubp_core.rendezvous import ANSWERED, CLOSED, LOCK, REGS, REQUEST, SITE, STATE, TID

unicorn = pytest.importorskip("unicorn")
from unicorn import x86_const as X  # noqa: E402

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15")
UC = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in GPRS}
TRAMP = 0x7000_0000
SHARED = 0x7010_0000  # counters, then the mailbox
STACK = 0x7100_0000
TLS = 0x7200_0000
MAILBOX = SHARED + COUNTER_BYTES
COUNTER, MISSED = SHARED + 8 * 5, SHARED + 8 * 6
OUR_TID, OTHER_TID = 4321, 999
FUTEX_WAITERS = 0x80000000
HANDLER_RBX = 0x5EED_0000_1234_5678
FLAGS_MASK = 0xCD5  # CF PF AF ZF SF DF OF


def _sites_from_libc(x86, libc: str, want: int) -> list[tuple[int, bytes]]:
    from ubp_core.elfinfo import ElfImage

    out = []
    with ElfImage(libc) as img:
        funcs = sorted({(s.address, s.size) for s in img.symbols if s.size >= 16})
        random.Random(11).shuffle(funcs)
        for address, size in funcs:
            try:
                out.append((address, img.read(address, min(size, 32))))
            except Exception:
                continue
            if len(out) >= want:
                break
    return out


def _covered(x86, address: int, code: bytes):
    analyses, covered = [], 0
    while covered < x86.fast_jump_size:
        insn = x86.decode(code[covered:], address + covered)
        analyses.append(x86.analyze(insn))
        covered += insn.length
    return analyses


class Machine:
    """One unicorn run with the kernel's and UBP's sides played by a syscall hook."""

    def __init__(self, code_at: int, code: bytes, regs: dict[str, int], flags: int,
                 lock: int = 0, state: int = 0, close_at_wake: bool = False,
                 contended_waiters: bool = False) -> None:
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        self.uc = uc
        # the code and, around it, what its rip-relative operands may read (zeros)
        low = max(0, (code_at & ~0xFFFF) - 0x400000)
        uc.mem_map(low, (code_at & ~0xFFFF) + 0x400000 - low)
        uc.mem_write(code_at, code)
        uc.mem_map(TRAMP, 0x10000)
        uc.mem_map(SHARED, COUNTER_BYTES + 0x1000)
        uc.mem_map(STACK, 0x10000)
        uc.mem_map(TLS, 0x1000)
        uc.reg_write(X.UC_X86_REG_FS_BASE, TLS)
        for name, value in regs.items():
            uc.reg_write(UC[name], value)
        uc.reg_write(X.UC_X86_REG_EFLAGS, flags)
        self.write32(MAILBOX + LOCK, lock)
        self.write32(MAILBOX + STATE, state)
        self.close_at_wake = close_at_wake
        self.contended_waiters = contended_waiters
        self.seen: dict[str, int] | None = None
        self.calls: list[str] = []
        uc.hook_add(unicorn.UC_HOOK_INSN, self._syscall, None, 1, 0, X.UC_X86_INS_SYSCALL)

    def read32(self, at: int) -> int:
        return int.from_bytes(self.uc.mem_read(at, 4), "little")

    def write32(self, at: int, value: int) -> None:
        self.uc.mem_write(at, value.to_bytes(4, "little"))

    def read64(self, at: int) -> int:
        return int.from_bytes(self.uc.mem_read(at, 8), "little")

    def _syscall(self, uc, _data) -> None:
        nr = uc.reg_read(X.UC_X86_REG_RAX)
        rdi, rsi, rdx = (uc.reg_read(r) for r in (X.UC_X86_REG_RDI, X.UC_X86_REG_RSI,
                                                     X.UC_X86_REG_RDX))
        result = self._kernel(nr, rdi, rsi & 0x7F, rdx)
        # what a real system call leaves behind: rcx and r11 clobbered
        uc.reg_write(X.UC_X86_REG_RCX, 0xDEAD_BEEF_0000_0001)
        uc.reg_write(X.UC_X86_REG_R11, 0xDEAD_BEEF_0000_0002)
        uc.reg_write(X.UC_X86_REG_RAX, result & (2**64 - 1))

    def _kernel(self, nr: int, uaddr: int, op: int, val: int) -> int:
        if nr == 186:
            self.calls.append("gettid")
            return OUR_TID
        assert nr == 202, f"unexpected system call {nr}"
        name = {0: "wait", 1: "wake", 6: "lock_pi", 7: "unlock_pi"}[op]
        self.calls.append(name)
        word = self.read32(uaddr)
        if op == 6:
            assert uaddr == MAILBOX + LOCK
            if word & 0x3FFFFFFF == OUR_TID:
                return -35  # EDEADLK
            # the owner let go and we were handed the lock (with others still waiting)
            self.write32(uaddr, OUR_TID | (FUTEX_WAITERS if self.contended_waiters else 0))
            return 0
        if op == 7:
            assert uaddr == MAILBOX + LOCK and word & 0x3FFFFFFF == OUR_TID
            self.write32(uaddr, 0)
            return 0
        if op == 1:
            assert uaddr == MAILBOX + STATE
            if word == REQUEST:
                self._ubp()
            return 1
        assert uaddr == MAILBOX + STATE
        assert word != val, "FUTEX_WAIT would sleep forever: nobody is left to answer"
        return -11  # EAGAIN

    def _ubp(self) -> None:
        """UBP's rendezvous thread: read the hit, run "the handler", answer."""
        if self.close_at_wake:
            self.write32(MAILBOX + STATE, CLOSED)
            return
        from ubp_core.ptrace.regs import UserRegs

        raw = bytearray(self.uc.mem_read(MAILBOX + REGS, 8 * len(UserRegs.names)))
        regs = UserRegs.from_buffer(raw)
        self.seen = {n: regs[n] for n in (*GPRS, "rip", "eflags")}
        self.seen["site"] = self.read32(MAILBOX + SITE)
        self.seen["tid"] = self.read32(MAILBOX + TID)
        regs["rbx"] = HANDLER_RBX
        self.uc.mem_write(MAILBOX + REGS, bytes(raw))
        self.write32(MAILBOX + STATE, ANSWERED)

    def run(self, start: int, until: int) -> None:
        self.uc.emu_start(start, until, count=20000)

    def state(self, rsp: int) -> dict[str, int]:
        """Registers, flags, and the stack from the red zone below ``rsp`` (the one
        at the site: below it is free for anyone, a signal frame or the trampoline)"""
        out = {n: self.uc.reg_read(UC[n]) for n in GPRS}
        out["flags"] = self.uc.reg_read(X.UC_X86_REG_EFLAGS) & FLAGS_MASK
        out["stack"] = bytes(self.uc.mem_read(rsp - 128, 512))
        return out


def _random_regs(rng: random.Random) -> tuple[dict[str, int], int]:
    regs = {n: rng.getrandbits(64) for n in GPRS}
    # pointers the covered instructions may use point into mapped memory
    for n in ("rsp", "rbp", "rdi", "rsi"):
        regs[n] = STACK + 0x8000 + rng.randrange(0, 0x100) * 8
    return regs, 0x202 | (rng.getrandbits(12) & FLAGS_MASK & ~0x400)


def _run_case(x86, address: int, code: bytes, rng: random.Random, *, lock: int = 0,
              state: int = 0, close_at_wake: bool = False, waiters: bool = False,
              handler_runs: bool = True):
    analyses = _covered(x86, address, code)
    covered = sum(a.insn.length for a in analyses)
    tramp = x86.rendezvous_trampoline(analyses, TRAMP, COUNTER, MAILBOX, 7, MISSED)
    if isinstance(tramp, str):
        return tramp
    regs, flags = _random_regs(rng)
    ref = Machine(address, code, {**regs, "rbx": HANDLER_RBX} if handler_runs else regs, flags)
    ref.run(address, address + covered)
    want = ref.state(regs["rsp"])

    m = Machine(address, code, regs, flags, lock=lock, state=state,
                close_at_wake=close_at_wake, contended_waiters=waiters)
    m.uc.mem_write(TRAMP, tramp)
    m.uc.mem_write(address, x86.jump_patch(address, TRAMP, covered))
    m.run(address, address + covered)
    got = m.state(regs["rsp"])
    assert got == want, (hex(address), [a.insn.text for a in analyses], m.calls,
                         {k: (hex(got[k]), hex(want[k])) for k in GPRS if got[k] != want[k]})
    assert m.read64(COUNTER) == 1  # every entry counts
    if handler_runs:
        assert m.seen is not None, m.calls
        expect = {n: regs[n] for n in GPRS}
        assert {n: m.seen[n] for n in GPRS} == expect
        assert m.seen["rip"] == address and m.seen["eflags"] & FLAGS_MASK == flags & FLAGS_MASK
        assert m.seen["site"] == 7 and m.seen["tid"] == OUR_TID
        assert m.read64(MISSED) == 0
    else:
        assert m.seen is None and m.read64(MISSED) == 1, m.calls
    return m


@pytest.fixture(scope="module")
def x86():
    from ubp_core.plugins import get_arch

    return get_arch("x86_64")


BENCH_SITES = {
    "push rbp; mov rbp, rsp": bytes.fromhex("554889e5488d47015dc3"),
    "lea rax, [rdi+1]; nop": bytes.fromhex("488d470190c3"),
}


@pytest.mark.parametrize("name", list(BENCH_SITES))
def test_every_path_of_the_trampoline(x86, name):
    code, rng = BENCH_SITES[name], random.Random(name)
    for _ in range(20):
        m = _run_case(x86, 0x401000, code, rng)
        assert m.calls == ["gettid", "wake"] and m.read32(MAILBOX + LOCK) == 0
        # contended: the lock is another thread's, the kernel hands it over
        m = _run_case(x86, 0x401000, code, rng, lock=OTHER_TID)
        assert m.calls == ["gettid", "lock_pi", "wake"] and m.read32(MAILBOX + LOCK) == 0
        m = _run_case(x86, 0x401000, code, rng, lock=OTHER_TID, waiters=True)
        assert m.calls == ["gettid", "lock_pi", "wake", "unlock_pi"]
        # our own lock (a signal handler's hit during a rendezvous): run on, missed
        m = _run_case(x86, 0x401000, code, rng, lock=OUR_TID, handler_runs=False)
        assert m.calls == ["gettid"] and m.read32(MAILBOX + LOCK) == OUR_TID
        m = _run_case(x86, 0x401000, code, rng, lock=OUR_TID | FUTEX_WAITERS,
                      handler_runs=False)
        # UBP closed the mailbox before, and while the thread waited
        m = _run_case(x86, 0x401000, code, rng, state=CLOSED, handler_runs=False)
        assert m.calls == []
        m = _run_case(x86, 0x401000, code, rng, close_at_wake=True, handler_runs=False)
        assert m.calls == ["gettid", "wake"] and m.read32(MAILBOX + LOCK) == 0


def test_libc_entries_relocate_exactly(x86, libc_x86):
    """Function entries of libc: every one the plugin accepts runs the same through the
    trampoline (and the handler saw the thread's registers); enough are accepted."""
    rng = random.Random(5)
    accepted = refused = 0
    for address, code in _sites_from_libc(x86, libc_x86, 400):
        try:
            result = _run_case(x86, address, code, rng)
        except DecodeError:
            continue
        if isinstance(result, str):
            refused += 1
        else:
            accepted += 1
    assert accepted > 150, (accepted, refused)
