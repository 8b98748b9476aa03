"""One traced run for bench/hits.py (a separate process, so pinning applies to it).

    driver.py ubp '{"strategy": ..., "handler": ..., "site": ...}' -- PROGRAM ARGS
    driver.py minimal '{"stops": 1|2, "site": ...}' -- PROGRAM ARGS

``minimal`` is the floor a ctypes tracer can reach: no engine, no analysis, the least
work per stop -- a breakpoint, a slot prepared once, and per hit only waitpid,
GETREGS, SETREGS and CONT (plus a SINGLESTEP round for two stops).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

from ubp_core.elfinfo import ElfImage
from ubp_core.plugins import get_arch
from ubp_core.procmaps import read_maps
from ubp_core.ptrace import sys as pt
from ubp_core.ptrace.process import spawn_traced
from ubp_core.ptrace.regs import UserRegs
from ubp_core.ptrace.target import Hub, PtraceTarget
from ubp_core.session import Session


def run_ubp(opts: dict, argv: list[str]) -> int:
    s = Session.spawn(argv, placement=opts.get("placement", "off"))
    counter = [0]

    def count(hit):
        counter[0] += 1

    handler = {"noop": lambda hit: None, "count": count, "none": None}[opts["handler"]]
    if opts.get("fast"):
        # with a handler: the futex rendezvous (ubp_core.rendezvous); without: counting
        tp = s.probe(f"site_{opts['site']}", handler, fast=True)
        if tp.strategy_name != "trap-free":
            raise SystemExit(f"no trap-free probe: {tp.fast_note}")
    else:
        s.probe(f"site_{opts['site']}", handler, strategy=opts["strategy"])
    status = s.run()
    return os.WEXITSTATUS(status) if status is not None else 1


def run_minimal(opts: dict, argv: list[str]) -> int:
    arch = get_arch("x86_64")
    pid = spawn_traced(argv, settle=True)
    target = PtraceTarget(pid, arch, Hub(), spawned=True)
    target.add_thread(pid, stopped=True)
    exe = os.path.realpath(argv[0])
    with ElfImage(exe) as img:
        sym = next(s for s in img.symbols if s.name == f"site_{opts['site']}")
        off = img.vaddr_to_offset(sym.address)
        code = img.read(sym.address, 16)
    base = next(m for m in read_maps(pid) if m.path == exe and m.offset <= off < m.offset
                + m.end - m.start)
    site = base.start + off - base.offset
    insn = arch.decode(code, site)
    slot = target.map_xol(site, 4096, 1 << 31)
    two = opts["stops"] == 2
    # the copy, then (one stop) a jump back: the boost of the minimal tracer
    back = (site + insn.length) - (slot + insn.length + 5)
    target.write_memory(slot, insn.raw + (b"" if two else
                                          b"\xe9" + (back & 0xFFFFFFFF).to_bytes(4, "little")))
    target.write_memory(site, b"\xcc")
    regs = UserRegs()
    ra = ctypes.addressof(regs)
    ptrace = pt._ptrace
    getregs, setregs, cont, step = (pt.PTRACE_GETREGS, pt.PTRACE_SETREGS, pt.PTRACE_CONT,
                                    pt.PTRACE_SINGLESTEP)
    after = site + insn.length
    ptrace(cont, pid, 0, 0)
    while True:
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1
        sig = os.WSTOPSIG(status)
        if sig != signal.SIGTRAP:
            ptrace(cont, pid, 0, 0 if sig == signal.SIGTRAP | 0x80 else sig)
            continue
        ptrace(getregs, pid, 0, ra)
        regs.rip = slot
        ptrace(setregs, pid, 0, ra)
        if two:
            ptrace(step, pid, 0, 0)
            os.waitpid(pid, 0)
            ptrace(getregs, pid, 0, ra)
            regs.rip = after
            ptrace(setregs, pid, 0, ra)
        ptrace(cont, pid, 0, 0)


def main() -> int:
    kind, opts = sys.argv[1], json.loads(sys.argv[2])
    argv = sys.argv[sys.argv.index("--") + 1:]
    return run_ubp(opts, argv) if kind == "ubp" else run_minimal(opts, argv)


if __name__ == "__main__":
    sys.exit(main())
