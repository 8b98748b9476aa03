"""The conformance suite a plugin author runs::

    pytest --pyargs ubp_core.conformance.suite --ubp-arch ARCH [--ubp-corpus ELF]...

Every test holds the plugin to its own declarations, on the reference CPUs available
here.  An instruction no reference CPU can execute is skipped with the reason
(reported as unverified), never passed.
"""

from __future__ import annotations

import random

import pytest

from ..errors import DecodeError
from ..types import Strategy
from . import corpus
from .kit import check_analysis, check_contract, select_cpus
from .runner import Bench


def test_contract(ubp_arch) -> None:
    assert check_contract(ubp_arch) == []


def test_breakpoint_traps_where_declared(ubp_arch, ubp_plugins) -> None:
    cpus = select_cpus(ubp_plugins, ubp_arch, None)
    if not cpus:
        pytest.skip(f"no reference CPU for {ubp_arch.name} here")
    for cpu in cpus:
        bench = Bench(ubp_arch, cpu)
        try:
            assert bench.check_breakpoint() is None, cpu.name
        finally:
            bench.close()


def test_analysis_of_arbitrary_bytes(ubp_arch) -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        raw = rng.randbytes(ubp_arch.max_insn_len)
        address = rng.randrange(0x1000, 1 << 40) & ~(ubp_arch.insn_alignment - 1)
        try:
            insn = ubp_arch.decode(raw, address)
        except DecodeError:
            continue
        assert 0 < insn.length <= ubp_arch.max_insn_len
        assert raw.startswith(insn.raw)
        problem = check_analysis(ubp_arch, ubp_arch.analyze(insn))
        assert problem is None, f"{raw.hex()}: {problem}"


def test_case(ubp_case, ubp_case_runner) -> None:
    arch_name, case = ubp_case
    res = ubp_case_runner(arch_name, case)
    if res.status == "unverified":
        pytest.skip(f"unverified: {res.detail}")
    assert res.status in ("passed", "refused"), f"{res.text}: {res.detail}"


def test_every_claimed_strategy_is_exercised(ubp_arch, ubp_case_runner) -> None:
    seen: set[str] = set()
    for case in corpus.plugin_cases(ubp_arch):
        res = ubp_case_runner(ubp_arch.name, case)
        seen |= {s for s, v in res.strategies.items() if v == "passed"}
    missing = {s.value for s in ubp_arch.strategies} - seen
    if missing == {s.value for s in Strategy} and not select_cpus_available(ubp_arch):
        pytest.skip("no reference CPU")
    assert not missing, f"claimed but never shown correct by the plugin's cases: {missing}"


def select_cpus_available(arch) -> bool:
    from ..plugins import default_plugins

    return bool(select_cpus(default_plugins(), arch, None))
