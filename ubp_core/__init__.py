"""UBP: user-space breakpoints for Python."""

__version__ = "0.1.0"
