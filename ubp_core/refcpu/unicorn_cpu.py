"""unicorn as a reference CPU: any arch whose plugin gives a UnicornSpec."""

from __future__ import annotations

import random
import signal

from ..archops import ArchOps
from ..errors import MemoryFault, TargetError
from ..target import Stop, StopKind
from ..types import Analysis, Regs, UnicornSpec
from . import PAGE, ReferenceCpu, ScratchTarget

BUDGET = 10000  # instructions per free run before it counts as a timeout


class UnicornCpu(ReferenceCpu):
    name = "unicorn"
    fidelity = 50

    def unavailable(self) -> str | None:
        try:
            import unicorn  # noqa: F401
        except ImportError:
            return "unicorn is not installed (pip install unicorn)"
        return None if self.arch.unicorn_spec() else f"unicorn cannot run {self.arch.name}"

    def cannot_run(self, analysis: Analysis) -> str | None:
        spec = self.arch.unicorn_spec()
        if spec is not None and spec.unfaithful is not None:
            return spec.unfaithful(analysis)
        return None

    def open(self) -> UnicornTarget:
        spec = self.arch.unicorn_spec()
        assert spec is not None
        return UnicornTarget(self.arch, spec)


class UnicornTarget(ScratchTarget):
    def __init__(self, arch: ArchOps, spec: UnicornSpec) -> None:
        import unicorn as uc

        self.uc_mod = uc
        self.arch = arch
        self.spec = spec
        self.uc = uc.Uc(spec.arch, spec.mode)
        if spec.setup:
            spec.setup(self.uc)
        # a clean CPU to go back to after a fault: unicorn stops inside the exception
        # delivery, and the next fault would otherwise turn into a double fault
        self._pristine = self.uc.context_save()
        self._regmap = dict(spec.registers)
        self._pc_const = self._regmap[arch.abi.pc]
        self._mask = (1 << arch.word_bits) - 1
        self._regions: dict[int, int] = {}  # page -> prot
        self._lazy: list[int] = []
        self._mode: tuple[bool, int] | None = None
        self._event: tuple | None = None
        self._lazy_overflow = False
        self._icount = 0
        self._stepping = False
        self._ended: str | None = None
        self._last_pc: int | None = None
        # Counting instructions in a hook, not with emu_start's count: with count=1
        # unicorn drops an exception the instruction raises (the pc just stays put).
        self.uc.hook_add(uc.UC_HOOK_CODE, self._on_code)
        self.uc.hook_add(uc.UC_HOOK_INTR, self._on_intr)
        self.uc.hook_add(uc.UC_HOOK_MEM_READ_UNMAPPED | uc.UC_HOOK_MEM_WRITE_UNMAPPED,
                         self._on_unmapped)
        if spec.on_syscall is not None and spec.syscall_hook is not None:
            self.uc.hook_add(uc.UC_HOOK_INSN, self._on_syscall, None, 1, 0, spec.syscall_hook)

    # ------------------------------------------------------------------ hooks
    def _on_code(self, uc, address: int, _size: int, _data) -> None:
        spec = self.spec
        last, self._last_pc = self._last_pc, address
        if spec.executes_target is not None and last is not None \
                and spec.executes_target(uc, last, address):
            return  # the target an execute-type instruction runs: not a new instruction
        self._icount += 1
        if self._stepping:
            if self._icount == 2:  # the step's instruction is done; do not run the next
                self._ended = "step"
                uc.emu_stop()
                return
        elif self._icount > BUDGET:
            self._ended = "budget"
            uc.emu_stop()
            return
        if spec.accesses is not None and self.filler is not None:
            for where, size in spec.accesses(uc, address):
                self._appear(uc, where, size)

    def _on_intr(self, uc, intno: int, _data) -> None:
        spec = self.spec
        if intno == spec.syscall_interrupt and spec.on_syscall is not None:
            spec.on_syscall(uc)  # the kernel's part; the program goes on
            return
        if spec.interrupt_signal is not None:
            self._event = ("signal", spec.interrupt_signal(uc, intno))
        else:
            self._event = ("intr", intno)
        uc.emu_stop()

    def _on_syscall(self, uc, _data) -> None:
        self.spec.on_syscall(uc)

    def _on_unmapped(self, uc, _access, address: int, size: int, _value, _data) -> bool:
        if self.filler is None:
            return False
        return self._appear(uc, address, size)

    def _appear(self, uc, address: int, size: int) -> bool:
        """Map the missing pages of [address, address + size) with the filler's content."""
        assert self.filler is not None
        first = address & ~(PAGE - 1)
        last = (address + max(size, 1) - 1) & ~(PAGE - 1)
        for page in range(first, last + PAGE, PAGE):
            if page in self._regions or page in self._lazy:
                continue
            if not self.lazy_budget_left() or not self.arch.canonical_address(page):
                self._lazy_overflow = True
                return False
            try:
                uc.mem_map(page, PAGE, self.uc_mod.UC_PROT_READ | self.uc_mod.UC_PROT_WRITE)
            except self.uc_mod.UcError:
                return False
            uc.mem_write(page, self.filler(page))
            self._lazy.append(page)
        return True

    # ------------------------------------------------------------------ memory
    def read_memory(self, address: int, size: int) -> bytes:
        try:
            return bytes(self.uc.mem_read(address, size))
        except (self.uc_mod.UcError, OverflowError):
            raise MemoryFault(address, size) from None

    def write_memory(self, address: int, data: bytes) -> None:
        try:
            self.uc.mem_write(address, bytes(data))
        except (self.uc_mod.UcError, OverflowError):
            raise MemoryFault(address, len(data), write=True) from None
        # unicorn keeps translated code: drop it or the old bytes keep running
        self.uc.ctl_remove_cache(address, address + len(data))

    def map_region(self, address: int, size: int, prot: str) -> None:
        uc = self.uc_mod
        writable = "w" in prot or ("x" in prot and self.spec.exec_needs_write)
        p = (uc.UC_PROT_READ if "r" in prot else 0) | (uc.UC_PROT_WRITE if writable else 0) \
            | (uc.UC_PROT_EXEC if "x" in prot else 0)
        start = address & ~(PAGE - 1)
        end = (address + size + PAGE - 1) & ~(PAGE - 1)
        for page in range(start, end, PAGE):
            if page in self._lazy:
                self.uc.mem_unmap(page, PAGE)
                self._lazy.remove(page)
            if page in self._regions:
                if self._regions[page] != p:
                    self.uc.mem_protect(page, PAGE, p)
                    self._regions[page] = p
                continue
            try:
                self.uc.mem_map(page, PAGE, p)
            except uc.UcError as exc:
                raise TargetError(f"cannot map {page:#x}: {exc}") from None
            self._regions[page] = p

    def _unmap_page(self, page: int) -> None:
        self.uc.mem_unmap(page, PAGE)

    def get_regs(self, tid: int) -> Regs:
        read = self.uc.reg_read
        return {name: read(const) & self._mask for name, const in self._regmap.items()}

    def set_regs(self, tid: int, regs: Regs) -> None:
        write = self.uc.reg_write
        for name, const in self._regmap.items():
            if name in regs:
                write(const, regs[name] & self._mask)

    def set_extra(self, tid: int, values: dict[str, int]) -> None:
        for name, value in values.items():
            const = self._regmap.get(name)
            if const is not None:  # else unicorn does not model it: nothing to keep right
                self.uc.reg_write(const, value)

    def get_ext_state(self) -> bytes | None:
        if not self.spec.vectors:
            return None
        out = bytearray()
        for const, size in self.spec.vectors.values():
            value = self.uc.reg_read(const) & ((1 << (8 * size)) - 1)
            out += value.to_bytes(size, self.arch.byteorder)  # as a GDB stub sends it
        return bytes(out)

    def set_ext_state(self, state: bytes) -> None:
        off = 0
        for const, size in self.spec.vectors.values():
            self.uc.reg_write(const, int.from_bytes(state[off:off + size], self.arch.byteorder))
            off += size

    def random_ext_state(self, rng: random.Random) -> bytes | None:
        if not self.spec.vectors:
            return None
        return rng.randbytes(sum(size for _, size in self.spec.vectors.values()))

    # ------------------------------------------------------------------ execution
    def resume(self, tid: int, *, step: bool = False, signal: int = 0) -> None:
        if signal:
            raise TargetError("unicorn runs no signal handlers; cannot deliver a signal")
        self._mode = (step, signal)

    def wait(self, timeout: float | None = None) -> Stop:
        if self._mode is None:
            raise TargetError("wait() without resume()")
        step, _ = self._mode
        self._mode = None
        self._event = None
        self._ended = None
        self._icount = 0
        self._last_pc = None
        self._stepping = step
        self._lazy_overflow = False
        uc = self.uc_mod
        pc = self.uc.reg_read(self._pc_const) & self._mask
        try:
            self.uc.emu_start(pc, self._mask)
            if self._icount == 0 and self._event is None:
                # a stop request left over from the previous run's emu_stop: go again
                self.uc.emu_start(pc, self._mask)
        except uc.UcError as exc:
            now = self.uc.reg_read(self._pc_const) & self._mask
            if step and now != pc and exc.errno in (uc.UC_ERR_FETCH_UNMAPPED,
                                                    uc.UC_ERR_FETCH_PROT):
                # the instruction completed; unicorn failed fetching the next one, which
                # a real single-step would not have done yet
                return Stop(self.tid, StopKind.TRAP, signal.SIGTRAP)
            return self._error_stop(exc)
        if self._event is not None:
            how, intno = self._event
            if how == "signal":
                return self._signal_stop(intno, pc if step else None)
            if intno == self.spec.breakpoint_interrupt:
                pc = self.uc.reg_read(self._pc_const)
                fix = self.arch.pc_after_trap - self.spec.pc_after_breakpoint
                if fix:
                    self.uc.reg_write(self._pc_const, (pc + fix) & self._mask)
                return Stop(self.tid, StopKind.TRAP, signal.SIGTRAP)
            signo = self.spec.interrupts.get(intno, signal.SIGILL)
            self._reset_cpu()
            return Stop(self.tid, StopKind.SIGNAL, signo, fault=True)
        if self._ended == "step":
            return Stop(self.tid, StopKind.TRAP, signal.SIGTRAP)
        if self._ended == "budget":
            return Stop(self.tid, StopKind.TIMEOUT)
        # emu_start returned on its own: it reached the end address
        return Stop(self.tid, StopKind.SIGNAL, signal.SIGSEGV, fault=True,
                    fault_addr=self.uc.reg_read(self._pc_const) & self._mask)

    def _signal_stop(self, signo: int | None, stepped_from: int | None) -> Stop:
        """A stop for an interrupt the spec classified (signal None: unicorn lacks it).

        ``stepped_from``: the pc a single-step started at.  Unicorn reports a program
        exception at the instruction that raised it, so one at another pc belongs to
        the next instruction (its fetch failed): the stepped one completed.
        """
        pc = self.uc.reg_read(self._pc_const) & self._mask
        if signo == signal.SIGTRAP:
            fix = self.arch.pc_after_trap - self.spec.pc_after_breakpoint
            if fix:
                self.uc.reg_write(self._pc_const, (pc + fix) & self._mask)
            return Stop(self.tid, StopKind.TRAP, signal.SIGTRAP)
        self._reset_cpu()
        if stepped_from is not None and pc != stepped_from:
            return Stop(self.tid, StopKind.TRAP, signal.SIGTRAP)
        if signo is None:
            return Stop(self.tid, StopKind.SIGNAL, signal.SIGILL, fault=True,
                        data="unicorn lacks this instruction", unsupported=True)
        prot = self._regions.get(pc & ~(PAGE - 1), 0)
        fetched = bool(prot & self.uc_mod.UC_PROT_EXEC)
        return Stop(self.tid, StopKind.SIGNAL, signo, fault=True, unsupported=False,
                    fault_addr=None if fetched else pc)

    def _reset_cpu(self) -> None:
        regs = self.get_regs(self.tid)
        ext = self.get_ext_state()
        self.uc.context_restore(self._pristine)
        self.set_regs(self.tid, regs)
        if ext is not None:
            self.set_ext_state(ext)

    def _error_stop(self, exc) -> Stop:
        uc = self.uc_mod
        err = exc.errno
        pc = self.uc.reg_read(self._pc_const) & self._mask
        if err in (uc.UC_ERR_FETCH_UNMAPPED, uc.UC_ERR_FETCH_PROT):
            # a fetch at the pc (the next instruction is not there), unless the pc is in
            # executable memory: then the instruction there fetched something else (an
            # EXECUTE's target) and faulted itself
            fetched = self._regions.get(pc & ~(PAGE - 1), 0) & uc.UC_PROT_EXEC
            return Stop(self.tid, StopKind.SIGNAL, signal.SIGSEGV, fault=True,
                        fault_addr=None if fetched else pc)
        if err in (uc.UC_ERR_READ_UNMAPPED, uc.UC_ERR_WRITE_UNMAPPED, uc.UC_ERR_READ_PROT,
                   uc.UC_ERR_WRITE_PROT, uc.UC_ERR_READ_UNALIGNED, uc.UC_ERR_WRITE_UNALIGNED):
            return Stop(self.tid, StopKind.SIGNAL, signal.SIGSEGV, fault=True)
        if err == uc.UC_ERR_FETCH_UNALIGNED:
            return Stop(self.tid, StopKind.SIGNAL, signal.SIGBUS, fault=True, fault_addr=pc)
        return Stop(self.tid, StopKind.SIGNAL, signal.SIGILL, fault=True,
                    data="unicorn: " + str(exc))

    def close(self) -> None:
        self.uc = None  # type: ignore[assignment]
