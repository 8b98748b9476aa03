"""The x86-64 Linux register file (``struct user_regs_struct``) as a register mapping."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

_FIELDS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
           "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
           "gs_base", "ds", "es", "fs", "gs")


class UserRegs(ctypes.Structure):
    """user_regs_struct, readable and writable by register name like a dict."""

    _fields_ = [(name, ctypes.c_uint64) for name in _FIELDS]

    names = _FIELDS

    # regs["rip"] is regs.rip through the C slot wrappers themselves: no Python frame
    # (plugins index registers by name on the hit path).  A c_uint64 field keeps the
    # low 64 bits of what is stored.
    __getitem__ = ctypes.Structure.__getattribute__
    __setitem__ = ctypes.Structure.__setattr__

    def __contains__(self, name: object) -> bool:
        return name in _FIELDS

    def __iter__(self) -> Iterator[str]:
        return iter(_FIELDS)

    def __len__(self) -> int:
        return len(_FIELDS)

    def keys(self) -> tuple[str, ...]:
        return _FIELDS

    def items(self) -> list[tuple[str, int]]:
        return [(n, getattr(self, n)) for n in _FIELDS]

    def get(self, name: str, default: int | None = None) -> int | None:
        return getattr(self, name) if name in _FIELDS else default

    def update(self, other: dict[str, int]) -> None:
        for name, value in other.items():
            setattr(self, name, value)

    def copy(self) -> dict[str, int]:
        return dict(self.items())


# Registers that live in the XSAVE area: name -> (byte offset, size)
XSTATE_EXTRA = {"fip": (8, 8), "fdp": (16, 8), "fop": (6, 2)}


def set_xstate_extra(tid: int, buf: ctypes.Array, values: dict[str, int]) -> None:
    """Patch x87/SSE registers held in the XSAVE area (NT_X86_XSTATE)."""
    from ..errors import TargetError
    from . import sys as pt

    size = pt.getregset(tid, pt.NT_X86_XSTATE, buf)
    for name, value in values.items():
        if name not in XSTATE_EXTRA:
            raise TargetError(f"unknown x86-64 extra register {name!r}")
        off, width = XSTATE_EXTRA[name]
        ctypes.memmove(ctypes.addressof(buf) + off, value.to_bytes(width, "little"), width)
    pt.setregset(tid, pt.NT_X86_XSTATE, buf, size)
