"""Return probes on compiled PowerPC code, on the reference CPUs (qemu for ppc64le and
ppc64, unicorn for ppc32): recursion, a __builtin_longjmp that leaves two frames, a tail
call, a return probe removed while calls are in flight, and UBP letting go in the middle
of a recursion (every hijacked return address given its real value back).

tests/progs/returns/returns.c records what it computes (every value fact and fib
return, in order; calls; calls that returned) in globals: the probes must report
exactly that, and the program must compute exactly what it computes unprobed.

The bench and the checks here are arch-neutral: tests/test_s390_returns.py runs them on
s390x.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from test_powerpc_support import (
    PAGE,
    RETURN_PAGE,
    XOL,
    build_program,
    call_regs,
    load_program,
    reset_data,
)

from ubp_core.conformance.kit import select_cpus
from ubp_core.elfinfo import ElfImage
from ubp_core.engine import Engine
from ubp_core.target import StopKind
from ubp_core.types import Strategy
from ubp_core.xol import XolAllocator

SOURCE = os.path.join("..", "returns", "returns.c")  # relative to tests/progs/powerpc
N = 7  # run(N): fact(7), fib(7) (41 calls), catcher(0..6), outer(7), outer(8), fact(3)
PROBED = ("run", "fact", "fib", "middle", "inner", "outer", "tailee")
STRATEGIES = (Strategy.EMULATE, Strategy.BOOST, Strategy.SSOL)


# --------------------------------------------------------------------------- the bench
@dataclass
class Bench:
    """A compiled returns.c loaded in a reference CPU; ``start(n)`` resets its data and
    stack and sets the registers of a call of run(n) that returns into ``stop_pc``."""

    arch: object
    target: object
    path: str
    entries: dict[str, int]  # function -> the address its calls arrive at
    start: Callable[[int], None]
    xol: int  # an XOL area the bench mapped, within a boost's reach of the code
    stop_pc: int
    data: dict[str, tuple[int, int]] = field(default_factory=dict)  # global -> address, size

    def __post_init__(self):
        with ElfImage(self.path) as img:
            for sym in img.elf.get_section_by_name(".symtab").iter_symbols():
                if sym["st_info"]["type"] == "STT_OBJECT" and sym.name:
                    self.data[sym.name] = (sym["st_value"], sym["st_size"])

    def read_globals(self) -> dict[str, int | list[int]]:
        """Every global of returns.c: ints, and the logs as lists of words."""
        arch, out = self.arch, {}
        word = arch.word_bits // 8
        for name, (addr, size) in self.data.items():
            raw = self.target.read_memory(addr, size)
            step = 4 if size == 4 else word
            values = [int.from_bytes(raw[i:i + step], arch.byteorder)
                      for i in range(0, size, step)]
            out[name] = values[0] if size == 4 else values
        return out


@dataclass
class Outcome:
    retval: int
    globals: dict
    events: list  # (function, return value, shadow-stack depth left) per return seen
    probes: dict  # function -> ReturnProbe
    engine: Engine | None

    def values(self, name: str) -> list[int]:
        return [v for f, v, _ in self.events if f == name]


def finish(bench: Bench, engine: Engine | None, stop, events, probes) -> Outcome:
    arch, target = bench.arch, bench.target
    assert stop.kind is StopKind.TRAP, stop
    regs = target.get_regs(target.tid)
    pc = (regs[arch.abi.pc] - arch.pc_after_trap) & ((1 << arch.word_bits) - 1)
    assert pc == bench.stop_pc, f"stopped at {pc:#x}, not at run()'s return"
    return Outcome(regs[arch.abi.retval], bench.read_globals(), events, probes, engine)


def new_engine(bench: Bench) -> Engine:
    arch = bench.arch
    xol = XolAllocator(bench.target, arch.xol_slot_size, arch.branch_reach)
    xol.add_area(bench.xol, 16 * PAGE)
    return Engine(bench.target, arch, xol=xol, handler_errors="raise")


def probe_returns(bench: Bench, engine: Engine, events: list, strategy=None,
                  names=PROBED, on_return=None) -> dict:
    """A return probe on each of ``names``, under ``strategy`` where the entry
    instruction allows it (the default policy elsewhere)."""
    probes = {}

    def record(hit):
        depth = len(hit.engine.returns.stacks.get(hit.tid, ()))
        mask = (1 << bench.arch.word_bits) - 1
        events.append((hit.probe.label, hit.retval & mask, depth))
        if on_return is not None:
            on_return(hit)

    for name in names:
        addr = bench.entries[name]
        want = strategy if strategy in engine.analyze(addr).strategies else None
        probes[name] = engine.add_return_probe(addr, record, strategy=want, label=name)
    return probes


def run(bench: Bench, strategy=None, *, probed=True, on_return=None,
        names=PROBED) -> Outcome:
    """run(N) to its end: unprobed (``probed`` False) or with return probes."""
    target = bench.target
    bench.start(N)
    if not probed:
        target.resume(target.tid)
        return finish(bench, None, target.wait(60), [], {})
    engine = new_engine(bench)
    events: list = []
    probes = probe_returns(bench, engine, events, strategy, names, on_return)
    stop = engine.run_until_foreign(target.tid, max_hits=100000, timeout=60)
    out = finish(bench, engine, stop, events, probes)
    engine.remove_all()
    return out


class LetGo(Exception):
    """Raised by a handler: UBP lets go of the program right there."""


def let_go_at(bench: Bench, address: int, occurrence: int, strategy=None) -> Outcome:
    """Return probes on fib; at the ``occurrence``-th time the program reaches
    ``address`` (inside fib), remove every probe, give the hijacked return addresses
    back and let the program run to its end unprobed."""
    arch, target = bench.arch, bench.target
    bench.start(N)
    engine = new_engine(bench)
    events: list = []
    probe_returns(bench, engine, events, strategy, names=("fib",))
    seen = 0

    def stop_here(hit):
        nonlocal seen
        seen += 1
        if seen == occurrence:
            raise LetGo

    engine.add_probe(address, stop_here)
    try:
        stop = engine.run_until_foreign(target.tid, max_hits=100000, timeout=60)
        pytest.fail(f"{address:#x} reached only {seen} times: {stop}")
    except LetGo:
        pass
    tid = target.tid
    regs = target.get_regs(tid)
    regs[arch.abi.pc] = address  # the breakpoint's hit was not handled
    target.set_regs(tid, regs)
    in_flight = sum(len(s) for s in engine.returns.stacks.values())
    engine.remove_all()
    uc = getattr(target, "uc", None)
    if uc is not None:
        # unicorn s390x: a translation block that ends in the breakpoint's operation
        # exception does not cover the breakpoint's bytes, so rewriting them does not
        # drop it and the next run raises that exception on the original instruction
        uc.ctl_flush_tb()
    restored = engine.returns.restore()
    assert in_flight and restored >= 1
    target.resume(tid)
    return finish(bench, engine, target.wait(60), events, {})


# --------------------------------------------------------------------------- the checks
def check_run(bench: Bench, bare: Outcome, got: Outcome) -> None:
    """Everything a return probe must get right, against what the C code computed."""
    g = got.globals
    # the program computes exactly what it computes unprobed
    assert got.retval == bare.retval
    assert g == bare.globals
    # recursion: every return, innermost first, with the value the C code returned
    assert got.values("fact") == g["fact_log"][:g["fact_n"]]
    assert got.values("fib") == g["fib_log"][:g["fib_n"]]
    for name in ("fact", "fib"):
        rp = got.probes[name]
        assert rp.calls == rp.hits == g[f"{name}_calls"] > 2, name
    # the longjmp: calls that returned are counted, the frames it skipped are not
    middle, inner = got.probes["middle"], got.probes["inner"]
    assert middle.calls == g["middle_calls"] == 7 and inner.calls == g["inner_calls"] == 7
    assert middle.hits == g["middle_returns"] == 4
    assert inner.hits == g["inner_returns"] == 4
    xs = [x for x in range(7) if x % 3]
    assert got.values("inner") == [10 * x for x in xs]
    assert got.values("middle") == [10 * x + 1 for x in xs]
    # the skipped frames are dropped: each later call of middle finds only run's frame
    # below it (catcher, which holds the setjmp, is not probed)
    assert [d for f, _, d in got.events if f == "middle"] == [1] * 4
    # the tail call: tailee returns straight to outer's caller, both returns reported
    tail = [(N + 2) * 7 + 1, (N + 3) * 7 + 1]
    assert got.values("tailee") == tail and got.values("outer") == tail
    assert got.probes["tailee"].calls == got.probes["outer"].calls == g["tailee_calls"] == 2
    # and the whole run
    assert got.values("run") == [got.retval & ((1 << bench.arch.word_bits) - 1)]
    assert got.engine.returns.lost == 0
    assert not any(got.engine.returns.stacks.values())


def entry_allows(bench: Bench, strategy) -> None:
    """Skip (saying why) a strategy the compiler's entry instructions do not allow."""
    engine = new_engine(bench)
    found = engine.analyze(bench.entries["fact"])
    if strategy not in found.strategies:
        pytest.skip(f"{bench.arch.name}: fact's entry `{found.insn.mnemonic} "
                    f"{found.insn.op_str}` allows only "
                    f"{sorted(s.value for s in found.strategies)}")


