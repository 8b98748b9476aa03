"""Which strategy a probe uses: the default policy and per-probe overrides."""

from __future__ import annotations

from .errors import RefusedError
from .types import POLICY_ORDER, Analysis, Strategy


def describe(analysis: Analysis) -> str:
    return f"{analysis.insn.text!r} at {analysis.address:#x}"


def candidates(analysis: Analysis, requested: Strategy | None = None,
               prefer_boost: bool = False) -> list[Strategy]:
    """Strategies to try, best first; raises RefusedError when none may be used.

    Inline single-stepping is only ever used when asked for: while the original
    instruction is back in place, other threads can run past the probe.
    ``prefer_boost``: the target pays for each memory access (ptrace: a system call),
    so an instruction whose emulation touches memory is boosted where it can be.
    """
    if analysis.refusal is not None:
        raise RefusedError(
            f"cannot probe {describe(analysis)}: {analysis.refusal}", analysis.refusal)
    if requested is not None:
        requested = Strategy(requested)
        if requested not in analysis.strategies:
            allowed = ", ".join(s.value for s in sorted(analysis.strategies, key=_rank)) or "none"
            raise RefusedError(
                f"strategy {requested.value!r} is not correct for {describe(analysis)} "
                f"(kind {analysis.kind}); correct strategies: {allowed}",
                f"{requested.value} not correct for {analysis.kind}")
        return [requested]
    found = [s for s in _order(analysis, prefer_boost) if s in analysis.strategies]
    if not found:
        raise RefusedError(
            f"{describe(analysis)} can only be single-stepped inline; "
            "ask for strategy 'inline' explicitly", "inline only")
    return found


_BOOST_FIRST = (Strategy.BOOST, Strategy.EMULATE, Strategy.SSOL)


def _order(analysis: Analysis, prefer_boost: bool) -> tuple[Strategy, ...]:
    if prefer_boost and analysis.emulation_touches_memory:
        return _BOOST_FIRST
    return POLICY_ORDER


def _rank(s: Strategy) -> int:
    return list(Strategy).index(s)


def default_strategy(analysis: Analysis, boost_ok: bool = True,
                     prefer_boost: bool = False) -> Strategy | None:
    """What the default policy picks (None: refused).  ``boost_ok``: a slot is in reach."""
    if analysis.refusal is not None:
        return None
    for s in _order(analysis, prefer_boost):
        if s in analysis.strategies and (s is not Strategy.BOOST or boost_ok):
            return s
    return Strategy.INLINE if Strategy.INLINE in analysis.strategies else None
