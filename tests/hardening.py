"""Shared pieces of the hardening campaign (tests/test_hardening_*.py).

The programs in tests/progs/hardening/ are built here with the machine's gcc; every one
counts or records what it does itself, so a test compares the program's own account
with UBP's and with an unprobed run of the same program.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable

import pytest

from ubp_core.elfinfo import ElfImage
from ubp_core.plugins import default_plugins
from ubp_core.procmaps import read_maps
from ubp_core.types import Strategy

SRC = os.path.join(os.path.dirname(__file__), "progs", "hardening")
PROGRAMS = {"hammer": ["-lpthread"], "many": ["-lpthread"], "sigstorm": ["-lpthread", "-lrt"],
            "faulty": [], "jobs": ["-lpthread"]}


def build(out_dir: str, names: Iterable[str] | None = None) -> dict[str, str]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    paths = {}
    for name in names or PROGRAMS:
        path = os.path.join(out_dir, name)
        subprocess.run([cc, "-O1", "-g", "-o", path, os.path.join(SRC, f"{name}.c"),
                        *PROGRAMS[name]], check=True)
        paths[name] = path
    return paths


def ubp(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ubp_core.cli", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)


def bare(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def trace_json(*args: str, **kw) -> tuple[subprocess.CompletedProcess, dict]:
    out = ubp("trace", "--json", *args, **kw)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("{")]
    assert lines, out.stderr
    return out, json.loads(lines[-1])


def instructions(path: str, function: str) -> list[tuple[int, str, frozenset[Strategy]]]:
    """(offset, text, strategies the plugin allows) of every instruction of a function."""
    arch = default_plugins().arch("x86_64")
    with ElfImage(path) as img:
        sym = next(s for s in img.functions() if s.name == function)
        code = img.read(sym.address, sym.size)
    out = []
    for insn in arch.decode_all(code, sym.address):
        an = arch.analyze(insn)
        out.append((insn.address - sym.address, insn.text, frozenset(an.strategies)))
    return out


def sites_for(path: str, functions: Iterable[str], strategy: Strategy) -> list[str]:
    """Probe specs (``func+off``) of every instruction that allows ``strategy``."""
    specs = []
    for fn in functions:
        for off, _text, strategies in instructions(path, fn):
            if strategy in strategies:
                specs.append(f"{fn}+{off:#x}" if off else fn)
    return specs


def writable_executable(pid: int) -> list[str]:
    """Mappings of a process that are both writable and executable."""
    return [f"{m.start:#x}-{m.end:#x} {m.perms} {m.path}" for m in read_maps(pid)
            if "w" in m.perms and "x" in m.perms]


def thread_states(pid: int) -> dict[int, str]:
    """tid -> the state letter of /proc/PID/task/TID/stat (R, S, T, t, Z ...)."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                out[int(t)] = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            pass
    return out


def wait_for(cond, timeout: float = 10.0, every: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return bool(cond())


def tracer_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("TracerPid")).split()[1])


