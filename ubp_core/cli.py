"""The ``ubp`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import UbpError, UnknownArchError
from .plugins import default_plugins
from .types import Strategy

EXIT_USAGE = 2


def _cmd_archs(args: argparse.Namespace) -> int:
    plugins = default_plugins()
    rows = []
    for arch in plugins.archs:
        cpus = [c.name for c in plugins.reference_cpus(arch) if c.unavailable() is None]
        rows.append({
            "name": arch.name, "aliases": list(arch.aliases),
            "elf": {"machine": arch.elf.machine, "class": arch.elf.bits,
                    "byteorder": arch.elf.byteorder},
            "strategies": [s.value for s in Strategy if s in arch.strategies],
            "breakpoint": arch.breakpoint.hex(), "reference_cpus": cpus,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no architecture plugins installed")
        return 0
    print(f"{'arch':<10} {'ELF':<28} {'strategies':<30} reference CPUs")
    for r in rows:
        elf = f"{r['elf']['machine']} {r['elf']['class']}-bit {r['elf']['byteorder']}"
        print(f"{r['name']:<10} {elf:<28} {','.join(r['strategies']):<30} "
              f"{','.join(r['reference_cpus']) or '-'}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .analyze import analyze_file, format_table
    from .conformance.kit import progress_printer

    fa = analyze_file(args.elf, args.function or None,
                      progress=None if args.json else progress_printer())
    if args.json:
        print(json.dumps(fa.as_dict(), indent=2))
    else:
        print(format_table(fa))
    return 0


LIBC_GLOBS = ("/lib/*-linux-gnu*/libc.so.6", "/usr/lib/*-linux-gnu*/libc.so.6",
              "/usr/*-linux-gnu*/lib/libc.so.6", "/lib64/libc.so.6", "/usr/lib64/libc.so.6",
              "/lib/libc.so.6", "/usr/lib/libc.so.6")


def _libc_for(plugins, arch) -> str:
    """``--corpus libc``: the first libc.so.6 on the usual native and cross paths whose
    ELF header is this arch's (the header decides, not the directory's name)."""
    import glob

    from .elfinfo import elf_ident_of

    seen = []
    for pattern in LIBC_GLOBS:
        for path in sorted(glob.glob(pattern)):
            seen.append(path)
            try:
                if plugins.arch_for_elf(elf_ident_of(path), path).name == arch.name:
                    return path
            except UbpError:
                continue
    raise UbpError(f"no libc.so.6 for {arch.name} in {', '.join(LIBC_GLOBS)} "
                   f"({len(seen)} other libcs found); install the arch's libc (Debian: the "
                   "libc6-<arch>-cross package) or give its path to --corpus")


def _cmd_conformance(args: argparse.Namespace) -> int:
    from .conformance import corpus
    from .conformance.kit import default_jobs, progress_printer, run_cases

    plugins = default_plugins()
    arch = plugins.arch(args.arch)
    cases = []
    sizes = {}
    if not args.no_plugin_cases:
        cases += corpus.plugin_cases(arch)
        sizes["plugin"] = len(cases)
    for path in args.corpus or ():
        if path == "libc":
            path = _libc_for(plugins, arch)
        got, total = corpus.elf_cases(arch, path, args.sample, args.seed)
        cases += got
        sizes[path] = len(got)
        sizes[path + " (available)"] = total
    if args.random:
        rnd = corpus.random_cases(arch, args.random, args.seed)
        cases += rnd
        sizes["random"] = len(rnd)
    report = run_cases(arch, cases, cpus=args.cpu, jobs=args.jobs or default_jobs(),
                       salt=args.seed, plugins=plugins,
                       progress=None if args.json else progress_printer())
    report.corpus_sizes = sizes
    d = report.as_dict(details=args.details)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        print(format_report(d))
    ok = d["failed"] == 0 and not d["contract_problems"]
    return 0 if ok else 1


def format_report(d: dict) -> str:
    lines = [f"conformance {d['arch']}: {d['cases']} cases, {d['passed']} passed, "
             f"{d['failed']} failed, {d['unverified']} unverified ({d['seconds']} s)"]
    lines.append("reference CPUs: " + (", ".join(f"{k} {v}" for k, v in d["cpus"].items()) or "none"))
    for s, v in d["by_strategy"].items():
        lines.append(f"  {s:<8} {v['cases']:>7} runs, {v['failed']} failed, "
                     f"{v['fallback']} fell back")
    ref = d["refused"]
    lines.append(f"  refused  {ref['cases']:>7} ({ref['demonstrated']} shown necessary "
                 "by a naive out-of-line run)")
    for p in d["contract_problems"]:
        lines.append(f"CONTRACT: {p}")
    for f in d["failures"]:
        lines.append(f"FAILED {f['address']} {f['bytes']} {f['text']}: {f['detail']}")
    for u in d["unverified_examples"][:5]:
        lines.append(f"unverified {u['address']} {u['text']}: {u['detail']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ubp", description="user-space breakpoints")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("archs", help="installed architecture plugins")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=_cmd_archs)

    a = sub.add_parser("analyze", help="the strategy the default policy picks for every "
                                       "instruction of an ELF file")
    a.add_argument("elf")
    a.add_argument("--function", action="append", metavar="NAME",
                   help="only this function, listing each instruction (repeatable)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=_cmd_analyze)

    a = sub.add_parser("conformance", help="differential execution of a plugin's decisions "
                                           "on reference CPUs")
    a.add_argument("arch")
    a.add_argument("--corpus", action="append", metavar="ELF",
                   help="harvest instructions from this ELF file (repeatable); 'libc': "
                        "the arch's libc.so.6, native or cross")
    a.add_argument("--sample", type=int, help="at most N instructions per corpus file")
    a.add_argument("--random", type=int, default=0, metavar="N",
                   help="also N random valid encodings")
    a.add_argument("--no-plugin-cases", action="store_true",
                   help="skip the plugin's hand-picked cases")
    a.add_argument("--cpu", action="append", help="only these reference CPUs")
    a.add_argument("--jobs", type=int, default=0, help="parallel workers (default: CPUs)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--details", type=int, default=20, help="failures listed in the report")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=_cmd_conformance)

    from . import trace_cli

    trace_cli.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if argv and argv[0] == "trace" and "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    args = parser.parse_args(argv)
    args.command_argv = command
    import logging

    logging.basicConfig(level=logging.WARNING, format="ubp: %(message)s")
    try:
        return args.func(args)
    except UnknownArchError as exc:
        print(f"ubp: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UbpError as exc:
        print(f"ubp: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
