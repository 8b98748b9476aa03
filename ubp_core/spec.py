"""Probe specs as people write them for perf probe and bpftrace.

    SYMBOL                 a function of the program (or, failing that, of its libraries)
    SYMBOL+OFFSET          an instruction inside it (must be an instruction boundary)
    MODULE:SYMBOL[+OFFSET] in a library or executable: a path or a short name (libc)
    MODULE:0xOFFSET        an address in MODULE's own link-time address space, as
                           ``objdump -d`` and ``readelf -s`` print it (UBP adds the
                           load bias)
    0xADDRESS              an absolute address in the running process
    SYMBOL%return          the function's return (return probes)

A SYMBOL may be a shell-style pattern (``libc:str*``, ``prog:*``): one probe on the
entry of every matching function.

Typed fields may follow, separated by spaces: ``libc:open path:str flags:i32`` names the
first arguments in order; at a return probe ``ret:TYPE`` is the return value.  Types:
u8 u16 u32 u64 i8 i16 i32 i64 (integers), x (hex), str or str[N] (a NUL-terminated
string read from the target, at most N bytes, 256 by default).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ProbeError

_SYMBOL = re.compile(r"^[A-Za-z_.$@*?\[][\w.$@:<>,~*?&() \[\]-]*$")


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    text: str
    module: str | None  # path or short name; None: the program (then its libraries)
    symbol: str | None  # None: an address
    offset: int  # added to the symbol; or the address itself when symbol is None
    absolute: bool  # 0xADDRESS: a run-time address, no module
    ret: bool = False  # SYMBOL%return
    #: typed fields to show: (name, type) -- arguments in order, or "ret" at a return
    fields: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return self.text

    @property
    def is_glob(self) -> bool:
        return self.symbol is not None and any(c in self.symbol for c in "*?[")


def _split_module(text: str) -> tuple[str | None, str]:
    """Split at the first ':' that is not part of '::' (C++ names)."""
    i = 0
    while True:
        i = text.find(":", i)
        if i < 0:
            return None, text
        if text[i:i + 2] == "::":
            i += 2
            continue
        if i > 0 and text[i - 1] == ":":
            i += 1
            continue
        return text[:i], text[i + 1:]


def _number(text: str, what: str, spec: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise ProbeError(f"probe {spec!r}: {what} {text!r} is not a number "
                         "(use decimal or 0x-prefixed hex)") from None


FIELD_TYPES = ("u8", "u16", "u32", "u64", "i8", "i16", "i32", "i64", "x", "str")
_FIELD = re.compile(r"^([A-Za-z_]\w*):(u8|u16|u32|u64|i8|i16|i32|i64|x|str(?:\[(\d+)\])?)$")


def _fields(text: str, items: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        m = _FIELD.match(item)
        if not m:
            raise ProbeError(f"probe {text!r}: field {item!r} is not NAME:TYPE with TYPE one "
                             f"of {', '.join(FIELD_TYPES)} (str[N] for a bound)")
        out.append((m.group(1), m.group(2)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ProbeError(f"probe {text!r}: a field name is given twice")
    return tuple(out)


def parse_spec(text: str) -> ProbeSpec:
    spec = text.strip()
    if not spec:
        raise ProbeError("empty probe spec")
    words = spec.split()
    location, fields = words[0], words[1:]
    spec = location
    typed = _fields(text, fields) if fields else ()
    body, ret = spec, False
    if body.endswith("%return"):
        body, ret = body[: -len("%return")], True
    module, rest = _split_module(body)
    if module is not None and not module:
        raise ProbeError(f"probe {text!r}: empty module name before ':'")
    if not rest:
        raise ProbeError(f"probe {text!r}: nothing after the module name")
    if rest.lower().startswith("0x") or rest.isdigit():
        value = _number(rest, "address", text)
        if ret:
            raise ProbeError(f"probe {text!r}: %return needs a function name, not an address")
        return ProbeSpec(text, module, None, value, absolute=module is None, fields=typed)
    symbol, plus, off = rest.partition("+")
    offset = _number(off, "offset", text) if plus else 0
    if offset < 0:
        raise ProbeError(f"probe {text!r}: negative offset")
    if not _SYMBOL.match(symbol):
        raise ProbeError(f"probe {text!r}: {symbol!r} is not a symbol name")
    if ret and offset:
        raise ProbeError(f"probe {text!r}: %return applies to a function entry, not +offset")
    if typed and not ret and any(n in ("ret", "retval") for n, _ in typed):
        raise ProbeError(f"probe {text!r}: a return value field needs SYMBOL%return")
    return ProbeSpec(text, module, symbol, offset, absolute=False, ret=ret, fields=typed)
