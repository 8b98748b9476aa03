"""Typed fields of a hit: the arguments (or return value) a probe spec names."""

from __future__ import annotations

from .engine import Hit
from .errors import MemoryFault

_BITS = {"8": 8, "16": 16, "32": 32, "64": 64}


def decode(kind: str, value: int, hit: Hit) -> object:
    if kind in ("x", "u64"):
        return value if kind == "u64" else hex(value)
    if kind[0] in "ui":
        bits = _BITS[kind[1:]]
        value &= (1 << bits) - 1
        if kind[0] == "i" and value >> (bits - 1):
            value -= 1 << bits
        return value
    if kind.startswith("str"):
        limit = int(kind[4:-1]) if kind.endswith("]") else 256
        if value == 0:
            return None
        try:
            raw = hit.read_str(value, limit)
        except MemoryFault:
            return f"<unreadable {value:#x}>"
        return raw.decode("utf-8", "replace")
    raise ValueError(f"unknown field type {kind!r}")


def fields(spec, hit: Hit) -> dict[str, object]:
    """``{name: value}`` for a hit of a probe made from ``spec`` (a ProbeSpec)."""
    out: dict[str, object] = {}
    if not spec.fields:
        return out
    at_return = hit.frame is not None
    args = list(hit.call_args) if at_return else hit.args
    i = 0
    for name, kind in spec.fields:
        if name in ("ret", "retval"):
            out[name] = decode(kind, hit.retval, hit)
            continue
        if i < len(args):
            out[name] = decode(kind, args[i], hit)
        i += 1
    return out
