"""``ubp analyze``: what the default policy does with every instruction of an ELF file."""

from __future__ import annotations

import difflib
import time
from collections import Counter
from dataclasses import dataclass, field

from . import policy
from .elfinfo import ElfImage
from .errors import MemoryFault, ProbeError
from .plugins import PluginSet, default_plugins
from .types import Strategy

STRATEGY_KEYS = ("emulate", "boost", "ssol", "inline", "refused")
UNDECODABLE = "bytes that do not decode as an instruction (data in code?)"
# Where a live XOL area lands relative to the code it serves (see the ptrace target):
# the boost decision is made for a slot this far away.
TYPICAL_SLOT_DISTANCE = 1 << 20


@dataclass
class FileAnalysis:
    path: str
    arch: str
    functions: int = 0
    instructions: int = 0
    strategies: Counter = field(default_factory=Counter)
    refusals: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    listing: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        total = max(self.instructions, 1)
        no_trap = self.strategies["emulate"] + self.strategies["boost"]
        return {
            "arch": self.arch,
            "file": self.path,
            "functions": self.functions,
            "instructions": self.instructions,
            "strategies": {k: self.strategies[k] for k in STRATEGY_KEYS},
            "refusals": dict(self.refusals.most_common()),
            "kinds": dict(self.kinds.most_common()),
            "no_extra_trap_percent": round(100.0 * no_trap / total, 2),
            "refused_percent": round(100.0 * self.strategies["refused"] / total, 3),
            "seconds": round(self.seconds, 2),
            **({"listing": self.listing} if self.listing else {}),
        }


def analyze_file(path: str, functions: list[str] | None = None,
                 plugins: PluginSet | None = None, progress=None) -> FileAnalysis:
    plugins = plugins or default_plugins()
    start = time.monotonic()
    with ElfImage(path) as img:
        arch = plugins.arch_for_elf(img.ident, path)
        funcs = img.functions()
        if functions:
            by_name = {}
            for f in img.symbols:
                by_name.setdefault(f.name, f)
            chosen = []
            for name in functions:
                if name not in by_name:
                    close = difflib.get_close_matches(name, list(by_name), n=3)
                    hint = f"; did you mean {', '.join(close)}?" if close else ""
                    raise ProbeError(f"no function {name!r} in {path}{hint}")
                chosen.append(by_name[name])
            funcs = chosen
        out = FileAnalysis(path, arch.name, functions=len(funcs))
        want_listing = bool(functions)
        for i, func in enumerate(funcs):
            if progress and i % 64 == 0:
                progress(i, len(funcs))
            try:
                code = img.read(func.address, func.size)
            except Exception:
                continue
            end = func.address + len(code)
            addr = func.address
            def read(address: int, size: int, _base=func.address, _code=code) -> bytes:
                off = address - _base
                if off < 0 or off + size > len(_code):
                    raise MemoryFault(address, size)
                return _code[off:off + size]

            for insn in arch.decode_all(code, func.address):
                addr = insn.address + insn.length
                _account(arch, insn, out, want_listing, func.name, read)
            if addr < end:
                out.instructions += 1
                out.strategies["refused"] += 1
                out.refusals[UNDECODABLE] += 1
                if want_listing:
                    out.listing.append({"function": func.name, "address": hex(addr),
                                        "text": "(undecodable)", "strategy": "refused",
                                        "refusal": UNDECODABLE})
        if progress:
            progress(len(funcs), len(funcs))
    out.seconds = time.monotonic() - start
    return out


def _account(arch, insn, out: FileAnalysis, want_listing: bool, fname: str, read) -> None:
    analysis = arch.analyze_in_context(arch.analyze(insn), read)
    out.instructions += 1
    out.kinds[analysis.kind] += 1
    if analysis.refusal is not None:
        key = "refused"
        out.refusals[analysis.refusal] += 1
    else:
        boost_ok = True
        if Strategy.BOOST in analysis.strategies and Strategy.EMULATE not in analysis.strategies:
            slot = insn.address + TYPICAL_SLOT_DISTANCE
            boost_ok = arch.boost(analysis, slot) is not None
        # the policy of a live (ptrace) target, where emulating a memory access costs
        # a system call that boosting saves
        chosen = policy.default_strategy(analysis, boost_ok, prefer_boost=True)
        key = chosen.value if chosen else "refused"
    out.strategies[key] += 1
    if want_listing:
        out.listing.append({"function": fname, "address": hex(insn.address),
                            "bytes": insn.raw.hex(), "text": insn.text, "kind": analysis.kind,
                            "strategy": key, "refusal": analysis.refusal})


def format_table(fa: FileAnalysis) -> str:
    d = fa.as_dict()
    total = max(fa.instructions, 1)
    lines = [f"{fa.path}: {fa.arch}, {fa.functions} functions, {fa.instructions} instructions "
             f"({fa.seconds:.2f} s)", "", f"{'strategy':<10}{'count':>10}{'share':>9}"]
    for k in STRATEGY_KEYS:
        n = fa.strategies[k]
        lines.append(f"{k:<10}{n:>10}{100.0 * n / total:>8.2f}%")
    lines.append("")
    lines.append(f"no trap beyond the breakpoint (emulate + boost): {d['no_extra_trap_percent']:.2f}%")
    if fa.refusals:
        lines.append("")
        lines.append("refused, by reason:")
        for reason, n in fa.refusals.most_common():
            lines.append(f"{n:>8}  {reason}")
    if fa.listing:
        lines.append("")
        for row in fa.listing:
            what = row["strategy"] if row["strategy"] != "refused" else f"refused: {row['refusal']}"
            lines.append(f"  {row['function']:<20} {row['address']:>12}  {row['text']:<40} {what}")
    return "\n".join(lines)
