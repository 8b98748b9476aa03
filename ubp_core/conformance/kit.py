"""The conformance kit's driver: cases in, one report out (CLI and pytest share it)."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..archops import ArchOps
from ..errors import DecodeError, TargetError
from ..plugins import PluginSet, default_plugins
from ..refcpu import ReferenceCpu
from ..types import Strategy
from .runner import Bench, CannotRun, Case, CaseResult, analyze_case


def check_contract(arch: ArchOps) -> list[str]:
    """Static promises every plugin must keep; returns the problems found."""
    problems = []

    def need(cond: bool, what: str) -> None:
        if not cond:
            problems.append(what)

    for attr in ("name", "elf", "breakpoint", "max_insn_len", "xol_slot_size", "registers",
                 "abi"):
        need(hasattr(arch, attr), f"missing attribute {attr}")
    if problems:
        return problems
    need(isinstance(arch.breakpoint, bytes) and len(arch.breakpoint) > 0,
         "breakpoint must be non-empty bytes")
    need(arch.max_insn_len >= len(arch.breakpoint), "max_insn_len shorter than the breakpoint")
    need(arch.xol_slot_size >= arch.max_insn_len, "xol_slot_size cannot hold the longest instruction")
    need(arch.word_bits in (32, 64), "word_bits must be 32 or 64")
    need(arch.byteorder in ("little", "big"), "byteorder must be little or big")
    need(set(arch.strategies) <= set(Strategy), "unknown strategy declared")
    regs = set(arch.registers)
    for r in (arch.abi.pc, arch.abi.sp, arch.abi.retval, *arch.abi.args):
        need(r in regs, f"ABI register {r} is not in registers")
    for sc in ("mmap", "munmap", "mprotect", "getpid"):
        need(sc in arch.abi.syscall_numbers, f"abi.syscall_numbers lacks {sc}")
    try:
        bp = arch.decode(arch.breakpoint, 0x1000)
        need(bp.length == len(arch.breakpoint), "the breakpoint decodes to a different length")
        need(arch.analyze(bp).refusal is not None, "the breakpoint instruction must be refused")
    except DecodeError:
        problems.append("the breakpoint bytes do not decode as an instruction")
    return problems


def check_analysis(arch: ArchOps, analysis) -> str | None:
    """Per-instruction promises of an Analysis."""
    s = set(analysis.strategies)
    if analysis.refusal is not None:
        if s:
            return "a refused instruction lists strategies"
        if not isinstance(analysis.refusal, str) or not analysis.refusal.strip():
            return "a refusal without a reason"
        return None
    if not s:
        return "accepted with no strategy"
    if not s <= set(arch.strategies):
        return f"claims {sorted(x.value for x in s - set(arch.strategies))} beyond the plugin's declaration"
    if Strategy.EMULATE in s and not s & {Strategy.SSOL, Strategy.INLINE}:
        return "emulation needs a stepping fallback (SSOL or inline) for executions it declines"
    return None


@dataclass
class Report:
    arch: str
    results: list[CaseResult] = field(default_factory=list)
    cpus_used: Counter = field(default_factory=Counter)
    contract: list[str] = field(default_factory=list)
    seconds: float = 0.0
    corpus_sizes: dict[str, int] = field(default_factory=dict)

    def as_dict(self, details: int = 20) -> dict:
        status = Counter(r.status for r in self.results)
        by: dict[str, dict[str, int]] = {}
        for s in Strategy:
            runs = [r.strategies.get(s.value) for r in self.results]
            by[s.value] = {
                "cases": sum(1 for v in runs if v in ("passed", "failed")),
                "failed": sum(1 for v in runs if v == "failed"),
                "fallback": sum(1 for v in runs if v == "fallback"),
            }
        refused = [r for r in self.results if r.status == "refused"]
        demonstrated = sum(1 for r in refused if r.detail.startswith("needed:"))
        reasons = Counter(r.refusal for r in refused)
        return {
            "arch": self.arch,
            "cases": len(self.results),
            "passed": status["passed"] + status["refused"],
            "failed": status["failed"],
            "unverified": status["unverified"],
            "by_strategy": by,
            "refused": {"cases": len(refused), "demonstrated": demonstrated,
                        "reasons": dict(reasons.most_common())},
            "cpus": dict(self.cpus_used),
            "contract_problems": self.contract,
            "corpus": self.corpus_sizes,
            "seconds": round(self.seconds, 2),
            "failures": [r.as_dict() for r in self.results if r.status == "failed"][:details],
            "unverified_examples": [r.as_dict() for r in self.results
                                    if r.status == "unverified"][:details],
        }


class CaseRunner:
    """Runs cases on the best reference CPU that can execute each one."""

    def __init__(self, arch: ArchOps, cpus: Sequence[ReferenceCpu], salt: int = 0,
                 demonstrate: bool = True) -> None:
        self.arch = arch
        self.benches = [Bench(arch, cpu, salt) for cpu in cpus]
        self.demonstrate = demonstrate

    def close(self) -> None:
        for b in self.benches:
            b.close()

    def run(self, case: Case) -> CaseResult:
        arch = self.arch
        try:
            analysis = analyze_case(arch, case)
        except DecodeError as exc:
            return CaseResult(case, "failed", "", "", None, None, {}, f"undecodable: {exc}")
        problem = check_analysis(arch, analysis)
        if problem:
            return CaseResult(case, "failed", analysis.insn.text, analysis.kind, None,
                              analysis.refusal, {}, f"contract: {problem}")
        reasons = []
        for bench in self.benches:
            try:
                if analysis.refusal is not None:
                    res = CaseResult(case, "refused", analysis.insn.text, analysis.kind,
                                     bench.cpu.name, analysis.refusal)
                    if self.demonstrate:
                        diff = bench.demonstrate_refusal(case, analysis)
                        res.detail = f"needed: {diff}" if diff else "caution: no difference shown"
                    return res
                return bench.run_case(case, analysis)
            except CannotRun as exc:
                reasons.append(f"{bench.cpu.name}: {exc}")
            except TargetError as exc:  # the scratch process died: start a new one
                bench.close()
                reasons.append(f"{bench.cpu.name}: {exc}")
        if analysis.refusal is not None:
            return CaseResult(case, "refused", analysis.insn.text, analysis.kind, None,
                              analysis.refusal, {}, "caution: no reference CPU could run it")
        return CaseResult(case, "unverified", analysis.insn.text, analysis.kind, None, None, {},
                          "; ".join(reasons) or "no reference CPU available")


def select_cpus(plugins: PluginSet, arch: ArchOps, names: Sequence[str] | None) -> list[ReferenceCpu]:
    cpus = plugins.reference_cpus(arch)
    usable = [c for c in cpus if c.unavailable() is None]
    if names:
        wanted = [n.lower() for n in names]
        usable = [c for c in usable if c.name in wanted]
    return usable


# --------------------------------------------------------------------------- parallel
_worker: CaseRunner | None = None
_parent_plugins: PluginSet | None = None  # inherited by forked workers


def _init_worker(arch_name: str, cpu_names: list[str], salt: int, index_q) -> None:
    global _worker
    try:
        idx = index_q.get_nowait()
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {allowed[idx % len(allowed)]})
    except Exception:
        pass
    plugins = _parent_plugins or default_plugins()
    arch = plugins.arch(arch_name)
    _worker = CaseRunner(arch, select_cpus(plugins, arch, cpu_names), salt)


def _run_chunk(cases: list[Case]) -> list[CaseResult]:
    assert _worker is not None
    return [_worker.run(c) for c in cases]


def run_cases(arch: ArchOps, cases: list[Case], *, cpus: Sequence[str] | None = None,
              jobs: int = 1, salt: int = 0, plugins: PluginSet | None = None,
              progress: Callable[[int, int], None] | None = None) -> Report:
    plugins = plugins or default_plugins()
    chosen = select_cpus(plugins, arch, cpus)
    report = Report(arch.name, contract=check_contract(arch))
    start = time.monotonic()
    if not chosen:
        report.results = [CaseResult(c, "unverified", detail="no reference CPU available")
                          for c in cases]
        return report
    cpu_names = [c.name for c in chosen]
    jobs = max(1, min(jobs, len(cases) // 50 or 1))
    done = 0
    if jobs == 1:
        runner = CaseRunner(arch, chosen, salt)
        try:
            for c in cases:
                report.results.append(runner.run(c))
                done += 1
                if progress and done % 50 == 0:
                    progress(done, len(cases))
        finally:
            runner.close()
    else:
        global _parent_plugins
        _parent_plugins = plugins
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        for i in range(jobs):
            q.put(i)
        chunk = 64
        pieces = [cases[i:i + chunk] for i in range(0, len(cases), chunk)]
        with concurrent.futures.ProcessPoolExecutor(
                jobs, mp_context=ctx, initializer=_init_worker,
                initargs=(arch.name, cpu_names, salt, q)) as pool:
            for got in pool.map(_run_chunk, pieces):
                report.results.extend(got)
                done += len(got)
                if progress:
                    progress(done, len(cases))
    report.seconds = time.monotonic() - start
    for r in report.results:
        if r.cpu:
            report.cpus_used[r.cpu] += 1
    return report


def default_jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def progress_printer(stream=sys.stderr) -> Callable[[int, int], None] | None:
    if not stream.isatty():
        return None

    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            stream.write("\n")
        stream.flush()

    return show
