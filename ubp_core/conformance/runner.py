"""Differential execution: an instruction in place versus through every claimed strategy.

For one case (instruction bytes at an address) on one reference CPU:

1. map the code page (filled with breakpoints, the instruction at its address) and two
   XOL areas, one near the code and one far from it;
2. randomise the registers and vector state deterministically from the case;
3. memory appears wherever the instruction touches it, with content derived from the
   case and the page address, so every run sees the same world;
4. run in place until the next stop (the fill traps right after the instruction;
   data pages are not executable, so a jump anywhere else stops too);
5. for each strategy the plugin claims (at the near and the far slot), install a probe
   through the real engine and run again;
6. registers, vector state, every touched page and how the run ended (next pc, or
   signal and pc of a fault) must be equal.
"""

from __future__ import annotations

import hashlib
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from ..archops import ArchOps
from ..engine import Engine
from ..errors import DecodeError, RefusedError, TargetError
from ..refcpu import PAGE, ReferenceCpu, ScratchTarget
from ..target import Stop, StopKind
from ..types import Analysis, Placement, Strategy
from ..xol import XolAllocator

DATA_BASE = 0x30000000
DATA_SIZE = 1 << 20
# An instruction that branches to itself keeps hitting its own probe; the in-place run
# goes round the same loop until the lazy-page limit (a call to itself) or the
# watchdog (a jump to itself) ends it.  The hit budget lets the probed run get as far.
MAX_HITS = 5000
# a page of breakpoints near the case that registers and memory may point into
CODE_OFFSET = 0x10000
LAZY_LIMIT = 6
SLOT_VARIANTS = {
    Strategy.EMULATE: ("near",),
    Strategy.BOOST: ("near", "far"),
    Strategy.SSOL: ("near", "far"),
    Strategy.INLINE: ("inline",),
}


@dataclass(slots=True)
class Case:
    raw: bytes
    address: int
    note: str = ""
    source: str = "plugin"


@dataclass(slots=True)
class Outcome:
    end: str  # "next", "fault", "timeout", "exit"
    signo: int
    pc: int | None
    regs: dict[str, int]
    ext: bytes | None
    memory: dict[int, bytes]


@dataclass(slots=True)
class CaseResult:
    case: Case
    status: str  # passed, failed, unverified, refused
    text: str = ""
    kind: str = ""
    cpu: str | None = None
    refusal: str | None = None
    strategies: dict[str, str] = field(default_factory=dict)  # strategy -> verdict
    detail: str = ""

    def as_dict(self) -> dict:
        return {
            "address": hex(self.case.address), "bytes": self.case.raw.hex(),
            "text": self.text, "kind": self.kind, "status": self.status, "cpu": self.cpu,
            "refusal": self.refusal, "strategies": self.strategies, "detail": self.detail,
            "source": self.case.source, "note": self.case.note,
        }


@dataclass(slots=True)
class _CaseSetup:
    code_pages: list[int]
    areas: dict[str, int]
    regs0: dict[str, int]
    ext0: bytes | None
    fill: Callable[[int], bytes]


class CannotRun(Exception):
    """This CPU cannot execute the case (an opcode it lacks, an address it cannot map)."""


def case_seed(case: Case, salt: int) -> int:
    h = hashlib.blake2b(case.raw + case.address.to_bytes(8, "little") + salt.to_bytes(8, "little"),
                        digest_size=8)
    return int.from_bytes(h.digest(), "little")


