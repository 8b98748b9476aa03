"""Real compiled s390x code on the reference CPUs: every instruction of cross-compiled C
functions (tests/progs/s390/funcs.c) probed, under each strategy; the results must equal
the unprobed run's."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass

import pytest

from ubp_core.conformance.kit import select_cpus
from ubp_core.elfinfo import ElfImage
from ubp_core.engine import Engine
from ubp_core.errors import RefusedError
from ubp_core.refcpu import PAGE
from ubp_core.target import StopKind
from ubp_core.types import Strategy
from ubp_core.xol import XolAllocator

CC = "s390x-linux-gnu-gcc"
SOURCE = os.path.join(os.path.dirname(__file__), "progs", "s390", "funcs.c")
TEXT = 0x10000000
STACK_TOP = 0x12000000
STACK_PAGES = 16
RETURN_PAGE = 0x12100000
XOL = TEXT + (1 << 30)  # within the 4 GiB a boost's brcl back reaches
XOL_FAR = TEXT + (1 << 34)  # beyond it: boosts fall back to SSOL
CFLAGS = ("-O2", "-march=z13", "-ffreestanding", "-fno-stack-protector", "-nostdlib",
          "-static", "-Wl,-e,run", "-Wl,--build-id=none", f"-Wl,-Ttext-segment={TEXT:#x}")


@dataclass
class Program:
    path: str
    segments: list[tuple[int, bytes, str]]  # address, bytes (file + zero fill), prot
    functions: dict[str, tuple[int, int]]  # name -> (address, size)

    def insns(self, arch) -> list[int]:
        out = []
        with ElfImage(self.path) as img:
            for addr, size in self.functions.values():
                out += [i.address for i in arch.decode_all(img.read(addr, size), addr)]
        return sorted(out)


def build(out_dir) -> Program:
    if shutil.which(CC) is None:
        pytest.skip(f"{CC} not installed (Debian gcc-s390x-linux-gnu)")
    path = os.path.join(str(out_dir), "funcs.s390x")
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


def load(target, prog: Program) -> None:
    target.filler = None
    for addr, data, prot in prog.segments:
        start = addr & ~(PAGE - 1)
        end = (addr + len(data) + PAGE - 1) & ~(PAGE - 1)
        target.map_region(start, end - start, prot)
        target.write_memory(addr, data)
    target.map_region(STACK_TOP - STACK_PAGES * PAGE, STACK_PAGES * PAGE, "rw")
    target.map_region(RETURN_PAGE, PAGE, "rx")
    target.write_memory(RETURN_PAGE, target.arch.breakpoint * (PAGE // 2))
    target.map_region(XOL, 16 * PAGE, "rx")
    target.map_region(XOL_FAR, 16 * PAGE, "rx")


def snapshot(target, prog: Program) -> bytes:
    data = b"".join(target.read_memory(a, len(d)) for a, d, p in prog.segments if "w" in p)
    return data + target.read_memory(STACK_TOP - STACK_PAGES * PAGE, STACK_PAGES * PAGE)


def call(target, arch, prog: Program, n: int) -> None:
    """Registers for ``run(n)``: argument, stack with its save area, r14 into breakpoints,
    floating-point and vector registers zero."""
    for addr, data, prot in prog.segments:
        if "w" in prot:
            target.write_memory(addr, data)
    target.write_memory(STACK_TOP - STACK_PAGES * PAGE, bytes(STACK_PAGES * PAGE))
    regs = target.get_regs(target.tid)
    fresh = {r: 0 for r in arch.registers}
    fresh.update(pswm=regs["pswm"], pswa=prog.functions["run"][0], r2=n, r14=RETURN_PAGE,
                 r15=STACK_TOP - 1024)
    target.set_regs(target.tid, fresh)
    # the floating-point and vector registers too: run() saves the caller's f8-f15 on the
    # stack, which would keep whatever an earlier run (a broken one) left there
    ext = target.get_ext_state()
    if ext is not None:
        target.set_ext_state(bytes(len(ext)))


def run(target, arch, prog: Program, n: int, strategy, area=XOL):
    """(r2, memory, stop pc, hits per address, strategies used); strategy None: unprobed,
    "default": the default policy."""
    call(target, arch, prog, n)
    hits: Counter = Counter()
    used: Counter = Counter()
    if strategy is None:
        target.resume(target.tid)
        stop = target.wait(60)
    else:
        xol = XolAllocator(target, arch.xol_slot_size, arch.branch_reach)
        xol.add_area(area, 16 * PAGE)
        engine = Engine(target, arch, xol=xol, handler_errors="raise")

        def count(hit):
            hits[hit.probe.address] += 1

        for addr in prog.insns(arch):
            want = None if strategy == "default" else strategy
            if want is not None and want not in engine.analyze(addr).strategies:
                want = None  # not correct for this one: the default policy
            try:
                probe = engine.add_probe(addr, count, strategy=want)
            except RefusedError:
                continue
            used[probe.strategy] += 1
        stop = engine.run_until_foreign(target.tid, max_hits=500000, timeout=120)
        engine.remove_all()
    regs = target.get_regs(target.tid)
    assert stop.kind is StopKind.TRAP, stop
    pc = (regs["pswa"] - arch.pc_after_trap) & ((1 << 64) - 1)
    return regs["r2"], snapshot(target, prog), pc, hits, used


CPUS = {"unicorn": 3, "qemu": 1}  # the argument of run(): qemu's stub is slower
STRATEGIES = [Strategy.EMULATE, Strategy.BOOST, Strategy.SSOL, Strategy.INLINE, "default"]


def per_cpu(strategies=(None,)):
    """(cpu, strategy) parameters; on qemu only the default policy runs by default (its
    stub costs a round trip per register and step): the rest is -m corpus."""
    out = []
    for cpu in CPUS:
        for strategy in strategies:
            slow = cpu == "qemu" and strategy != "default"
            out.append(pytest.param(cpu, strategy, id=f"{cpu}-{strategy}",
                                    marks=[pytest.mark.corpus] if slow else []))
    return out


@pytest.fixture(scope="module")
def bench(request, plugins, tmp_path_factory):
    arch = plugins.arch("s390x")
    cpus = select_cpus(plugins, arch, [request.param])
    if not cpus:
        pytest.skip(f"reference CPU {request.param} is not available here")
    prog = build(tmp_path_factory.mktemp("s390"))
    target = cpus[0].open()
    try:
        load(target, prog)
        n = CPUS[request.param]
        yield arch, prog, target, n, run(target, arch, prog, n, None)
    finally:
        target.close()


@pytest.mark.parametrize("bench,strategy", per_cpu(STRATEGIES), indirect=["bench"])
def test_probe_on_every_instruction(bench, strategy):
    arch, prog, target, n, bare = bench
    r2, memory, pc, _, _ = bare
    assert pc == RETURN_PAGE and r2 != 0
    got = run(target, arch, prog, n, strategy)
    assert got[2] == RETURN_PAGE
    assert got[0] == r2
    assert got[1] == memory
    hits, used = got[3], got[4]
    assert sum(hits.values()) > 1000
    if isinstance(strategy, Strategy):
        assert used[strategy] > 0.2 * sum(used.values()), used
    if strategy == "default":
        assert {Strategy.EMULATE, Strategy.BOOST, Strategy.SSOL} <= set(used), used


@pytest.mark.parametrize("bench,strategy", per_cpu(), indirect=["bench"])
def test_every_probe_is_hit_as_often_under_every_strategy(bench, strategy):
    arch, prog, target, n, _ = bench
    ref = run(target, arch, prog, n, Strategy.SSOL)[3]
    assert run(target, arch, prog, n, "default")[3] == ref
    assert run(target, arch, prog, n, Strategy.INLINE)[3] == ref


@pytest.mark.parametrize("bench,strategy", per_cpu(), indirect=["bench"])
def test_boosts_fall_back_when_the_xol_area_is_out_of_reach(bench, strategy):
    arch, prog, target, n, bare = bench
    got = run(target, arch, prog, n, "default", area=XOL_FAR)
    assert got[:3] == bare[:3]
    assert Strategy.BOOST not in got[4] and got[4][Strategy.SSOL] > 0


@pytest.mark.parametrize("bench", ["unicorn"], indirect=True)
def test_a_probe_on_an_execute_target_changes_what_the_execute_runs(bench):
    """Why EXECUTE targets are refused in context: with them probed too, the EXECUTEs
    of funcs.c run the breakpoint instead of their mvc, and the program goes wrong."""
    from ubp_s390 import S390x

    class ProbesExecuteTargets(S390x):
        def analyze_in_context(self, found, read):
            return found

    arch, prog, target, n, bare = bench
    blind = ProbesExecuteTargets()
    refused = [a for a in prog.insns(arch)
               if arch.analyze_in_context(arch.analyze(arch.decode(
                   target.read_memory(a, 6), a)), target.read_memory).kind == "execute-target"]
    assert refused  # the exrl and the hand-written ex of funcs.c name their targets
    try:
        got = run(target, blind, prog, n, Strategy.SSOL)[:3]
    except AssertionError:  # it stopped at a breakpoint no probe owns
        got = None
    assert got != bare[:3]
    # the plugin's own context rule keeps the same run right
    assert run(target, arch, prog, n, Strategy.SSOL)[:3] == bare[:3]


def test_the_program_exercises_what_the_plugin_treats_specially(plugins, tmp_path):
    arch = plugins.arch("s390x")
    prog = build(tmp_path)
    with ElfImage(prog.path) as img:
        kinds = Counter()
        for addr, size in prog.functions.values():
            for insn in arch.decode_all(img.read(addr, size), addr):
                kinds[arch.analyze(insn).kind] += 1
    for kind in ("rel-branch", "rel-call", "abs-branch", "abs-call", "larl", "rel-long",
                 "execute", "plain"):
        assert kinds[kind] > 0, kinds
