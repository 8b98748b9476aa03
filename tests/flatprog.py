"""Small assembled programs run on a reference CPU, with or without probes.

A program is linked at fixed addresses (text, data) and ends on the arch's breakpoint
instruction; running it through the engine with probes on every instruction must give
the same registers and memory as running it bare.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from ubp_core.elfinfo import ElfImage
from ubp_core.engine import Engine
from ubp_core.refcpu import PAGE
from ubp_core.target import StopKind
from ubp_core.xol import XolAllocator

PROGS = os.path.join(os.path.dirname(__file__), "progs")
STACK = 0x500000
STACK_PAGES = 16
XOL = 0x40600000


def build(source: str, tmp_path, text=0x401000, data=0x402000, as_="as", ld="ld",
          asflags=("--64",)) -> str:
    if not shutil.which(as_) or not shutil.which(ld):
        pytest.skip(f"{as_}/{ld} not installed")
    obj = tmp_path / "prog.o"
    elf = tmp_path / "prog.elf"
    subprocess.run([as_, *asflags, "-o", str(obj), os.path.join(PROGS, source)], check=True)
    subprocess.run([ld, "-o", str(elf), f"-Ttext={text:#x}", f"-Tdata={data:#x}", "-e", "_start",
                    str(obj)], check=True)
    return str(elf)


@dataclass
class Program:
    entry: int
    sections: list[tuple[int, bytes, str]]  # address, bytes, prot
    insns: list[int]  # every instruction address of the text, the final trap excluded


def load(path: str, arch) -> Program:
    with ElfImage(path) as img:
        entry = img.elf["e_entry"]
        sections = []
        insns: list[int] = []
        for name, prot in ((".text", "rx"), (".data", "rw")):
            sec = img.elf.get_section_by_name(name)
            if sec is None:
                continue
            data = sec.data()
            sections.append((sec["sh_addr"], data, prot))
            if name == ".text":
                for insn in arch.decode_all(data, sec["sh_addr"]):
                    if insn.raw != arch.breakpoint:
                        insns.append(insn.address)
    return Program(entry, sections, insns)


@dataclass
class Result:
    regs: dict[str, int]
    memory: bytes
    stop: StopKind
    hits: int
    executed: int


def _setup(target, arch, prog: Program) -> None:
    target.filler = None
    for addr, data, prot in prog.sections:
        size = (len(data) + PAGE - 1) & ~(PAGE - 1)
        target.map_region(addr, size, prot)
        target.write_memory(addr, data + bytes(size - len(data)))
    target.map_region(STACK - STACK_PAGES * PAGE, STACK_PAGES * PAGE, "rw")
    target.write_memory(STACK - STACK_PAGES * PAGE, bytes(STACK_PAGES * PAGE))
    target.map_region(XOL, PAGE, "rx")
    regs = target.get_regs(target.tid)
    fresh = {r: 0 for r in arch.registers}
    fresh[arch.abi.pc] = prog.entry
    fresh[arch.abi.sp] = STACK - 256
    if arch.abi.flags:
        fresh[arch.abi.flags] = regs[arch.abi.flags]
    target.set_regs(target.tid, fresh)


def _snapshot(target, arch, prog: Program, stop, hits: int, executed: int) -> Result:
    regs = target.get_regs(target.tid)
    values = {r: regs[r] for r in arch.registers}
    mem = b"".join(target.read_memory(a, len(d)) for a, d, p in prog.sections if "w" in p)
    mem += target.read_memory(STACK - STACK_PAGES * PAGE, STACK_PAGES * PAGE)
    return Result(values, mem, stop.kind, hits, executed)


def run_bare(target, arch, prog: Program) -> Result:
    """Run the program freely to its end; count its instructions in a stepped run.

    The state comes from the free run: a single-step is itself visible to some
    instructions (the trap flag in pushf's image, in syscall's r11).
    """
    _setup(target, arch, prog)
    text = [(a, a + len(d)) for a, d, p in prog.sections if "x" in p]
    executed = 0
    last = None
    while True:
        pc = target.get_regs(target.tid)[arch.abi.pc]
        if target.read_memory(pc, len(arch.breakpoint)) == arch.breakpoint:
            break
        target.resume(target.tid, step=True)
        stop = target.wait()
        if stop.kind is not StopKind.TRAP:
            break
        # a rep iteration steps without moving: one instruction, one probe hit
        if pc != last and any(lo <= pc < hi for lo, hi in text):
            executed += 1
        last = pc
    _setup(target, arch, prog)
    target.resume(target.tid)
    stop = target.wait()
    return _snapshot(target, arch, prog, stop, 0, executed)


def run_probed(target, arch, prog: Program, strategy=None, handler=None) -> tuple[Result, Engine]:
    """Run the program to its end with a probe on every instruction."""
    _setup(target, arch, prog)
    xol = XolAllocator(target, arch.xol_slot_size, arch.branch_reach)
    xol.add_area(XOL, PAGE)
    engine = Engine(target, arch, xol=xol, handler_errors="raise")
    for addr in prog.insns:
        analysis = engine.analyze(addr)
        if strategy is not None and strategy not in analysis.strategies:
            engine.add_probe(addr, handler)
        else:
            engine.add_probe(addr, handler, strategy=strategy)
    stop = engine.run_until_foreign(target.tid)
    engine.remove_all()
    return _snapshot(target, arch, prog, stop, engine.total_hits, 0), engine
