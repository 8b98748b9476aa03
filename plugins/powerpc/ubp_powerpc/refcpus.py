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
        pc_after_breakpoint=4,  # unicorn leaves the pc past the trap
        setup=_enable_fpu,
        unfaithful=_unicorn_unfaithful,
    )


MSR_FP = 0x2000


def _enable_fpu(uc) -> None:
    from unicorn import ppc_const

    uc.reg_write(ppc_const.UC_PPC_REG_MSR, uc.reg_read(ppc_const.UC_PPC_REG_MSR) | MSR_FP)


# XO-form arithmetic (primary 31, 9-bit extended opcode) that writes XER[CA]; the
# extended forms (e, me, ze) also read it
CARRY_XO = {8: "subfc", 10: "addc", 136: "subfe", 138: "adde", 200: "subfze",
            202: "addze", 232: "subfme", 234: "addme"}
# XO-form arithmetic with an overflow-enable (OE) form, which writes XER[OV] and [SO]
OE_XO = {*CARRY_XO, 40, 104, 233, 235, 266, 393, 395, 425, 427, 457, 459, 489, 491}
SHIFT_CARRY_XO10 = {792, 824, 794, 826, 827}  # sraw, srawi, srad, sradi (two encodings)
XER_SPR = 1


def _unicorn_unfaithful(analysis) -> str | None:
    """unicorn keeps XER's SO, OV and CA apart from the XER register its API reads and
    writes: an XER written into it never reaches them (a compare, a record form ("."
    instructions) or a carry-in reads stale bits), and what an instruction sets there
    never shows in the XER read back.  Everything that reads or writes them is left to
    qemu."""
    w = int.from_bytes(analysis.insn.raw[:4], "big")
    op = w >> 26
    xo9, xo10 = (w >> 1) & 0x1FF, (w >> 1) & 0x3FF
    compare = op in (10, 11) or (op == 31 and xo10 in (0, 32))
    record = op in (13, 28, 29) or (op in (20, 21, 23, 30, 31, 59, 63) and w & 1)
    if compare or record:
        return "unicorn does not copy XER[SO] into the condition register"
    carry = op in (8, 12) or (op == 31 and (xo9 in CARRY_XO or xo10 in SHIFT_CARRY_XO10))
    overflow = op == 31 and bool(w & 0x400) and xo9 in OE_XO
    spr = ((w >> 16) & 0x1F) | (((w >> 11) & 0x1F) << 5)
    xer = op == 31 and (xo10 == 512 or (xo10 in (339, 467) and spr == XER_SPR))
    if carry or overflow or xer:
        return ("unicorn keeps XER[SO,OV,CA] apart from the XER it reads and writes: "
                "carries and overflows in and out of XER are not what the CPU holds")
    return None