def check_strategy_used(got: Outcome, strategy) -> None:
    used = {name: rp.strategy for name, rp in got.probes.items()}
    assert used["fact"] is strategy and used["fib"] is strategy, used
    assert sum(s is strategy for s in used.values()) >= len(used) // 2, used


def check_removed_in_flight(bench: Bench, bare: Outcome) -> None:
    """fact's return probe removed by its own handler at the third return of fact(N):
    the N - 3 calls still in flight return through the trampoline, uncounted."""
    def remove_at_third(hit):
        if hit.probe.label == "fact" and hit.probe.hits == 3:
            hit.engine.remove_probe(hit.probe)

    got = run(bench, names=("fact", "fib"), on_return=remove_at_third)
    assert got.retval == bare.retval and got.globals == bare.globals
    fact = got.probes["fact"]
    assert fact.removed and fact.hits == 3
    assert fact.calls == N  # fact(3) later in run() is not probed any more
    assert got.values("fact") == bare.globals["fact_log"][:3]
    assert got.values("fib") == bare.globals["fib_log"][:bare.globals["fib_n"]]
    assert got.engine.returns.lost == 0
    assert not any(got.engine.returns.stacks.values())


def let_go_points(bench: Bench) -> list[tuple[int, int]]:
    """(address, occurrence) in fib, the entry aside: the 4th time each instruction
    runs is deep in the recursion (fib(4) at depth 4 for the prologue) or just after
    earlier calls returned and left the trampoline's address in stack slots."""
    arch = bench.arch
    start = bench.entries["fib"]
    with ElfImage(bench.path) as img:
        sym = next(s for s in img.functions() if s.name == "fib")
        code = img.read(sym.address, sym.size)
        insns = [i.address for i in arch.decode_all(code, sym.address)]
    return [(a, 4) for a in insns if a > start]


