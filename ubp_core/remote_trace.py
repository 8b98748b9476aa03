"""``ubp trace --remote HOST:PORT`` and ``ubp trace --qemu ... -- PROGRAM``: the command
line over :class:`~ubp_core.remote_session.RemoteSession`, with the same output as the
ptrace path (one line per hit, ``--count``'s table, ``--json``)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import TextIO

from .errors import UbpError
from .remote_session import RemoteSession
from .session import TraceProbe
from .spec import parse_spec
from .trace_cli import _printer, _table


def run_remote(args: argparse.Namespace, command: list[str]) -> int:
    if args.remote and args.qemu:
        print("ubp trace: give either --remote HOST:PORT or --qemu -- CMD, not both",
              file=sys.stderr)
        return 2
    if args.qemu and not command:
        print("ubp trace --qemu: give the program: -- CMD [ARGS...]", file=sys.stderr)
        return 2
    if args.remote and (command or args.pid):
        print("ubp trace --remote: the stub already runs the program; give a local copy "
              "of it with --file, not -- CMD or -p", file=sys.stderr)
        return 2
    if not args.probes:
        print("ubp trace: no probes given", file=sys.stderr)
        return 2
    out: TextIO = open(args.output, "w") if args.output else sys.stderr
    requested: list[int] = []
    holder: list[RemoteSession] = []

    def terminate(signum, frame) -> None:
        # the loop notices at the next stop; qemu-user is told to stop the program
        # (the stub reads its socket only at a stop)
        requested.append(signum)
        if holder:
            holder[0].stop()
            holder[0].target.interrupt()

    old = {sig: signal.signal(sig, terminate)
           for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return _trace(args, command, out, holder, requested)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if out is not sys.stderr:
            out.close()


def _trace(args, command, out: TextIO, holder: list, requested: list) -> int:
    kw = {"inline_freeze": not args.no_freeze, "sysroot": args.sysroot}
    try:
        if args.qemu:
            session = RemoteSession.qemu_spawn(command, **kw)
        else:
            session = RemoteSession.connect(args.remote, args.file, **kw)
    except UbpError as exc:
        print(f"ubp: {exc}", file=sys.stderr)
        return 2
    holder.append(session)
    start = time.monotonic()
    quiet = args.count or args.json
    probes: list[TraceProbe] = []
    try:
        for text in args.probes:
            spec = parse_spec(text)
            handler = None if quiet else _printer(out, start, spec)
            probes.append(session.probe(spec, handler, strategy=args.strategy))
    except UbpError as exc:
        print(f"ubp: {exc}", file=sys.stderr)
        _abandon(session, args)
        return 2
    if requested:
        session.stop()
    try:
        code = session.run(timeout=args.duration)
    except UbpError as exc:
        print(f"ubp: {exc}", file=sys.stderr)
        return 2
    if code is not None:
        session.close()
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
        elif tp.error:
            print(f"ubp: probe {tp.spec.text}: {tp.error}", file=out)
        elif tp.address is None:
            print(f"ubp: probe {tp.spec.text} was never armed (its module never loaded)",
                  file=out)
    if args.json:
        print(json.dumps({"probes": [tp.as_dict() for tp in flat], "exit_code": code,
                          "detached": code is None}), file=out)
    if requested:
        return 130
    return code if code is not None else 0


def _abandon(session: RemoteSession, args) -> None:
    """A probe could not be armed: a program UBP started goes; a remote one is let go
    untouched (nothing was written: probes are checked before their breakpoint goes in,
    and the ones armed already are taken out)."""
    if args.qemu:
        session.kill()
    else:
        session.detach()
