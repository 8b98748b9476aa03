"""Return probes: a function's return, with its value and the call's duration.

At the function's entry (an ordinary probe) the return address is replaced by the
address of a trampoline -- an XOL slot holding only the breakpoint instruction -- and
the real one is pushed on a per-thread shadow stack.  The function returns into the
trampoline, traps, and the engine pops the frame, puts the pc at the real return address
and runs the return handlers.  One stop per call's return, no single-step.

Frames are matched by the stack pointer right after the return, so a longjmp or an
exception that skipped frames leaves stale frames that are dropped (never a wrong
return), recursion and tail calls stack up naturally, and before UBP lets go every
hijacked return address still in a stack (or link register) gets its real value back.
Where the return address lives and the sp after a return are the plugin's hooks
(ArchOps.hijack_return, sp_after_return, return_value); the defaults cover a pushed
return address (x86-64) and a link register (PowerPC lr, s390 r14).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import MemoryFault, TargetError

if TYPE_CHECKING:
    from .engine import Engine, Handler, Hit, Probe


@dataclass(eq=False)
class ReturnProbe:
    """A handler run at every return of the function whose entry is ``address``."""

    id: int
    address: int
    handler: Handler | None
    label: str
    enabled: bool = True
    hits: int = 0  # returns seen
    calls: int = 0  # entries seen
    entry: Probe | None = field(default=None, repr=False)
    removed: bool = False

    @property
    def strategy(self):
        return self.entry.strategy if self.entry else None


@dataclass(slots=True)
class Frame:
    probe: ReturnProbe
    ret: int  # the real return address
    sp_after: int  # the stack pointer right after the return
    t0: int  # time.monotonic_ns() at the entry
    args: tuple[int, ...]


def hijack(hit: Hit) -> None:
    """The entry probe's handler (bound to no engine: a forked copy uses it too)."""
    engine = hit.engine
    rp = hit.probe.returns
    if rp is None or rp.removed:
        return
    arch = engine.arch
    regs = hit.regs
    tramp = engine.returns.trampoline()
    read = engine.target.read_memory
    try:
        ret = arch.return_address(regs, read)
    except MemoryFault:
        return  # no readable return address: leave this call alone
    effect = arch.hijack_return(regs, tramp)
    for address, data in effect.mem:
        try:
            engine.target.write_memory(address, data)
        except MemoryFault:
            return
    regs.update(effect.regs)
    rp.calls += 1
    frame = Frame(rp, ret, arch.sp_after_return(regs), time.monotonic_ns(),
                  tuple(regs[r] for r in arch.abi.args))
    engine.returns.push(hit.tid, frame)


