"""Where conformance cases come from: the plugin's own list, real ELF files, random bytes."""

from __future__ import annotations

import random
from collections.abc import Iterator

from ..archops import ArchOps
from ..elfinfo import ElfImage
from ..errors import DecodeError, UbpError
from .runner import Case

RANDOM_BASE = 0x00600000


def plugin_cases(arch: ArchOps) -> list[Case]:
    """The plugin's hand-picked instructions, each at its own aligned address."""
    cases = []
    stride = max(32, arch.max_insn_len * 2)
    for i, (raw, note) in enumerate(arch.conformance_cases()):
        cases.append(Case(bytes(raw), 0x00401000 + i * stride, note, "plugin"))
    return cases


def elf_instructions(arch: ArchOps, path: str) -> Iterator[Case]:
    """Every instruction of every function symbol (or executable segment) of ``path``."""
    with ElfImage(path) as img:
        if not arch.handles_elf(img.ident):
            raise UbpError(f"{path} is {img.ident.machine} {img.ident.bits}-bit "
                           f"{img.ident.byteorder}-endian, not {arch.name}")
        funcs = img.functions()
        ranges = [(f.address, f.size, f.name) for f in funcs]
        if not ranges:
            ranges = [(lo, hi - lo, "") for lo, hi in img.executable_ranges()]
        seen: set[int] = set()
        for start, size, name in ranges:
            try:
                code = img.read(start, size)
            except UbpError:
                continue
            for insn in arch.decode_all(code, start):
                if insn.address in seen:
                    continue
                seen.add(insn.address)
                yield Case(insn.raw, insn.address, name, f"elf:{path}")


def elf_cases(arch: ArchOps, path: str, sample: int | None, seed: int = 0) -> tuple[list[Case], int]:
    """(a deterministic sample of ``sample`` instructions of ``path``, total available)."""
    everything = list(elf_instructions(arch, path))
    total = len(everything)
    if sample is not None and sample < total:
        everything = random.Random(seed).sample(everything, sample)
    everything.sort(key=lambda c: c.address)
    return everything, total


def random_cases(arch: ArchOps, count: int, seed: int = 0) -> list[Case]:
    """``count`` random valid encodings (as the plugin's decoder sees them)."""
    rng = random.Random(seed ^ 0x5EED)
    cases: list[Case] = []
    tries = 0
    while len(cases) < count and tries < count * 50:
        tries += 1
        raw = arch.random_encoding(rng)
        address = RANDOM_BASE + rng.randrange(0, 1 << 22) * arch.insn_alignment
        try:
            insn = arch.decode(raw, address)
        except DecodeError:
            continue
        cases.append(Case(insn.raw, address, "random", "random"))
    return cases
