"""XOL (execute out of line) slots.

Boosted probes own their slot for as long as the engine lives: a thread may be running
through it at any moment without telling us.  Single-step slots are taken per
in-flight step and given back when the step finishes, so two threads never share one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import TargetError
from .target import Target

PAGE = 4096


@dataclass(slots=True)
class XolArea:
    base: int
    size: int
    slot_size: int
    free: list[int] = field(default_factory=list)
    next_unused: int = 0

    def contains(self, address: int) -> bool:
        return self.base <= address < self.base + self.size

    def take(self) -> int | None:
        if self.free:
            return self.free.pop()
        if self.next_unused + self.slot_size <= self.size:
            slot = self.base + self.next_unused
            self.next_unused += self.slot_size
            return slot
        return None


class XolAllocator:
    """Hands out slots from areas the target maps on demand, near the code they serve."""

    def __init__(self, target: Target, slot_size: int, reach: int = 0,
                 area_size: int = 16 * PAGE) -> None:
        self.target = target
        self.slot_size = slot_size
        self.reach = reach
        self.area_size = area_size
        self.areas: list[XolArea] = []

    def add_area(self, base: int, size: int) -> XolArea:
        """Use an area mapped by someone else (a reference CPU's fixed layout)."""
        area = XolArea(base, size, self.slot_size)
        self.areas.append(area)
        return area

    def _within(self, area: XolArea, near: int, reach: int) -> bool:
        if not reach:
            return True
        lo, hi = area.base, area.base + area.size
        return abs(lo - near) < reach - PAGE and abs(hi - near) < reach - PAGE

    def slot(self, near: int, reach: int | None = None) -> int:
        """A free slot within ``reach`` of ``near`` (default: the arch's branch reach)."""
        reach = self.reach if reach is None else reach
        if len(self.areas) == 1 and self._within(self.areas[0], near, reach):
            # the common case (one area, in reach): no sorting on the hit path
            slot = self.areas[0].take()
            if slot is not None:
                return slot
        candidates = [a for a in self.areas if self._within(a, near, reach)]
        candidates.sort(key=lambda a: abs(a.base - near))
        for area in candidates:
            slot = area.take()
            if slot is not None:
                return slot
        try:
            base = self.target.map_xol(near, self.area_size, reach)
        except TargetError:
            raise
        area = self.add_area(base, self.area_size)
        if not self._within(area, near, reach):
            # the target could only map it out of reach: keep it for other uses
            raise TargetError(
                f"no XOL area within {reach:#x} bytes of {near:#x} (got {base:#x})")
        slot = area.take()
        assert slot is not None
        return slot

    def release(self, slot: int) -> None:
        for area in self.areas:
            if area.contains(slot):
                area.free.append(slot)
                return

    def area_of(self, address: int) -> XolArea | None:
        for area in self.areas:
            if area.contains(address):
                return area
        return None

    def clone_for(self, target: Target, in_use: set[int]) -> XolAllocator:
        """The allocator of a forked copy: same areas; slots stepped in at the fork
        stay taken (the child may be about to run the jump back in one)."""
        twin = XolAllocator(target, self.slot_size, self.reach, self.area_size)
        for area in self.areas:
            copy = XolArea(area.base, area.size, area.slot_size,
                           [s for s in area.free if s not in in_use], area.next_unused)
            twin.areas.append(copy)
        return twin
