"""Shared by the powerpc tests (no tests here): the three variants, their libcs and compilers."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from ubp_core.conformance.kit import select_cpus
from ubp_core.elfinfo import ElfImage
from ubp_core.refcpu import PAGE

VARIANTS = {
    # name -> (libc of that variant, cross compiler)
    "ppc64le": ("/usr/powerpc64le-linux-gnu/lib/libc.so.6", "powerpc64le-linux-gnu-gcc"),
    "ppc64": ("/usr/powerpc64-linux-gnu/lib/libc.so.6", "powerpc64-linux-gnu-gcc"),
    "ppc32": ("/usr/powerpc-linux-gnu/lib/libc.so.6", "powerpc-linux-gnu-gcc"),
}
PROGS = os.path.join(os.path.dirname(__file__), "progs", "powerpc")


def arch_of(plugins, name: str):
    return plugins.arch(name)


def libc_of(name: str) -> str:
    path = VARIANTS[name][0]
    if not os.path.exists(path):
        pytest.skip(f"{path} not installed (Debian libc6-*-cross)")
    return path


def qemu_cpu(plugins, arch):
    for cpu in select_cpus(plugins, arch, ["qemu"]):
        return cpu
    pytest.skip(f"no qemu reference CPU for {arch.name} here (qemu-user and the cross gcc)")


def compile_c(name: str, source: str, out_dir, *flags: str) -> str:
    cc = VARIANTS[name][1]
    if shutil.which(cc) is None:
        pytest.skip(f"{cc} not installed")
    out = os.path.join(str(out_dir), f"{os.path.basename(source)}.{name}")
    subprocess.run([cc, *flags, "-o", out, os.path.join(PROGS, source)], check=True)
    return out


# --------------------------------------------------------------------------- programs
# A freestanding program (tests/progs/powerpc/*.c) is loaded into a scratch target at
# its link addresses and one of its functions is called the way the ABI calls it; the
# call returns to a page of breakpoints.
TEXT = 0x10000000
STACK_TOP = 0x12000000
STACK_PAGES = 16
RETURN_PAGE = 0x12100000
XOL = TEXT + (8 << 20)  # within the 32 MiB a boost's jump back reaches
XOL_FAR = TEXT + (1 << 28)  # beyond it: boosts fall back to SSOL
CFLAGS = ("-O2", "-G", "0", "-ffreestanding", "-fno-builtin", "-fno-tree-loop-distribute-patterns",
          "-fno-stack-protector", "-nostdlib", "-static", "-Wl,-e,run", "-Wl,--build-id=none",
          f"-Wl,-Ttext-segment={TEXT:#x}")


@dataclass
class Program:
    path: str
    segments: list[tuple[int, bytes, str]]  # address, bytes (file + zero fill), prot
    functions: dict[str, tuple[int, int]]  # name -> (code address, size)
    tocs: dict[str, int]  # name -> TOC pointer (ELFv1 descriptors)

    def insns(self, arch, names=None) -> list[int]:
        out = []
        with ElfImage(self.path) as img:
            for name, (addr, size) in self.functions.items():
                if names is None or name in names:
                    out += [i.address for i in arch.decode_all(img.read(addr, size), addr)]
        return sorted(out)


def build_program(name: str, source: str, out_dir) -> Program:
    path = compile_c(name, source, out_dir, *CFLAGS)
    segments = []
    with ElfImage(path) as img:
        for seg in img.elf.iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            flags = seg["p_flags"]
            prot = ("r" if flags & 4 else "") + ("w" if flags & 2 else "") + ("x" if flags & 1 else "")
            data = seg.data() + bytes(seg["p_memsz"] - seg["p_filesz"])
            segments.append((seg["p_vaddr"], data, prot))
        functions = {s.name: (s.address, s.size) for s in img.functions()}
        tocs = {}
        symtab = img.elf.get_section_by_name(".symtab")
        for sym in symtab.iter_symbols():
            sec = sym["st_shndx"]
            if sym["st_info"]["type"] == "STT_FUNC" and isinstance(sec, int) \
                    and img.elf.get_section(sec).name == ".opd":
                raw = img.read(sym["st_value"] + 8, 8)
                tocs[sym.name] = int.from_bytes(raw, "big")
    return Program(path, segments, functions, tocs)


def load_program(target, prog: Program) -> None:
    target.filler = None
    for addr, data, prot in prog.segments:
        start = addr & ~(PAGE - 1)
        end = (addr + len(data) + PAGE - 1) & ~(PAGE - 1)
        target.map_region(start, end - start, prot)
        target.write_memory(addr, data)
    target.map_region(STACK_TOP - STACK_PAGES * PAGE, STACK_PAGES * PAGE, "rw")
    target.map_region(RETURN_PAGE, PAGE, "rx")
    bp = (target.arch.breakpoint * (PAGE // 4))
    target.write_memory(RETURN_PAGE, bp)


def reset_data(target, prog: Program) -> None:
    for addr, data, prot in prog.segments:
        if "w" in prot:
            target.write_memory(addr, data)
    target.write_memory(STACK_TOP - STACK_PAGES * PAGE, bytes(STACK_PAGES * PAGE))


def call_regs(arch, prog: Program, func: str, *args: int) -> dict[str, int]:
    """Registers for a call of ``func``: arguments, stack, a return address that traps."""
    entry = prog.functions[func][0]
    regs = {r: 0 for r in arch.registers}
    regs.update(pc=entry, lr=RETURN_PAGE, r1=STACK_TOP - 512, r12=entry)
    if func in prog.tocs:
        regs["r2"] = prog.tocs[func]
    for reg, value in zip(arch.abi.args, args):
        regs[reg] = value
    return regs


def data_snapshot(target, prog: Program) -> bytes:
    return b"".join(target.read_memory(a, len(d)) for a, d, p in prog.segments if "w" in p)