class Bench:
    """Runs cases of one arch on one reference CPU (one scratch target, reused)."""

    def __init__(self, arch: ArchOps, cpu: ReferenceCpu, salt: int = 0) -> None:
        self.arch = arch
        self.cpu = cpu
        self.salt = salt
        self.mask = (1 << arch.word_bits) - 1
        self._target: ScratchTarget | None = None
        self._pages_cache: dict[int, bytes] = {}
        self._seeds: list[tuple[int, bytes]] = []
        self._code_seeds: list[Placement] = []

    @property
    def target(self) -> ScratchTarget:
        if self._target is None:
            self._target = self.cpu.open()
        return self._target

    def close(self) -> None:
        if self._target is not None:
            self._target.close()
            self._target = None

    # ------------------------------------------------------------------ layout
    def _areas(self, a: int) -> dict[str, int]:
        arch = self.arch
        base = a & ~((1 << 21) - 1)
        reach = arch.branch_reach
        near_off = min(reach // 2, 1 << 30) if reach else 1 << 30
        far_off = (1 << 36) if arch.word_bits == 64 else (1 << (arch.word_bits - 1))
        if reach and far_off < 2 * reach:
            far_off = 2 * reach
        areas = {}
        for name, off in (("near", near_off), ("far", far_off), ("code", CODE_OFFSET)):
            # the spare code page follows the case's own page, whatever its alignment
            cand = ((a & ~(PAGE - 1) if name == "code" else base) + off) & self.mask
            if not arch.canonical_address(cand) or cand + PAGE > self.mask:
                cand = ((a & ~(PAGE - 1) if name == "code" else base) - off) & self.mask
            if not arch.canonical_address(cand):
                raise CannotRun(f"no room for the {name} XOL area around {a:#x}")
            areas[name] = cand
        return areas

    def _code_page(self, a: int) -> int:
        return self._areas(a)["code"]

    def _filler(self, seed: int, a: int,
                seeds: list[tuple[int, bytes]]) -> Callable[[int], bytes]:
        code = self._code_page(a)
        cache = self._pages_cache
        cache.clear()
        order = self.arch.byteorder
        wbytes = self.arch.word_bits // 8
        mask = self.mask

        def fill(page: int) -> bytes:
            got = cache.get(page)
            if got is not None:
                return got
            rng = random.Random(seed ^ (page * 0x9E3779B97F4A7C15))
            buf = bytearray(rng.randbytes(PAGE))
            # a quarter of the words are plausible pointers: data, or code (another page of
            # breakpoints: a case must not read its own bytes, which a probe changes)
            for _ in range(PAGE // wbytes // 4):
                off = rng.randrange(0, PAGE // wbytes) * wbytes
                if rng.random() < 0.5:
                    val = DATA_BASE + (rng.randrange(DATA_SIZE) & ~7)
                else:
                    val = (code + rng.randrange(0, PAGE // 4) * self.arch.insn_alignment) & mask
                buf[off:off + wbytes] = (val & mask).to_bytes(wbytes, order)
            for addr, blob in seeds:  # what prepare_case asked to find in memory
                for i, byte in enumerate(blob):
                    if page <= addr + i < page + PAGE:
                        buf[addr + i - page] = byte
            data = bytes(buf)
            cache[page] = data
            return data

        return fill

    def _random_regs(self, rng: random.Random, a: int, analysis: Analysis) -> dict[str, int]:
        arch = self.arch
        regs: dict[str, int] = {}
        for name in arch.registers:
            r = rng.random()
            if r < 0.35:
                v = DATA_BASE + rng.randrange(DATA_SIZE)
                if rng.random() < 0.75:
                    v &= ~7
            elif r < 0.55:
                v = rng.randrange(0, 65)
            elif r < 0.65:
                v = self._code_page(a) + rng.randrange(PAGE)
            else:
                v = rng.getrandbits(arch.word_bits)
            regs[name] = v & self.mask
        regs[arch.abi.sp] = (DATA_BASE + DATA_SIZE // 2 + rng.randrange(-4096, 4096) * 16) & self.mask
        regs[arch.abi.pc] = a
        self._seeds, self._code_seeds = [], []
        for item in arch.prepare_case(analysis, regs, rng) or ():
            if isinstance(item, Placement):
                if item.code:
                    self._code_seeds.append(item)
                else:
                    self._seeds.append((item.address, item.data))
            else:
                self._seeds.append(item)
        return regs

    # ------------------------------------------------------------------ one run
    def _code_image(self, page: int, case: Case | None) -> bytes:
        """Breakpoints, with the case and the code prepare_case placed, on ``page``."""
        bp = self.arch.breakpoint
        img = bytearray((bp * (PAGE // len(bp) + 1))[:PAGE])
        pieces = [(p.address, p.data) for p in self._code_seeds]
        if case is not None:
            pieces.append((case.address, case.raw))
        for address, data in pieces:
            lo = max(address, page)
            hi = min(address + len(data), page + PAGE)
            if lo < hi:
                img[lo - page:hi - page] = data[lo - address:hi - address]
        return bytes(img)

    def _run(self, case: Case, analysis: Analysis, code_pages: list[int], regs0: dict[str, int],
             ext0: bytes | None, strategy: Strategy | None, area: int | None) -> Outcome | None:
        t = self.target
        t.refill_lazy_pages()
        for page in code_pages:
            t.write_memory(page, self._code_image(page, case))
        t.get_regs(t.tid)
        t.set_regs(t.tid, dict(regs0))
        if ext0 is not None:
            t.set_ext_state(ext0)
        if strategy is None:
            t.resume(t.tid)
            stop = t.wait()
        else:
            arch = self.arch
            xol = XolAllocator(t, arch.xol_slot_size, arch.branch_reach)
            if area is not None:
                xol.add_area(area, PAGE)
            engine = Engine(t, arch, xol=xol, handler_errors="raise")
            try:
                engine.add_probe(case.address, strategy=strategy, analysis=analysis)
            except RefusedError:
                return None  # e.g. no boost from a far slot: the engine falls back
            stop = engine.run_until_foreign(t.tid, max_hits=MAX_HITS)
        return self._outcome(stop, analysis)

    def _outcome(self, stop: Stop, analysis: Analysis) -> Outcome:
        t = self.target
        arch = self.arch
        regs = t.get_regs(t.tid)
        values = {r: regs[r] & self.mask for r in arch.registers}
        pc: int | None = values[arch.abi.pc]
        signo = stop.signo
        if stop.kind is StopKind.TRAP:
            end = "next"
            pc = (pc - arch.pc_after_trap) & self.mask
            signo = 0
        elif stop.kind is StopKind.SIGNAL:
            end = "next" if stop.fault_addr is not None and stop.fault_addr == pc else "fault"
            if end == "next":
                signo = 0
            elif stop.unsupported or (stop.unsupported is None and signo == signal.SIGILL
                                      and not analysis.faults):
                raise CannotRun(f"{self.cpu.name} cannot execute it (SIGILL)"
                                + (f": {stop.data}" if stop.data else ""))
        elif stop.kind is StopKind.TIMEOUT:
            end, pc = "timeout", None
        else:
            end, pc = "exit", None
        memory = {p: t.read_memory(p, PAGE) for p in t.lazy_pages()}
        return Outcome(end, signo, pc, values, t.get_ext_state(), memory)

    # ------------------------------------------------------------------ compare
    def _compare(self, want: Outcome, got: Outcome, analysis: Analysis,
                 fill: Callable[[int], bytes]) -> str | None:
        pcname = self.arch.abi.pc
        if want.end != got.end or want.signo != got.signo:
            return (f"run ended differently: in place {_ending(want)}, here {_ending(got)}")
        if want.pc != got.pc:
            return f"next pc {_hx(got.pc)}, in place {_hx(want.pc)}"
        for name, value in want.regs.items():
            if name == pcname or name in analysis.volatile:
                continue
            if got.regs.get(name) != value:
                return f"{name} = {_hx(got.regs.get(name))}, in place {_hx(value)}"
        if want.ext != got.ext and want.ext is not None and got.ext is not None:
            off = next(i for i, (x, y) in enumerate(zip(want.ext, got.ext)) if x != y) \
                if len(want.ext) == len(got.ext) else -1
            return f"vector/FPU state differs at byte {off}"
        for page in sorted(set(want.memory) | set(got.memory)):
            a = want.memory.get(page) or fill(page)
            b = got.memory.get(page) or fill(page)
            if a != b:
                off = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                return f"memory at {page + off:#x} differs"
        return None

    # ------------------------------------------------------------------ one case
    def _setup(self, case: Case, analysis: Analysis) -> _CaseSetup:
        why = self.cpu.cannot_run(analysis)
        if why:
            raise CannotRun(why)
        a = case.address
        seed = case_seed(case, self.salt)
        rng = random.Random(seed)
        regs0 = self._random_regs(rng, a, analysis)
        areas = self._areas(a)
        # the case's pages, those of code it runs elsewhere, and the spare page of
        # breakpoints: all rewritten before every run (a store may have changed them)
        code_pages: list[int] = []
        for address, size in ((a, len(case.raw)),
                              *((p.address, len(p.data)) for p in self._code_seeds),
                              (areas["code"], 1)):
            first = address & ~(PAGE - 1)
            last = (address + max(size, 1) - 1) & ~(PAGE - 1)
            code_pages += [p for p in range(first, last + PAGE, PAGE) if p not in code_pages]
        t = self.target
        try:
            for page in code_pages:
                t.map_region(page, PAGE, "rx")
            for base in areas.values():
                t.map_region(base, PAGE, "rx")
        except TargetError as exc:
            raise CannotRun(str(exc)) from None
        # every case starts with no data pages, so a runaway instruction (a call to
        # itself) ends at the same depth in every run
        t.drop_lazy_pages()
        t.begin_case()
        fill = self._filler(seed, a, self._seeds)
        t.filler = fill
        t.lazy_limit = LAZY_LIMIT
        ext0 = t.random_ext_state(rng)
        return _CaseSetup(code_pages, areas, regs0, ext0, fill)

    def _reference(self, case: Case, analysis: Analysis, st: _CaseSetup) -> Outcome:
        """The in-place run, repeated until it maps no new page.

        A page that appears mid-instruction means the instruction faulted and ran
        again; one that reads what its first attempt wrote (enter with nesting) would
        then differ from a run in which every page was there from the start, as it is
        for the runs that follow.
        """
        for _ in range(4):
            before = len(self.target.lazy_pages())
            want = self._run(case, analysis, st.code_pages, st.regs0, st.ext0, None, None)
            assert want is not None
            if len(self.target.lazy_pages()) == before:
                break
        return want

    def _patient(self, case: Case, analysis: Analysis, st: _CaseSetup, strategy: Strategy,
                 area: int | None) -> tuple[Outcome, Outcome | None]:
        t = self.target
        old = getattr(t, "timeout", None)
        if old is not None:
            t.timeout = old * 5
        try:
            want = self._reference(case, analysis, st)
            got = self._run(case, analysis, st.code_pages, st.regs0, st.ext0, strategy, area)
        finally:
            if old is not None:
                t.timeout = old
        return want, got

    def run_case(self, case: Case, analysis: Analysis,
                 strategies: list[Strategy] | None = None) -> CaseResult:
        """Run ``case`` on this CPU.  Raises CannotRun when this CPU cannot tell."""
        res = CaseResult(case, "passed", analysis.insn.text, analysis.kind, self.cpu.name)
        st = self._setup(case, analysis)
        want = self._reference(case, analysis, st)
        todo = strategies if strategies is not None else sorted(analysis.strategies,
                                                                key=list(Strategy).index)
        for strategy in todo:
            verdicts = []
            for where in SLOT_VARIANTS[strategy]:
                area = None if where == "inline" else st.areas[where]
                if strategy is Strategy.SSOL and area is not None \
                        and not analysis.ssol_slot_ok(area):
                    continue  # the engine never steps it from a slot there
                got = self._run(case, analysis, st.code_pages, st.regs0, st.ext0, strategy, area)
                if got is None:  # the plugin declined this slot; the engine falls back
                    verdicts.append("fallback")
                    continue
                diff = self._compare(want, got, analysis, st.fill)
                if diff is not None and "timeout" in (want.end, got.end):
                    # a run that times out on one side only was slowed down (the kernel
                    # throttles bus locks, the machine is busy): run both again, longer
                    want, got = self._patient(case, analysis, st, strategy, area)
                    diff = self._compare(want, got, analysis, st.fill) if got else None
                if diff is None:
                    verdicts.append("passed")
                else:
                    verdicts.append("failed")
                    res.detail = res.detail or f"{strategy.value} ({where} slot): {diff}"
            verdict = ("failed" if "failed" in verdicts else
                       "passed" if "passed" in verdicts else "fallback")
            res.strategies[strategy.value] = verdict
            if verdict == "failed":
                res.status = "failed"
        self._trim_regions(st.code_pages, st.areas)
        return res

    def demonstrate_refusal(self, case: Case, analysis: Analysis) -> str | None:
        """Step a refused instruction naively out of line (copy, step, pc += correction).

        Returns how that run differs from the in-place run (the refusal is needed), or
        None when no difference showed (the refusal is caution this CPU cannot justify).
        """
        st = self._setup(case, analysis)
        want = self._reference(case, analysis, st)
        t = self.target
        arch = self.arch
        pcname = arch.abi.pc
        slot = st.areas["near"]
        t.refill_lazy_pages()
        for page in st.code_pages:
            t.write_memory(page, self._code_image(page, case))
        t.write_memory(slot, case.raw)
        t.get_regs(t.tid)
        regs = dict(st.regs0)
        regs[pcname] = slot
        t.set_regs(t.tid, regs)
        if st.ext0 is not None:
            t.set_ext_state(st.ext0)
        t.resume(t.tid, step=True)
        stop = t.wait()
        live = t.get_regs(t.tid)
        pc = live[pcname]
        if stop.kind is StopKind.TRAP and slot <= pc <= slot + len(case.raw):
            live[pcname] = (pc + case.address - slot) & self.mask
            t.set_regs(t.tid, live)
            t.resume(t.tid)
            stop = t.wait()
        elif stop.kind is StopKind.SIGNAL and stop.fault and pc == slot:
            live[pcname] = case.address
            t.set_regs(t.tid, live)
        elif stop.kind is StopKind.TRAP:
            t.resume(t.tid)
            stop = t.wait()
        got = self._outcome(stop, analysis)
        return self._compare(want, got, analysis, st.fill)

    def _trim_regions(self, code_pages: list[int], areas: dict[str, int]) -> None:
        t = self.target
        regions = getattr(t, "regions", None)
        if regions is None:
            return
        keep = set(code_pages) | set(areas.values())
        have = regions()
        if len(have) > 48:
            for page in have:
                if page not in keep:
                    t.unmap_region(page, PAGE)

    def check_breakpoint(self, address: int = 0x401000) -> str | None:
        """Execute the breakpoint; None when the pc lands where the plugin says."""
        arch = self.arch
        t = self.target
        page = address & ~(PAGE - 1)
        t.map_region(page, PAGE, "rx")
        t.filler = None
        t.write_memory(page, (arch.breakpoint * (PAGE // len(arch.breakpoint)))[:PAGE])
        regs = t.get_regs(t.tid)
        regs = {r: regs[r] for r in arch.registers}
        regs[arch.abi.pc] = address
        t.set_regs(t.tid, regs)
        t.resume(t.tid)
        stop = t.wait()
        if stop.kind is not StopKind.TRAP:
            return f"the breakpoint raised {stop.kind} (signal {stop.signo}), not a trap"
        pc = t.get_regs(t.tid)[arch.abi.pc]
        if pc != address + arch.pc_after_trap:
            return (f"after the breakpoint the pc is {pc:#x}, the plugin says "
                    f"{address + arch.pc_after_trap:#x} (pc_after_trap={arch.pc_after_trap})")
        return None


def _ending(o: Outcome) -> str:
    sig = f" sig {o.signo}" if o.signo else ""
    return f"{o.end}{sig} at {_hx(o.pc)}"


def _hx(v: int | None) -> str:
    return "-" if v is None else hex(v)


def analyze_case(arch: ArchOps, case: Case) -> Analysis:
    insn = arch.decode(case.raw, case.address)
    if insn.length != len(case.raw):
        case.raw = insn.raw
    return arch.analyze(insn)


__all__ = ["Bench", "CannotRun", "Case", "CaseResult", "DecodeError", "analyze_case"]