class Returns:
    """The return-probe state of one engine: trampoline and shadow stacks."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tramp: int | None = None
        self.stacks: dict[int, list[Frame]] = {}
        self.probes: list[ReturnProbe] = []
        self.lost = 0  # returns to the trampoline with no frame to match

    def trampoline(self) -> int:
        if self.tramp is None:
            engine = self.engine
            slot = engine.xol.slot(0, 0)
            bp = engine.arch.breakpoint
            engine.target.write_memory(slot, (bp * (engine.arch.xol_slot_size // len(bp) + 1))
                                       [:engine.arch.xol_slot_size])
            self.tramp = slot
        return self.tramp

    def push(self, tid: int, frame: Frame) -> None:
        stack = self.stacks.setdefault(tid, [])
        # a call at a shallower depth than the frames on top: a longjmp or an exception
        # unwound past them without returning.  At the same depth too, unless this call
        # returns into the trampoline (a tail call from a probed function, whose frame
        # is live): two calls made from one frame are never in flight together, so the
        # older one was left by a longjmp (without this, each longjmp out of a function
        # called from the setjmp's frame leaves a frame for good)
        while stack and (stack[-1].sp_after < frame.sp_after
                         or (stack[-1].sp_after == frame.sp_after and frame.ret != self.tramp)):
            stack.pop()
        stack.append(frame)

    def on_trampoline(self, tid: int, regs) -> bool:
        """A thread returned into the trampoline: back to the real return address."""
        engine = self.engine
        arch = engine.arch
        sp = regs[arch.abi.sp]
        stack = self.stacks.get(tid) or []
        while stack and stack[-1].sp_after < sp:
            stack.pop()  # frames a longjmp skipped
        if not stack:
            self.lost += 1
            raise TargetError(f"thread {tid} returned into the return-probe trampoline "
                              "with no call recorded: the real return address is unknown")
        frame = stack.pop()
        regs[arch.abi.pc] = frame.ret
        rp = frame.probe
        if rp.enabled and not rp.removed:
            rp.hits += 1
            if rp.handler is not None:
                from .engine import Hit

                hit = Hit(engine, tid, rp, regs)
                hit.frame = frame
                try:
                    if engine.handler_lock is None:
                        rp.handler(hit)
                    else:
                        with engine.handler_lock:
                            rp.handler(hit)
                except Exception as exc:
                    if engine.handler_errors == "raise":
                        raise
                    engine.errors.append((rp, exc))
        engine.target.set_regs(tid, regs)
        engine.target.resume(tid)
        return True

    def forget_thread(self, tid: int) -> None:
        self.stacks.pop(tid, None)

    def copy_thread(self, other: Returns, tid: int, new_tid: int, mapping: dict) -> None:
        """A forked child carries the forking thread's hijacked return addresses."""
        self.tramp = other.tramp
        frames = other.stacks.get(tid, [])
        self.stacks[new_tid] = [Frame(mapping.get(id(f.probe), f.probe), f.ret, f.sp_after,
                                      f.t0, f.args) for f in frames]

    def restore(self) -> int:
        """Give every hijacked return address its real value back (all threads must be
        stopped); returns how many were restored."""
        if self.tramp is None:
            return 0
        engine = self.engine
        arch = engine.arch
        target = engine.target
        word = arch.word_bits // 8
        tramp_bytes = self.tramp.to_bytes(word, arch.byteorder)
        restored = 0
        for tid, stack in list(self.stacks.items()):
            if not stack:
                continue
            try:
                regs = target.get_regs(tid)
            except TargetError:
                continue
            frames = list(reversed(stack))  # innermost first
            link = arch.abi.return_address
            if link is None:  # a pushed return address: its slot is known exactly
                for frame in frames:
                    where = frame.sp_after - word
                    try:
                        if target.read_memory(where, word) == tramp_bytes:
                            target.write_memory(where, frame.ret.to_bytes(word, arch.byteorder))
                            restored += 1
                    except MemoryFault:
                        continue
                continue
            # a link register (PowerPC lr, s390 r14): each frame's copy is in a register
            # or saved by the callee in its caller's frame, i.e. between the frame's own
            # stack pointer after the return and the next outer frame's.  Frames below
            # the stack pointer were left by a longjmp; of frames at one depth only the
            # innermost is live; a frame whose return address was the trampoline (a
            # tail call) shares its copy with the frame it was called from.
            sp = regs[arch.abi.sp]
            live: list[Frame] = []
            for frame in frames:
                if frame.ret == self.tramp or frame.sp_after < sp:
                    continue
                if live and frame.sp_after <= live[-1].sp_after:
                    continue
                live.append(frame)
            if not live:
                continue
            # the innermost frame's copy may still be in registers (the link register,
            # or r0 between PowerPC's mflr r0 and its store): no program address is
            # the trampoline's, so a register holding it holds that copy
            changed = False
            for name in arch.registers:
                if name != arch.abi.pc and regs.get(name) == self.tramp:
                    regs[name] = live[0].ret
                    changed = True
                    restored += 1
            if changed:
                target.set_regs(tid, regs)
            lo = live[0].sp_after
            hi = live[-1].sp_after + 64 * word
            try:
                chunk = target.read_memory(lo, hi - lo)
            except MemoryFault:
                continue
            for i, frame in enumerate(live):
                end = (live[i + 1].sp_after if i + 1 < len(live) else hi) - lo
                at = chunk.find(tramp_bytes, frame.sp_after - lo, end)
                while at >= 0 and (lo + at) % word:
                    at = chunk.find(tramp_bytes, at + 1, end)
                if at < 0:
                    continue  # not saved yet (still in a register) or already reloaded
                target.write_memory(lo + at, frame.ret.to_bytes(word, arch.byteorder))
                restored += 1
        self.stacks.clear()
        return restored


def duration(hit: Hit) -> float | None:
    frame = getattr(hit, "frame", None)
    return None if frame is None else (time.monotonic_ns() - frame.t0) / 1e9
