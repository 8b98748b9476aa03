"""Return probes on compiled s390x code, on both reference CPUs (unicorn and qemu):
recursion, a __builtin_longjmp that leaves two frames, a tail call (jg), a return probe
removed while calls are in flight, and UBP letting go in the middle of a recursion.

The program (tests/progs/returns/returns.c) and the checks are the ones of
tests/test_powerpc_returns.py; only the bench differs.  On s390x the return address is
r14, saved by the callee (stmg) in its caller's frame and reloaded with r15 (lmg): the
stack pointer a caller sees after the return is the one at the entry.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from test_powerpc_returns import (
    PROBED,
    STRATEGIES,
    Bench,
    check_removed_in_flight,
    check_run,
    check_strategy_used,
    entry_allows,
    let_go_at,
    let_go_points,
    new_engine,
    run,
)
from test_s390_programs import CC, CFLAGS, RETURN_PAGE, XOL, Program, call, load

from ubp_core.conformance.kit import select_cpus
from ubp_core.elfinfo import ElfImage

SOURCE = os.path.join(os.path.dirname(__file__), "progs", "returns", "returns.c")


def build(out_dir) -> Program:
    if shutil.which(CC) is None:
        pytest.skip(f"{CC} not installed (Debian gcc-s390x-linux-gnu)")
    path = os.path.join(str(out_dir), "returns.s390x")
    subprocess.run([CC, *CFLAGS, "-o", path, SOURCE], check=True)
    segments = []
    with ElfImage(path) as img:
        for seg in img.elf.iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            flags = seg["p_flags"]
            prot = ("r" if flags & 4 else "") + ("w" if flags & 2 else "") + \
                   ("x" if flags & 1 else "")
            segments.append((seg["p_vaddr"], seg.data() + bytes(seg["p_memsz"] - seg["p_filesz"]),
                             prot))
        functions = {s.name: (s.address, s.size) for s in img.functions()}
    return Program(path, segments, functions)


@pytest.fixture(scope="module", params=["unicorn", "qemu"])
def bench(request, plugins, tmp_path_factory):
    arch = plugins.arch("s390x")
    cpus = select_cpus(plugins, arch, [request.param])
    if not cpus:
        pytest.skip(f"reference CPU {request.param} is not available here")
    prog = build(tmp_path_factory.mktemp("s390-returns"))
    target = cpus[0].open()
    try:
        load(target, prog)
        entries = {name: prog.functions[name][0] for name in PROBED}
        b = Bench(arch, target, prog.path, entries, lambda n: call(target, arch, prog, n),
                  XOL, RETURN_PAGE)
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


def test_the_callee_restores_the_stack_pointer(bench):
    """What sp_after_return assumes on s390x: at the return r15 is the entry's (the
    trampoline matches frames with it), and r14 at the entry is the return address."""
    b, _ = bench
    arch, target = b.arch, b.target
    b.start(3)
    engine = new_engine(b)
    seen = []

    def at_entry(hit):
        seen.append(("entry", hit.regs["r15"], hit.return_address))

    def at_return(hit):
        seen.append(("return", hit.regs["r15"], hit.regs[arch.abi.pc]))

    engine.add_probe(b.entries["fact"], at_entry)
    engine.add_return_probe(b.entries["fact"], at_return)
    engine.run_until_foreign(target.tid, timeout=60)
    engine.remove_all()
    entries = [s for s in seen if s[0] == "entry"]
    returns = [s for s in seen if s[0] == "return"]
    assert len(entries) == len(returns) == 6  # fact(3) at the start and at the end
    # innermost first: the k-th return of a recursion pairs with its last-but-k entry
    for part in (slice(0, 3), slice(3, 6)):
        assert [r[1:] for r in returns[part]] == [e[1:] for e in reversed(entries[part])]
    assert len({e[1] for e in entries[:3]}) == 3  # three depths, three stack pointers
