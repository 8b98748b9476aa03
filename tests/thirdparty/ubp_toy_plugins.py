"""Two architecture plugins that live outside the core and outside plugins/: found only
through their own ``ubp`` entry point (written by the test into a throwaway
dist-info), exactly as a third party's would be.

- ``x86_64-stepper``: reuses the x86-64 plugin's analysis but offers only SSOL and
  inline stepping; a correct plugin that must pass the kit.
- ``x86_64-broken``: forgets the call fixup after an out-of-line step, the classic
  mistake; the kit must catch it.
"""

from __future__ import annotations

from ubp_x86_64 import X86_64

from ubp_core.hookspecs import hookimpl
from ubp_core.types import Analysis, Effect, ElfIdent, Strategy

NO_ELF = ElfIdent("EM_NONE", 64, "little")


class Stepper(X86_64):
    name = "x86_64-stepper"
    aliases = ()
    elf = NO_ELF
    strategies = frozenset({Strategy.SSOL, Strategy.INLINE})

    def analyze(self, insn):
        a = super().analyze(insn)
        if a.refusal is not None:
            return a
        keep = a.strategies & self.strategies
        if not keep:
            return Analysis(a.insn, frozenset(), "only a boost runs it correctly", a.kind)
        return Analysis(a.insn, keep, None, a.kind, a.plan, a.volatile, a.faults,
                        a.ssol_reach, a.ssol_near)


class Broken(X86_64):
    name = "x86_64-broken"
    aliases = ()
    elf = NO_ELF

    def analyze(self, insn):
        a = super().analyze(insn)
        if a.refusal is not None:
            return a
        # no emulation or boost: every call goes through the (broken) SSOL fixup
        keep = a.strategies & {Strategy.SSOL, Strategy.INLINE}
        if not keep:
            return Analysis(a.insn, frozenset(), "only a boost runs it correctly", a.kind)
        return Analysis(a.insn, keep, None, a.kind, a.plan, a.volatile, a.faults,
                        a.ssol_reach, a.ssol_near)

    def post_xol(self, step, regs, read) -> Effect:
        eff = super().post_xol(step, regs, read)
        rsp = regs["rsp"]
        eff.mem = [(addr, data) for addr, data in eff.mem if addr != rsp]
        return eff


@hookimpl
def ubp_arch_ops():
    return [Stepper(), Broken()]
