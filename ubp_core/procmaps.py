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
    #: (major, minor) of the file's device, as the kernel reports it
    dev: tuple[int, int] = (0, 0)

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
            major, _, minor = parts[3].partition(":")
            out.append(Mapping(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16),
                               int(parts[4]), path, (int(major, 16), int(minor or "0", 16))))
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


def mapped_file(pid: int, m: Mapping) -> str | None:
    """A path UBP can open that is the very file ``m`` maps in process ``pid`` (None:
    none found).

    The path in /proc/PID/maps names the file in the program's mount namespace; in UBP's
    it may be another file or none (a container, a private bind mount), and symbols
    read from another build would put breakpoints at wrong addresses.  The device and
    inode the kernel reports tell.  Tried in turn: the path itself; the mapping's own
    link in /proc/PID/map_files (the file itself; needs CAP_SYS_ADMIN or
    CAP_CHECKPOINT_RESTORE); the path under the program's root, /proc/PID/root.  An
    overlay file system reports the underlying device for a mapping and its own to
    stat, so the inode alone is the last resort."""
    def same(path: str, dev_too: bool = True) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        return st.st_ino == m.inode and (
            not dev_too or (os.major(st.st_dev), os.minor(st.st_dev)) == m.dev)

    if same(m.path):
        return m.path
    link = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
    try:
        with open(link, "rb"):
            return link
    except OSError:
        pass
    rooted = f"/proc/{pid}/root{m.path}"
    if same(rooted):
        return rooted
    if same(m.path, dev_too=False):
        return m.path
    return None


def exe_path(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/exe")
