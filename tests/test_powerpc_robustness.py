"""Arbitrary bytes never make the powerpc plugin raise anything but DecodeError, and every
analysis keeps the contract (a reason for each refusal, a stepping fallback for
emulation, strategies within the declaration)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_powerpc_support import VARIANTS

from ubp_core.conformance.kit import check_analysis, check_contract
from ubp_core.errors import DecodeError, MemoryFault


@pytest.fixture(params=list(VARIANTS))
def arch(request, plugins):
    return plugins.arch(request.param)


def test_contract(arch):
    assert check_contract(arch) == []


def _exercise(arch, data: bytes, address: int) -> None:
    try:
        insn = arch.decode(data, address)
    except DecodeError:
        return
    assert insn.length in (4, 8) and insn.raw == data[:insn.length]
    analysis = arch.analyze(insn)
    assert check_analysis(arch, analysis) is None

    def read(a, n):
        off = a - address
        if off < 0 or off + n > len(data):
            raise MemoryFault(a, n)
        return data[off:off + n]

    assert check_analysis(arch, arch.analyze_in_context(analysis, read)) is None
    if analysis.accepted:
        slot = address + (1 << 20)
        arch.boost(analysis, slot)
        step = arch.prepare_xol(analysis, slot, {r: 0 for r in arch.registers}) \
            if analysis.ssol_slot_ok(slot) else None
        if step is not None:
            arch.post_xol(step, {r: 0 for r in arch.registers}, read)
            arch.abort_xol(step, {r: 0 for r in arch.registers}, read)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=12),
       address=st.integers(min_value=0, max_value=(1 << 32) - 1).map(lambda a: a & ~3))
def test_arbitrary_bytes(arch, data, address):
    _exercise(arch, data, address)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(word=st.integers(min_value=0, max_value=(1 << 32) - 1),
       suffix=st.integers(min_value=0, max_value=(1 << 32) - 1))
def test_every_primary_opcode_and_prefix(arch, word, suffix):
    # bias towards the interesting forms: prefixed (1), branches, 19 and 31
    for op in (1, 16, 18, 19, 31, word >> 26):
        w = (op << 26) | (word & 0x03FFFFFF)
        _exercise(arch, w.to_bytes(4, arch.byteorder) + suffix.to_bytes(4, arch.byteorder),
                  0x10000000)
