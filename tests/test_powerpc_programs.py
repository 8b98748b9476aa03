"""Real compiled code on the reference CPU: every instruction of a few cross-compiled C
functions probed, under each strategy; the results must equal the unprobed run's."""

from __future__ import annotations

from collections import Counter

import pytest
from test_powerpc_support import (
    PAGE,
    RETURN_PAGE,
    VARIANTS,
    XOL,
    XOL_FAR,
    build_program,
    call_regs,
    data_snapshot,
    load_program,
    qemu_cpu,
    reset_data,
)

from ubp_core.engine import Engine
from ubp_core.errors import RefusedError
from ubp_core.target import StopKind
from ubp_core.types import Strategy
from ubp_core.xol import XolAllocator

ARG = 3


@pytest.fixture(scope="module", params=list(VARIANTS))
def bench(request, plugins, tmp_path_factory):
    arch = plugins.arch(request.param)
    cpu = qemu_cpu(plugins, arch)
    prog = build_program(arch.name, "funcs.c", tmp_path_factory.mktemp(arch.name))
    target = cpu.open()
    try:
        load_program(target, prog)
        target.map_region(XOL, 16 * PAGE, "rx")
        target.map_region(XOL_FAR, 16 * PAGE, "rx")
        yield arch, prog, target, run(arch, prog, target, None)
    finally:
        target.close()


def run(arch, prog, target, strategy, area=XOL):
    """(r3, data, stop pc, hits per address, strategies used); strategy None: unprobed,
    "default": the default policy."""
    reset_data(target, prog)
    target.get_regs(target.tid)
    target.set_regs(target.tid, call_regs(arch, prog, "run", ARG))
    hits: Counter = Counter()
    used: Counter = Counter()
    if strategy is None:
        target.resume(target.tid)
        stop = target.wait(30)
    else:
        xol = XolAllocator(target, arch.xol_slot_size, arch.branch_reach)
        xol.add_area(area, 16 * PAGE)
        engine = Engine(target, arch, xol=xol, handler_errors="raise")

        def count(hit):
            hits[hit.probe.address] += 1

        for addr in prog.insns(arch):
            want = None if strategy == "default" else strategy
            try:
                if want is not None and want not in engine.analyze(addr).strategies:
                    want = None  # not correct for this one: the default policy
                probe = engine.add_probe(addr, count, strategy=want)
            except RefusedError:
                continue  # refused with a reason (stcx., inside an atomic sequence)
            used[probe.strategy] += 1
        stop = engine.run_until_foreign(target.tid, max_hits=200000, timeout=60)
        engine.remove_all()
    regs = target.get_regs(target.tid)
    assert stop.kind is StopKind.TRAP, stop
    return regs["r3"], data_snapshot(target, prog), regs["pc"], hits, used


@pytest.mark.parametrize("strategy", [Strategy.EMULATE, Strategy.BOOST, Strategy.SSOL,
                                      Strategy.INLINE, "default"])
def test_probe_on_every_instruction(bench, strategy):
    arch, prog, target, bare = bench
    r3, data, pc, _, _ = bare
    assert pc == RETURN_PAGE and r3 != 0
    got = run(arch, prog, target, strategy)
    assert got[2] == RETURN_PAGE
    assert got[0] == r3
    assert got[1] == data
    hits, used = got[3], got[4]
    assert sum(hits.values()) > 300
    if isinstance(strategy, Strategy):
        assert used[strategy] > 0.2 * sum(used.values()), used
    # every probe of the same code is hit as often under every strategy
    if strategy == Strategy.SSOL:
        ref = run(arch, prog, target, Strategy.EMULATE)[3]
        assert hits == ref


def test_boosts_fall_back_when_the_xol_area_is_out_of_reach(bench):
    arch, prog, target, bare = bench
    got = run(arch, prog, target, "default", area=XOL_FAR)
    assert got[:3] == bare[:3]
    assert Strategy.BOOST not in got[4] and got[4][Strategy.SSOL] > 0
