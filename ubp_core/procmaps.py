"""/proc/PID/maps: which file is mapped where in a live process."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str

    @property
    def executable(self) -> bool:
        return "x" in self.perms

    @property
    def is_file(self) -> bool:
        return self.inode != 0 and self.path.startswith("/")


def read_maps(pid: int) -> list[Mapping]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 5:
                continue
            lo, hi = parts[0].split("-")
            path = parts[5].rstrip("\n") if len(parts) > 5 else ""
            out.append(Mapping(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16),
                               int(parts[4]), path))
    return out


def free_gap_near(maps: list[Mapping], near: int, size: int, reach: int,
                  floor: int = 0x10000, ceiling: int = 1 << 47) -> int | None:
    """A page-aligned free range of ``size`` bytes within ``reach`` of ``near``
    (closest first), or None."""
    taken = sorted((m.start, m.end) for m in maps)
    gaps = []
    prev = floor
    for lo, hi in taken:
        if lo > prev:
            gaps.append((prev, lo))
        prev = max(prev, hi)
    if ceiling > prev:
        gaps.append((prev, ceiling))
    best = None
    guard = 1 << 16  # keep a little distance from neighbours (stack growth, guard pages)
    for lo, hi in gaps:
        lo, hi = lo + guard, hi - guard
        if hi - lo < size:
            continue
        # the point of [lo, hi - size] closest to near
        cand = min(max(near, lo), hi - size) & ~0xFFF
        if cand < lo:
            cand += 0x1000
        if cand + size > hi:
            continue
        dist = max(abs(cand - near), abs(cand + size - near))
        if reach and dist >= reach:
            continue
        if best is None or dist < best[0]:
            best = (dist, cand)
    return None if best is None else best[1]


def exe_path(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/exe")
