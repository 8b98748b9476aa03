"""``ubp trace``: probes on a live program from the command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import TextIO

from .engine import Hit
from .errors import UbpError
from .fetch import fields
from .session import Session, TraceProbe
from .spec import parse_spec


def add_parser(sub) -> None:
    a = sub.add_parser(
        "trace", help="probe a live program",
        usage="ubp trace [options] PROBE... (-p PID | -- CMD [ARGS...])",
        description="Put probes into a running or new program and report every hit. "
                    "PROBE: SYMBOL, SYMBOL+OFFSET, MODULE:SYMBOL[+OFFSET], MODULE:0xADDR, "
                    "0xADDRESS (MODULE: a path or a short name such as libc).")
    a.add_argument("probes", nargs="*", metavar="PROBE")
    a.add_argument("-p", "--pid", type=int, help="attach to a running process")
    a.add_argument("--count", action="store_true", help="count hits; print a table at exit")
    a.add_argument("--fast", action="store_true",
                   help="trap-free probes where the site allows it: a jump to a trampoline "
                        "instead of a breakpoint, no ptrace stop per hit (with --count the "
                        "program bumps a counter shared with UBP; otherwise each hit meets "
                        "UBP through a futex and is printed); elsewhere a trap probe, and "
                        "UBP says why")
    a.add_argument("--strategy", choices=["emulate", "boost", "ssol", "inline"],
                   help="force one strategy for every probe (refused where it is wrong)")
    a.add_argument("-o", "--output", metavar="FILE", help="UBP's output here, not stderr")
    a.add_argument("--json", action="store_true", help="end with one JSON object")
    a.add_argument("--no-follow", action="store_true",
                   help="do not trace forked children (their breakpoints are removed)")
    a.add_argument("--exitkill", action="store_true",
                   help="kill the traced program if UBP itself is killed (PTRACE_O_EXITKILL)")
    a.add_argument("--no-freeze", action="store_true",
                   help="inline strategy: do not stop other threads while the breakpoint "
                        "is out (they then run past it unseen; shown for comparison)")
    a.add_argument("--placement", choices=["auto", "pin", "off"], default="auto",
                   help="CPU placement: auto pins UBP and a single-threaded program to one "
                        "CPU (a hit costs several times more across CPUs) and undoes it "
                        "when the program starts a thread; pin: always; off: never")
    a.add_argument("--duration", type=float, metavar="SECONDS",
                   help="detach after this long (with -p) / stop tracing")
    a.add_argument("--remote", metavar="HOST:PORT",
                   help="probe the program behind this GDB stub (qemu-user -g, gdbserver)")
    a.add_argument("--qemu", action="store_true",
                   help="run -- CMD under the qemu-user its ELF header calls for, with a "
                        "GDB stub on a free loopback port (see docs/remote.md)")
    a.add_argument("--file", metavar="ELF",
                   help="--remote: a local copy of the program the stub runs (symbols)")
    a.add_argument("--sysroot", metavar="DIR",
                   help="--remote/--qemu: where the program's libraries are (qemu -L)")
    a.set_defaults(func=run_trace)


def _split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def run_trace(args: argparse.Namespace) -> int:
    command = getattr(args, "command_argv", [])
    if args.remote or args.qemu:
        from .remote_trace import run_remote

        return run_remote(args, command)
    if bool(args.pid) == bool(command):
        print("ubp trace: give either -p PID or -- CMD [ARGS...]", file=sys.stderr)
        return 2
    if not args.probes:
        print("ubp trace: no probes given", file=sys.stderr)
        return 2
    out: TextIO = open(args.output, "w") if args.output else sys.stderr
    try:
        return _trace(args, command, out)
    finally:
        if out is not sys.stderr:
            out.close()


def _trace(args: argparse.Namespace, command: list[str], out: TextIO) -> int:
    kw = {"follow_forks": not args.no_follow, "exitkill": args.exitkill,
          "inline_freeze": not args.no_freeze, "placement": args.placement}
    holder: list[Session] = []
    requested = []

    def terminate(signum, frame):
        # Installed before the first ptrace call: a tracer that dies of a default signal
        # action leaves its breakpoints behind.  Raising here could drop a wait status
        # that waitpid has just returned; instead the loop is asked to stop, and woken
        # by interrupting the traced threads (waitpid then returns their stops).
        requested.append(signum)
        if holder:
            holder[0].stop()
            holder[0].hub.wake()

    old = {sig: signal.signal(sig, terminate)
           for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return _trace_session(args, command, out, kw, holder, requested)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _trace_session(args, command, out, kw, holder, requested) -> int:
    if args.fast and args.strategy is not None:
        print("ubp: --fast puts in jumps, not breakpoints: it takes no --strategy",
              file=sys.stderr)
        return 2
    try:
        session = Session.attach(args.pid, **kw) if args.pid else Session.spawn(command, **kw)
    except UbpError as exc:
        print(f"ubp: {exc}", file=sys.stderr)
        return 2
    holder.append(session)
    if requested:
        session.stop()
    start = time.monotonic()
    quiet = args.count or args.json
    probes: list[TraceProbe] = []
    try:
        for text in args.probes:
            spec = parse_spec(text)
            handler = None if quiet else _printer(out, start, spec)
            if args.fast:
                probes.append(session.probe(spec, handler, fast=True))
            else:
                probes.append(session.probe(spec, handler, strategy=args.strategy))
    except UbpError as exc:
        print(f"ubp: {exc}", file=sys.stderr)
        _abandon(session)
        return 2

    status = None
    interrupted = False
    try:
        status = session.run(timeout=args.duration)
    except UbpError as exc:
        print(f"ubp: {exc}", file=sys.stderr)
        _abandon(session)
        return 2
    interrupted = interrupted or bool(requested)
    code = _exit_code(status)
    flat = [t for tp in probes for t in tp.flat()]
    if args.count and not args.json:
        _table(out, flat)
    for tp in probes:
        if tp.spec.is_glob:
            if not tp.children:
                print(f"ubp: pattern {tp.spec.text} matched no function", file=out)
            if tp.skipped:
                print(f"ubp: pattern {tp.spec.text}: {tp.skipped} matching function(s) "
                      "cannot be probed", file=out)
            slow = sum(1 for c in tp.children.values() if c.fast_note)
            if slow:
                print(f"ubp: pattern {tp.spec.text}: {slow} of {len(tp.children)} functions "
                      f"{'traced' if tp.handler else 'counted'} with trap probes (no "
                      "trap-free probe there; --json says why)", file=out)
            continue
        if tp.fast_note:
            print(f"ubp: probe {tp.label}: no trap-free probe ({tp.fast_note}); "
                  f"{'traced' if tp.handler else 'counted'} with a trap probe", file=out)
        if tp.missed:
            print(f"ubp: probe {tp.label}: {tp.missed} hit(s) ran without the handler (the "
                  "thread hit it again inside a signal handler during its rendezvous)",
                  file=out)
        if tp.error:
            print(f"ubp: probe {tp.spec.text}: {tp.error}", file=out)
        elif not tp.attached and tp.address is None:
            print(f"ubp: probe {tp.spec.text} was never armed (its module never loaded)",
                  file=out)
    if args.json:
        print(json.dumps({"probes": [tp.as_dict() for tp in flat], "exit_code": code,
                          "detached": status is None}), file=out)
    if interrupted:
        return 130
    return code if code is not None else 0


def _abandon(session: Session) -> None:
    """A probe could not be armed: leave the target as it was."""
    if session.spawned:
        # the program never ran: kill it rather than restore bytes in a dying process
        session.kill()
        for pid in list(session.processes):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    else:
        session.detach()


def _exit_code(status: int | None) -> int | None:
    if status is None:
        return None
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return None


def _printer(out: TextIO, start: float, spec):
    def on_hit(hit: Hit) -> None:
        if spec.fields:
            shown = " ".join(f"{k}={v!r}" if isinstance(v, str) and not v.startswith("0x")
                             else f"{k}={v}" for k, v in fields(spec, hit).items())
        elif hit.frame is not None:
            shown = f"ret={hit.retval:#x}"
        else:
            shown = " ".join(f"{a:#x}" for a in hit.args[:3])
        if hit.frame is not None:
            shown += f" duration={hit.duration * 1e6:.1f}us"
        out.write(f"{time.monotonic() - start:12.6f} {hit.tid:>7} {hit.probe.label} {shown}\n")

    return on_hit


def _table(out: TextIO, probes: list[TraceProbe]) -> None:
    rows = [(tp.label, f"{tp.address:#x}" if tp.address is not None else "-",
             tp.strategy_name or "-", tp.hits) for tp in probes]
    w = max([len(r[0]) for r in rows] + [5])
    print(f"{'probe':<{w}}  {'address':>14}  {'strategy':<9}  {'hits':>10}", file=out)
    for spec, addr, strat, hits in rows:
        print(f"{spec:<{w}}  {addr:>14}  {strat:<9}  {hits:>10}", file=out)