# ---------------------------------------------------------------- fuzzing the plugins
def fuzz_one(arch, data: bytes, address: int) -> str | None:
    """Decode and analyse ``data`` at ``address``, then run every hook the analysis
    allows with plain inputs.  Returns None, or what broke the ArchOps contract: decode
    may raise only DecodeError (errors.py); analyze must not raise; an analysis must keep
    check_analysis's promises; the other hooks may raise only MemoryFault from the
    ``read`` they are given (memory outside ``data``)."""
    from ubp_core.conformance.kit import check_analysis
    from ubp_core.errors import DecodeError, MemoryFault

    try:
        insn = arch.decode(data, address)
    except DecodeError:
        return None
    except Exception as exc:  # what we are looking for
        return f"decode raised {exc!r}"
    if not (0 < insn.length <= min(len(data), arch.max_insn_len)) or \
            insn.raw != data[:insn.length] or insn.address != address:
        return f"decode returned a bad Insn ({insn.length} bytes of {len(data)})"

    def read(a: int, n: int) -> bytes:
        off = a - address
        if off < 0 or off + n > len(data):
            raise MemoryFault(a, n)
        return data[off:off + n]

    stage = "analyze"
    try:
        analysis = arch.analyze(insn)
        problem = check_analysis(arch, analysis)
        if problem:
            return f"analyze: {problem}"
        stage = "analyze_in_context"
        problem = check_analysis(arch, arch.analyze_in_context(analysis, read))
        if problem:
            return f"analyze_in_context: {problem}"
        if not analysis.accepted:
            return None
        regs = dict.fromkeys(arch.registers, 0)
        regs[arch.abi.pc] = address
        slot = (address + (1 << 20)) & ((1 << arch.word_bits) - 1)
        slot -= slot % max(arch.insn_alignment, 1)
        strategies = set(analysis.strategies)
        if Strategy.BOOST in strategies:
            stage = "boost"
            arch.boost(analysis, slot)
        if Strategy.EMULATE in strategies:
            stage = "emulate"
            try:
                arch.emulate(analysis, dict(regs), read)
            except MemoryFault:
                pass
        if Strategy.SSOL in strategies and analysis.ssol_slot_ok(slot):
            stage = "prepare_xol"
            step = arch.prepare_xol(analysis, slot, dict(regs))
            after = dict(regs)
            after[arch.abi.pc] = slot + insn.length
            for stage, hook in (("post_xol", arch.post_xol), ("abort_xol", arch.abort_xol)):  # noqa: B007
                try:
                    hook(step, dict(after), read)
                except MemoryFault:
                    pass
    except Exception as exc:
        return f"{stage} raised {exc!r}"
    return None


def fuzz_inputs(arch, rng, n: int):
    """``n`` inputs for ``arch``: half the plugin's own likely-valid encodings (with a
    random tail), half uniformly random bytes of every length up to max_insn_len + 4."""
    top = (1 << arch.word_bits) - 1
    align = max(arch.insn_alignment, 1)
    for i in range(n):
        if i % 2:
            data = arch.random_encoding(rng) + rng.randbytes(rng.randrange(4))
        else:
            data = rng.randbytes(rng.randrange(arch.max_insn_len + 5))
        address = rng.randrange(0, min(top, (1 << 47) - 1))
        yield data, address - address % align


def fuzz(arch_names: list[str] | None, n: int, seed: int) -> list[dict]:
    """The fuzz run: ``n`` inputs per arch; figures per arch."""
    import random

    out = []
    for arch in default_plugins().archs:
        if arch_names and arch.name not in arch_names:
            continue
        rng = random.Random(f"{seed}:{arch.name}")
        errors: list[str] = []
        decoded = 0
        start = time.monotonic()
        from ubp_core.errors import DecodeError

        for data, address in fuzz_inputs(arch, rng, n):
            problem = fuzz_one(arch, data, address)
            if problem:
                errors.append(f"{data.hex()} @ {address:#x}: {problem}")
        took = time.monotonic() - start
        # how many inputs decoded (a second, cheap pass over a sample)
        rng = random.Random(f"{seed}:{arch.name}")
        sample = min(n, 20000)
        for data, address in fuzz_inputs(arch, rng, sample):
            try:
                arch.decode(data, address)
                decoded += 1
            except DecodeError:
                pass
        out.append({"arch": arch.name, "inputs": n, "seconds": round(took, 1),
                    "inputs_per_s": round(n / took) if took else None,
                    "decoded_percent": round(100 * decoded / sample, 1),
                    "errors": len(errors), "first_errors": errors[:5]})
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python tests/hardening.py",
                                 description="The hardening campaign's long parts.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fuzz", help="arbitrary bytes through every plugin's analysis")
    f.add_argument("--inputs", type=int, default=1_000_000, help="per arch (1,000,000)")
    f.add_argument("--arch", action="append", help="only this arch (repeatable)")
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("--jobs", type=int, default=1, help="archs fuzzed in parallel")
    args = ap.parse_args(argv)
    names = args.arch or [a.name for a in default_plugins().archs]
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs) as pool:
            parts = pool.map(fuzz, [[a] for a in names], [args.inputs] * len(names),
                             [args.seed] * len(names))
            results = [r for part in parts for r in part]
    else:
        results = fuzz(names, args.inputs, args.seed)
    print(json.dumps(results, indent=1))
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
