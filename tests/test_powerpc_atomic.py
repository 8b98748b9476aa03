"""The load-reserve/store-conditional decision, proved on the reference CPU.

A single-step (like any trap into the kernel, or into qemu's CPU loop) between lwarx and
stwcx. loses the reservation, so the store-conditional fails and the program's retry
loop goes round again, into the probe again: for ever.  The plugin therefore boosts the
larx (copy + branch back: no trap before the stcx.), refuses the stcx. and refuses
everything in between; these tests show each alternative spinning.
"""

from __future__ import annotations

import dataclasses

import pytest
from test_powerpc_support import (
    PAGE,
    RETURN_PAGE,
    VARIANTS,
    XOL,
    build_program,
    call_regs,
    load_program,
    qemu_cpu,
    reset_data,
)
from ubp_powerpc.analysis import Plan

from ubp_core.engine import Engine
from ubp_core.errors import RefusedError
from ubp_core.target import StopKind
from ubp_core.types import Strategy
from ubp_core.xol import XolAllocator

LARX = frozenset({20, 84, 52, 116})
STCX = frozenset({150, 214, 694, 726})


@pytest.fixture(scope="module", params=list(VARIANTS))
def bench(request, plugins, tmp_path_factory):
    arch = plugins.arch(request.param)
    prog = build_program(arch.name, "funcs.c", tmp_path_factory.mktemp(arch.name))
    target = qemu_cpu(plugins, arch).open()
    try:
        load_program(target, prog)
        target.map_region(XOL, 4 * PAGE, "rx")
        yield arch, prog, target
    finally:
        target.close()


def _sequence(arch, prog):
    """Addresses of the larx, the instructions after it and the stcx. in atomic_add."""
    addrs = prog.insns(arch, {"atomic_add"})
    words = {}
    for a in addrs:
        raw = target_bytes(prog, a)
        words[a] = int.from_bytes(raw, arch.byteorder)

    def xo(w):
        return (w >> 1) & 0x3FF if w >> 26 == 31 else None

    larx = next(a for a in addrs if xo(words[a]) in LARX)
    stcx = next(a for a in addrs if a > larx and xo(words[a]) in STCX)
    return larx, [a for a in addrs if larx < a < stcx], stcx


def target_bytes(prog, address):
    for start, data, _ in prog.segments:
        if start <= address < start + len(data):
            return data[address - start:address - start + 4]
    raise KeyError(address)


def _call(arch, prog, target, probes, max_hits=200):
    """Run atomic_add(&counter, 5) with ``probes`` [(address, strategy, analysis)]."""
    reset_data(target, prog)
    counter = _symbol(prog, "counter")
    target.get_regs(target.tid)
    target.set_regs(target.tid, call_regs(arch, prog, "atomic_add", counter, 5))
    xol = XolAllocator(target, arch.xol_slot_size, arch.branch_reach)
    xol.add_area(XOL, 4 * PAGE)
    engine = Engine(target, arch, xol=xol, handler_errors="raise")
    for addr, strategy, analysis in probes:
        engine.add_probe(addr, strategy=strategy, analysis=analysis)
    stop = engine.run_until_foreign(target.tid, max_hits=max_hits, timeout=10)
    hits = engine.total_hits
    engine.remove_all()
    value = int.from_bytes(target.read_memory(counter, 4), arch.byteorder)
    return stop, hits, value


def _symbol(prog, name):
    from ubp_core.elfinfo import ElfImage

    with ElfImage(prog.path) as img:
        sym = img.elf.get_section_by_name(".symtab").get_symbol_by_name(name)[0]
        return sym["st_value"]


def test_unprobed_and_boosted_larx_complete(bench):
    arch, prog, target = bench
    larx, _, _ = _sequence(arch, prog)
    stop, hits, value = _call(arch, prog, target, [])
    assert stop.kind is StopKind.TRAP and value == 5
    engine = Engine(target, arch)
    analysis = engine.analyze(larx)
    assert analysis.strategies == {Strategy.BOOST}
    stop, hits, value = _call(arch, prog, target, [(larx, Strategy.BOOST, None)])
    assert stop.kind is StopKind.TRAP and target.get_regs(target.tid)["pc"] == RETURN_PAGE
    assert (hits, value) == (1, 5)


def test_stepping_the_larx_would_spin_for_ever(bench):
    arch, prog, target = bench
    larx, _, _ = _sequence(arch, prog)
    analysis = Engine(target, arch).analyze(larx)
    forced = dataclasses.replace(analysis, strategies=frozenset({Strategy.SSOL}))
    stop, hits, value = _call(arch, prog, target, [(larx, Strategy.SSOL, forced)])
    assert stop.kind is StopKind.TIMEOUT and hits >= 200 and value == 0


def test_a_probe_after_the_larx_would_spin_for_ever(bench):
    arch, prog, target = bench
    _, between, stcx = _sequence(arch, prog)
    engine = Engine(target, arch)
    for addr in [*between, stcx]:
        with pytest.raises(RefusedError, match="reservation"):
            engine.add_probe(addr)
    for addr in [*between, stcx]:
        alone = arch.analyze(arch.decode(engine.read_instruction(addr), addr))  # no context
        plan = alone.plan or Plan("plain", (int.from_bytes(target_bytes(prog, addr),
                                                           arch.byteorder),))
        forced = dataclasses.replace(alone, refusal=None, plan=plan,
                                     strategies=frozenset({Strategy.BOOST, Strategy.SSOL}))
        for strategy in (Strategy.BOOST, Strategy.SSOL):
            if strategy is Strategy.BOOST and plan.op != "plain":
                continue  # a branch is not boosted
            stop, _, value = _call(arch, prog, target, [(addr, strategy, forced)])
            assert stop.kind is StopKind.TIMEOUT and value == 0, (hex(addr), strategy)
