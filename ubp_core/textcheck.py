"""Compare a live process's code with the files it was loaded from.

Used to prove that no breakpoint byte is left behind: every executable file mapping of
the process must hold exactly the bytes of its file.
"""

from __future__ import annotations

from .procmaps import mapped_file, read_maps


def text_differences(pid: int) -> list[tuple[str, int]]:
    """(path, address) of the first differing byte of each executable file mapping."""
    out = []
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for m in read_maps(pid):
            if not (m.executable and m.is_file):
                continue
            file = mapped_file(pid, m)  # the file as the program sees it
            if file is None:
                continue
            try:
                with open(file, "rb") as f:
                    f.seek(m.offset)
                    want = f.read(m.end - m.start)
            except OSError:
                continue
            mem.seek(m.start)
            have = mem.read(len(want))
            if have != want:
                # a short read (the process is exiting) differs where it stops
                i = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b), len(have))
                out.append((m.path, m.start + i))
    return out
