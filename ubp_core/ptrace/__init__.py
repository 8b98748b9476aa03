"""Linux ptrace through ctypes: the process layer of UBP's live x86-64 targets."""
