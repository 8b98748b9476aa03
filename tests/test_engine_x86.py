"""The engine on x86-64 reference CPUs: probes, handlers, policy and every strategy,
on a real program, against the same program run bare."""

from __future__ import annotations

import pytest
from flatprog import XOL, build, load, run_bare, run_probed

from ubp_core.engine import Engine
from ubp_core.errors import ProbeError, RefusedError
from ubp_core.target import StopKind
from ubp_core.types import Strategy
from ubp_core.xol import XolAllocator


@pytest.fixture(scope="module")
def mix(tmp_path_factory, x86):
    return load(build("x86/mix.S", tmp_path_factory.mktemp("mix")), x86)


@pytest.fixture(scope="module")
def bare(x86_cpu, x86, mix):
    target = x86_cpu.open()
    try:
        yield run_bare(target, x86, mix)
    finally:
        target.close()


@pytest.fixture
def target(x86_cpu):
    t = x86_cpu.open()
    yield t
    t.close()


@pytest.mark.parametrize("strategy", [None, *Strategy])
def test_probe_on_every_instruction(target, x86, mix, bare, strategy):
    """Each instruction probed; forced strategy where correct, default policy elsewhere."""
    assert bare.stop is StopKind.TRAP and bare.executed > 500
    got, engine = run_probed(target, x86, mix, strategy)
    assert got.stop is StopKind.TRAP
    assert got.regs == bare.regs
    assert got.memory == bare.memory
    assert got.hits == bare.executed
    used = {site.strategy for site in engine.sites.values()} if engine.sites else None
    assert used is None  # remove_all took every breakpoint out


def test_strategy_mix_under_default_policy(target, x86, mix):
    xol = XolAllocator(target, x86.xol_slot_size, x86.branch_reach)
    xol.add_area(XOL, 4096)
    from flatprog import _setup

    _setup(target, x86, mix)
    engine = Engine(target, x86, xol=xol)
    chosen = {engine.add_probe(a).strategy for a in mix.insns}
    assert chosen == {Strategy.EMULATE, Strategy.BOOST, Strategy.SSOL}


def _engine(target, x86, mix):
    from flatprog import _setup

    _setup(target, x86, mix)
    xol = XolAllocator(target, x86.xol_slot_size, x86.branch_reach)
    xol.add_area(XOL, 4096)
    return Engine(target, x86, xol=xol, handler_errors="raise")


def test_handlers_see_arguments_and_can_change_registers(target, x86, mix):
    engine = _engine(target, x86, mix)
    # f's first instruction: the callee of "call f" (push rbp)
    f_addr = next(a for a in mix.insns
                  if x86.decode(target.read_memory(a, 15), a).text == "push rbp")
    seen = []

    def on_f(hit):
        seen.append((hit.tid, hit.arg(0), hit.pc))

    p1 = engine.add_probe(f_addr, on_f)
    p2 = engine.add_probe(f_addr)  # a second probe at the same address, no handler
    engine.run_until_foreign(target.tid)
    assert [a for _, a, _ in seen] == list(range(40, 0, -1))
    assert all(pc == f_addr for _, _, pc in seen)
    assert p1.hits == p2.hits == 40


def test_disable_remove_and_restore(target, x86, mix):
    engine = _engine(target, x86, mix)
    original = target.read_memory(mix.insns[3], 1)
    hits = []
    p = engine.add_probe(mix.insns[3], lambda h: hits.append(1))
    assert target.read_memory(mix.insns[3], 1) == x86.breakpoint
    engine.disable(p)
    engine.run_until_foreign(target.tid)
    assert hits == [] and p.hits == 0
    engine.remove_probe(p)
    assert target.read_memory(mix.insns[3], 1) == original
    assert engine.sites == {}


def test_handler_redirects_the_pc(target, x86, mix):
    """A handler that moves the pc skips the probed instruction (here: g returns 1)."""
    engine = _engine(target, x86, mix)
    g = next(a for a in mix.insns if x86.decode(target.read_memory(a, 15), a).text == "endbr64")
    ret = next(a for a in mix.insns if a > g and x86.decode(target.read_memory(a, 15), a).text == "ret")

    def skip_to_ret(hit):
        hit.regs["rax"] = 1
        hit.regs["rip"] = ret

    engine.add_probe(g, skip_to_ret)
    engine.run_until_foreign(target.tid)
    assert engine.total_hits == 40


def test_forced_wrong_strategy_is_refused_and_target_untouched(target, x86, mix):
    engine = _engine(target, x86, mix)
    call = next(a for a in mix.insns if x86.decode(target.read_memory(a, 15), a).mnemonic == "call")
    before = target.read_memory(call, 5)
    with pytest.raises(RefusedError, match="strategy 'boost' is not correct for 'call"):
        engine.add_probe(call, strategy="boost")
    assert target.read_memory(call, 5) == before
    syscall = next(a for a in mix.insns
                   if x86.decode(target.read_memory(a, 15), a).mnemonic == "syscall")
    with pytest.raises(RefusedError, match="correct strategies: ssol, inline"):
        engine.add_probe(syscall, strategy=Strategy.EMULATE)


def test_unprobeable_and_misaligned_addresses(target, x86, mix):
    engine = _engine(target, x86, mix)
    end = mix.insns[-1]
    trap = end + x86.decode(target.read_memory(end, 15), end).length
    # the program's own int3 sits after the last text instruction of _start's block
    int3 = next(a for a in range(mix.entry, trap + 64) if target.read_memory(a, 1) == b"\xcc")
    with pytest.raises(RefusedError, match="breakpoint instruction itself"):
        engine.add_probe(int3)
    push = mix.insns[3]
    engine.add_probe(mix.insns[2])  # lea r12, [rip+table]: 7 bytes
    with pytest.raises(ProbeError, match="inside the instruction probed"):
        engine.add_probe(mix.insns[2] + 3)
    assert push
