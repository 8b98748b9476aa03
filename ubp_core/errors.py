"""The errors UBP raises. Every one carries a message a user can act on."""

from __future__ import annotations


class UbpError(Exception):
    """Base of every error UBP raises on purpose."""


class DecodeError(UbpError):
    """The bytes are not one valid instruction of the architecture.

    This is the only exception an ArchOps ``decode``/``analyze`` hook may raise.
    """


class RefusedError(UbpError):
    """An instruction cannot be probed (or not with the strategy asked for)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


class UnknownArchError(UbpError):
    """No installed plugin handles the architecture asked for."""


class TargetError(UbpError):
    """A target (process, emulator, stub) refused an operation."""


class MemoryFault(TargetError):
    """Target memory at an address cannot be read or written."""

    def __init__(self, address: int, size: int, write: bool = False) -> None:
        what = "write" if write else "read"
        super().__init__(f"cannot {what} {size} byte(s) of target memory at {address:#x}")
        self.address = address
        self.size = size
        self.write = write


class ProbeError(UbpError):
    """A probe spec or probe operation is invalid."""
