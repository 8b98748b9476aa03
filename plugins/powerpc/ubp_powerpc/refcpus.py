"""How the reference CPUs run PowerPC code: qemu-user for all three, unicorn for ppc32."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

from ubp_core.types import QemuSpec, UnicornSpec

if TYPE_CHECKING:
    from .arch import PowerPC

# floating point, the VSX upper halves of vs0-31, AltiVec (= vs32-63) and their status:
# every register an instruction of the libcs can write besides the general ones
EXT_REGISTERS = (*(f"f{i}" for i in range(32)), *(f"vs{i}h" for i in range(32)),
                 *(f"vr{i}" for i in range(32)), "fpscr", "vscr")

QEMU = {
    # (bits, byte order) -> (qemu binary, GDB architecture, CPU model, cross compiler)
    (64, "little"): ("qemu-ppc64le", "powerpc:common64", "power10", "powerpc64le-linux-gnu-gcc"),
    (64, "big"): ("qemu-ppc64", "powerpc:common64", "power10", "powerpc64-linux-gnu-gcc"),
    (32, "big"): ("qemu-ppc", "powerpc:common", "7400", "powerpc-linux-gnu-gcc"),
}


def qemu_spec(arch: PowerPC) -> QemuSpec | None:
    got = QEMU.get((arch.word_bits, arch.byteorder))
    if got is None:
        return None
    binary, gdb_arch, cpu, cc = got
    return QemuSpec(binary=binary, gdb_arch=gdb_arch, cpu=cpu, cc=cc,
                    ext_registers=EXT_REGISTERS)


def unicorn_spec(arch: PowerPC) -> UnicornSpec | None:
    """unicorn 2.1 runs 32-bit PowerPC; its ppc64 raises on ld/std/rldicl (issue 1779)."""
    if arch.word_bits != 32 or arch.byteorder != "big":
        return None
    try:
        from unicorn import UC_ARCH_PPC, UC_MODE_BIG_ENDIAN, UC_MODE_PPC32, ppc_const
    except ImportError:
        return None
    regs = {f"r{i}": getattr(ppc_const, f"UC_PPC_REG_{i}") for i in range(32)}
    regs.update(pc=ppc_const.UC_PPC_REG_PC, lr=ppc_const.UC_PPC_REG_LR,
                ctr=ppc_const.UC_PPC_REG_CTR, cr=ppc_const.UC_PPC_REG_CR,
                xer=ppc_const.UC_PPC_REG_XER)
    return UnicornSpec(
        arch=UC_ARCH_PPC, mode=UC_MODE_PPC32 | UC_MODE_BIG_ENDIAN, registers=regs,
        breakpoint_interrupt=6,
        # qemu's PowerPC exception numbers: DSI, ISI, alignment, program, FP unavailable
        interrupts={2: signal.SIGSEGV, 3: signal.SIGSEGV, 5: signal.SIGBUS,
                    6: signal.SIGILL, 7: signal.SIGILL},
        unfaithful=_unicorn_unfaithful,
    )


def _unicorn_unfaithful(analysis) -> str | None:
    if analysis.refusal is not None or analysis.kind == "load-reserve":
        return None
    return None
