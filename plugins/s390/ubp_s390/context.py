"""Instructions that are safe alone but not where they sit: targets of EXECUTE.

An EXECUTE runs the instruction at its target address as the CPU finds it in memory.
A breakpoint there is what the EXECUTE would run: an operation exception reported at
the EXECUTE (Linux uprobes has the same trap).  Compilers and glibc place EXECUTE
targets next to the code that runs them ("exrl r,target", or "larl rX,target" then
"ex r,0(rX)"), and nothing else branches to them, so a target is recognised by an
EXRL or a LARL-then-EX that names it within a page either side.
"""

from __future__ import annotations

from collections import OrderedDict

from ubp_core.errors import MemoryFault
from ubp_core.types import ReadMemory

from . import fields as f

PAGE = 4096
EX_WINDOW = 64  # how far after a larl the EX using its register may be


class ExecuteTargets:
    """Remembers, per page of code, the EXECUTE targets its instructions name.

    The memory is only ever the one behind the last reader seen (an engine's, or
    ``ubp analyze``'s for one function): another reader starts afresh.
    """

    def __init__(self, pages: int = 512) -> None:
        self._cache: OrderedDict[int, list[tuple[int, int]]] = OrderedDict()
        self._size = pages
        self._owner: object = None

    def executed_from(self, address: int, read: ReadMemory) -> int | None:
        """The address of an EXRL or EX that runs the instruction at ``address``."""
        owner = getattr(read, "__self__", read)
        if owner is not self._owner:
            self._owner = owner
            self._cache.clear()
        page = address & ~(PAGE - 1)
        for p in (page - PAGE, page, page + PAGE):
            for target, source in self._page(p, read):
                if target == address:
                    return source
        return None

    def _page(self, page: int, read: ReadMemory) -> list[tuple[int, int]]:
        got = self._cache.get(page)
        if got is None:
            got = _scan(page, read)
            self._cache[page] = got
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(page)
        return got


CHUNK = 64


def _read(read: ReadMemory, address: int, size: int) -> bytes:
    """What can be read of [address, address + size), zeros where nothing can."""
    try:
        return read(address, size)
    except MemoryFault:
        pass
    out = bytearray(size)
    for off in range(0, size, CHUNK):
        try:
            out[off:off + CHUNK] = read(address + off, min(CHUNK, size - off))
        except MemoryFault:
            continue
    return bytes(out)


def _scan(page: int, read: ReadMemory) -> list[tuple[int, int]]:
    """(target, source) of the EXRLs, and of the LARLs an EX then uses, on ``page``."""
    code = _read(read, page, PAGE)
    code += _read(read, page + PAGE, EX_WINDOW + 6)  # instructions crossing the page end
    found = []
    for op in (0xC6, 0xC0):
        at = code.find(bytes([op]))
        while 0 <= at < PAGE:
            if at % 2 == 0 and code[at + 1] & 0xF == 0 and at + 6 <= len(code):
                raw = code[at:at + 6]
                target = (page + at + 2 * f.i32(raw)) & f.MASK64
                if op == 0xC6 or _ex_uses(code, at + 6, f.r1(raw)):
                    found.append((target, page + at))
            at = code.find(bytes([op]), at + 1)
    return found


def _ex_uses(code: bytes, start: int, reg: int) -> bool:
    """True when an EX within EX_WINDOW bytes after ``start`` addresses through ``reg``."""
    if reg == 0:
        return False
    for at in range(start, min(start + EX_WINDOW, len(code) - 3), 2):
        raw = code[at:at + 4]
        if raw[0] == 0x44 and reg in (f.b2(raw), f.x2(raw)):
            return True
    return False
