"""UBP architecture plugin for PowerPC: ppc64le, ppc64 (big-endian) and ppc32."""

from .arch import PPC32, PPC64, PPC64LE, PowerPC

__all__ = ["PPC32", "PPC64", "PPC64LE", "PowerPC"]
