"""Process memory through /proc/PID/mem: it writes read-only text pages without
changing their protection, and one pread/pwrite moves any amount."""

from __future__ import annotations

import errno
import os

from ..errors import MemoryFault, TargetError


class ProcMem:
    def __init__(self, pid: int) -> None:
        try:
            self.fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise TargetError(f"cannot open /proc/{pid}/mem: {exc.strerror}") from exc

    def read(self, address: int, size: int) -> bytes:
        if not 0 <= address < 1 << 63:
            raise MemoryFault(address, size)
        try:
            data = os.pread(self.fd, size, address)
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EFAULT, errno.EINVAL, errno.ESRCH):
                raise MemoryFault(address, size) from None
            raise
        if len(data) != size:
            raise MemoryFault(address, size)
        return data

    def write(self, address: int, data: bytes) -> None:
        if not 0 <= address < 1 << 63:
            raise MemoryFault(address, len(data), write=True)
        try:
            n = os.pwrite(self.fd, data, address)
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EFAULT, errno.EINVAL, errno.ESRCH):
                raise MemoryFault(address, len(data), write=True) from None
            raise
        if n != len(data):
            raise MemoryFault(address, len(data), write=True)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
