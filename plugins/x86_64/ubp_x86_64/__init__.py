"""UBP architecture plugin for x86-64 (Linux, little-endian, 64-bit)."""

from .arch import X86_64

__all__ = ["X86_64"]
