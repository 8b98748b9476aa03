"""UBP architecture plugin for s390x (z/Architecture, 64-bit, big-endian, Linux)."""

from .arch import S390x

__all__ = ["S390x"]