# --------------------------------------------------------------------------- powerpc
CPUS = {"ppc64le": "qemu", "ppc64": "qemu", "ppc32": "unicorn"}


def local_entries(path: str) -> dict[str, int]:
    """Function -> address of its local entry point (ELFv2: the global entry sets up
    the TOC pointer and falls through; calls inside the module skip it)."""
    out = {}
    with ElfImage(path) as img:
        for sym in img.elf.get_section_by_name(".symtab").iter_symbols():
            if sym["st_info"]["type"] != "STT_FUNC":
                continue
            local = getattr(sym["st_other"], "local", 0) if img.elf["e_machine"] == "EM_PPC64" else 0
            if local >= 2:
                out[sym.name] = 1 << local
    return out


@pytest.fixture(scope="module", params=list(CPUS))
def bench(request, plugins, tmp_path_factory):
    arch = plugins.arch(request.param)
    cpus = select_cpus(plugins, arch, [CPUS[arch.name]])
    if not cpus:
        pytest.skip(f"reference CPU {CPUS[arch.name]} for {arch.name} is not available here")
    prog = build_program(arch.name, SOURCE, tmp_path_factory.mktemp(arch.name))
    skip = local_entries(prog.path)
    if arch.name == "ppc64le":
        assert skip.get("fact") == 8  # the probe must go past the TOC set-up
    entries = {name: prog.functions[name][0] + skip.get(name, 0) for name in PROBED}
    target = cpus[0].open()

    def start(n):
        reset_data(target, prog)
        target.get_regs(target.tid)
        target.set_regs(target.tid, call_regs(arch, prog, "run", n))

    try:
        load_program(target, prog)
        target.map_region(XOL, 16 * PAGE, "rx")
        b = Bench(arch, target, prog.path, entries, start, XOL, RETURN_PAGE)
        yield b, run(b, probed=False)
    finally:
        target.close()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_return_with_its_value(bench, strategy):
    b, bare = bench
    entry_allows(b, strategy)
    got = run(b, strategy)
    check_run(b, bare, got)
    check_strategy_used(got, strategy)


def test_a_return_probe_removed_while_calls_are_in_flight(bench):
    b, bare = bench
    check_removed_in_flight(b, bare)


def test_letting_go_in_the_middle_of_a_recursion(bench):
    """At every instruction of fib, deep in the recursion: remove the probes, restore,
    run to the end unprobed -- the program computes what it computes unprobed."""
    b, bare = bench
    points = let_go_points(b)
    assert len(points) > 10
    for address, occurrence in points:
        got = let_go_at(b, address, occurrence)
        assert (got.retval, got.globals) == (bare.retval, bare.globals), hex(address)
