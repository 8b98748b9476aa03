"""From a probe spec to an address in a live process: modules, symbols, load bias."""

from __future__ import annotations

import difflib
import fnmatch
import os
from dataclasses import dataclass, field

from .archops import ArchOps
from .elfinfo import ElfFileError, ElfImage, Symbol
from .errors import DecodeError, ProbeError
from .procmaps import Mapping, mapped_file, read_maps
from .spec import ProbeSpec


class NotYet(ProbeError):
    """The spec names something that may appear later (a library not loaded yet)."""


@dataclass
class Module:
    path: str
    mappings: list[Mapping] = field(default_factory=list)
    _image: ElfImage | None = None
    _by_name: dict[str, Symbol] | None = None
    #: where UBP reads the file (None: ``path``); differs when the program sees another
    #: file system than UBP (see :func:`~ubp_core.procmaps.mapped_file`)
    file: str | None = None

    @property
    def image(self) -> ElfImage:
        if self._image is None:
            self._image = ElfImage(self.file or self.path)
        return self._image

    @property
    def by_name(self) -> dict[str, Symbol]:
        if self._by_name is None:
            table: dict[str, Symbol] = {}
            ifuncs = self.image.ifuncs
            for sym in self.image.symbols:
                have = table.get(sym.name)
                if sym.hidden and (sym.name in ifuncs or (have is not None and not have.hidden)):
                    continue  # an old version: programs linked today call the default
                if have is None or (have.hidden and not sym.hidden) or (
                        have.size == 0 and sym.size):
                    table[sym.name] = sym
            self._by_name = table
        return self._by_name

    def runtime(self, vaddr: int, code: bool = True) -> int | None:
        """Run-time address of a link-time address of this module (None: not mapped).

        ``code``: only an executable mapping counts.  While the dynamic linker loads a
        library it first maps the whole file read-only, then maps the code over it: a
        breakpoint written into the first mapping would vanish."""
        off = self.image.vaddr_to_offset(vaddr)
        if off is None:
            return None if code else self._runtime_bss(vaddr)
        for m in self.mappings:
            if m.offset <= off < m.offset + (m.end - m.start) and (m.executable or not code):
                return m.start + off - m.offset
        return None

    def _runtime_bss(self, vaddr: int) -> int | None:
        """Addresses past a segment's file data (.bss): the load bias applies."""
        if not self.image.in_memory_image(vaddr):
            return None
        for m in self.mappings:
            base = self.image.offset_to_vaddr(m.offset)
            if base is not None:
                return vaddr + m.start - base
        return None

    def linktime(self, address: int) -> int | None:
        for m in self.mappings:
            if m.start <= address < m.end:
                return self.image.offset_to_vaddr(m.offset + address - m.start)
        return None

    def close(self) -> None:
        if self._image is not None:
            self._image.close()

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def module_matches(path: str, want: str) -> bool:
    """``want`` is a path, a file name, or a short name such as ``libc``."""
    if "/" in want:
        return os.path.realpath(want) == os.path.realpath(path) or want == path
    base = os.path.basename(path)
    if base == want:
        return True
    return base.startswith(want) and len(base) > len(want) and base[len(want)] in ".-_"


@dataclass(frozen=True, slots=True)
class Resolved:
    address: int
    module: str | None
    symbol: str | None
    offset: int


class Resolver:
    """Symbols of one live process, refreshed as it maps new files."""

    def __init__(self, pid: int, arch: ArchOps) -> None:
        self.pid = pid
        self.arch = arch
        self.modules: dict[str, Module] = {}
        #: mapped files UBP cannot read as the program sees them: path -> why
        self.unreadable: dict[str, str] = {}
        self.exe = os.path.realpath(f"/proc/{pid}/exe")
        self.refresh()

    def refresh(self) -> list[str]:
        """Re-read the process's mappings; return paths that appeared."""
        found: dict[str, list[Mapping]] = {}
        for m in read_maps(self.pid):
            if m.is_file and not m.path.endswith(" (deleted)"):
                found.setdefault(m.path, []).append(m)
        new = []
        for path, maps in found.items():
            mod = self.modules.get(path)
            if mod is not None and mod.mappings and maps[0].inode != mod.mappings[0].inode:
                self.modules.pop(path).close()  # another file under the same name now
                mod = None
            if mod is None:
                file = mapped_file(self.pid, maps[0])
                if file is None:
                    self.unreadable[path] = (
                        f"{path} as process {self.pid} maps it (device "
                        f"{maps[0].dev[0]:x}:{maps[0].dev[1]:x}, inode {maps[0].inode}) is "
                        "not the file of that name UBP sees, and neither "
                        f"/proc/{self.pid}/map_files nor /proc/{self.pid}/root gives it "
                        "(another mount namespace?): run UBP as root, or inside the "
                        "program's namespace")
                    continue
                if not _is_elf(file):
                    continue
                mod = self.modules[path] = Module(path, file=None if file == path else file)
                new.append(path)
            mod.mappings = maps
        for path in list(self.modules):
            if path not in found:
                self.modules.pop(path).close()
        return new

    def close(self) -> None:
        for mod in self.modules.values():
            mod.close()

    def layout_key(self) -> tuple:
        """Changes whenever a module is mapped, unmapped or remapped."""
        return tuple((path, tuple((m.start, m.offset) for m in mod.mappings))
                     for path, mod in sorted(self.modules.items()))

    def find_module(self, want: str) -> Module | None:
        for path, mod in self.modules.items():
            if module_matches(path, want):
                return mod
        return None

    def _check_unreadable(self, want: str) -> None:
        for path, why in self.unreadable.items():
            if module_matches(path, want):
                raise ProbeError(f"cannot read the symbols of {why}")

    def _search_order(self) -> list[Module]:
        mods = list(self.modules.values())
        mods.sort(key=lambda m: (m.path != self.exe, m.mappings[0].start if m.mappings else 0))
        return mods

    def resolve(self, spec: ProbeSpec, final: bool = True) -> Resolved:
        """Address of ``spec``.  Raises NotYet (it may still appear) or ProbeError.

        ``final``: the program has loaded its startup libraries, so a bare symbol that
        is nowhere is an error rather than something to wait for.
        """
        if spec.absolute:
            return Resolved(spec.offset, None, None, spec.offset)
        if spec.module is not None:
            mod = self.find_module(spec.module)
            if mod is None:
                self._check_unreadable(spec.module)
                raise NotYet(f"module {spec.module!r} is not loaded (yet)")
            return self._in_module(spec, mod)
        for mod in self._search_order():
            try:
                if spec.symbol in mod.by_name:
                    return self._in_module(spec, mod)
            except ElfFileError:
                continue
        if not final:
            raise NotYet(f"symbol {spec.symbol!r} not found yet")
        for path in self.unreadable:
            self._check_unreadable(path)
        for mod in self._search_order():
            _check_ifunc(spec, mod)
        names = []
        for mod in self._search_order():
            try:
                names.extend(mod.by_name)
            except ElfFileError:
                continue
        raise ProbeError(_unknown(spec.symbol, "the program or its libraries", names))

    def function_at(self, address: int) -> tuple[int, int] | None:
        """Run-time [start, end) of the sized function symbol containing ``address``."""
        for mod in self.modules.values():
            link = mod.linktime(address)
            if link is None:
                continue
            try:
                funcs = mod.image.functions()
            except ElfFileError:
                return None
            for sym in funcs:
                if sym.size and sym.address <= link < sym.address + sym.size:
                    start = address - (link - sym.address)
                    return start, start + sym.size
            return None
        return None

    def resolve_glob(self, spec: ProbeSpec) -> list[Resolved]:
        """Every function matching a pattern spec, one per address.  NotYet when the
        named module is not loaded (yet)."""
        if spec.module is not None:
            mod = self.find_module(spec.module)
            if mod is None:
                raise NotYet(f"module {spec.module!r} is not loaded (yet)")
            mods = [mod]
        else:
            mods = self._search_order()
        out = []
        for mod in mods:
            try:
                funcs = mod.image.functions()
            except ElfFileError:
                continue
            for sym in funcs:
                if fnmatch.fnmatchcase(sym.name, spec.symbol or ""):
                    addr = mod.runtime(sym.address)
                    if addr is not None:
                        out.append(Resolved(addr, mod.path, sym.name, 0))
        return out

    def _in_module(self, spec: ProbeSpec, mod: Module) -> Resolved:
        if spec.symbol is None:
            addr = mod.runtime(spec.offset)
            if addr is None:
                if mod.image.in_memory_image(spec.offset) and not any(
                        m.executable for m in mod.mappings):
                    raise NotYet(f"probe {spec.text!r}: {mod.path} is still being loaded")
                raise ProbeError(f"probe {spec.text!r}: {spec.offset:#x} is not in the code "
                                 f"of {mod.path}")
            self._check_boundary_by_containing(mod, spec.offset, spec.text)
            return Resolved(addr, mod.path, None, spec.offset)
        sym = mod.by_name.get(spec.symbol)
        if sym is None:
            _check_ifunc(spec, mod)
            raise ProbeError(_unknown(spec.symbol, mod.path, list(mod.by_name)))
        if spec.offset:
            if sym.size and spec.offset >= sym.size:
                raise ProbeError(f"probe {spec.text!r}: {spec.symbol} is only {sym.size} bytes")
            self._check_boundary(mod, sym, spec.offset, spec.text)
        addr = mod.runtime(sym.address + spec.offset)
        if addr is None:  # its code is not mapped yet (the linker is still loading it)
            raise NotYet(f"probe {spec.text!r}: the code of {spec.symbol} is not mapped yet")
        return Resolved(addr, mod.path, spec.symbol, spec.offset)

    def _boundaries(self, mod: Module, sym: Symbol) -> list[int]:
        code = mod.image.read(sym.address, sym.size or self.arch.max_insn_len * 64)
        return [i.address - sym.address for i in self.arch.decode_all(code, sym.address)]

    def _check_boundary(self, mod: Module, sym: Symbol, offset: int, text: str) -> None:
        if offset % self.arch.insn_alignment:
            raise ProbeError(f"probe {text!r}: offset {offset:#x} is not a multiple of "
                             f"{self.arch.insn_alignment}, so not an instruction boundary")
        try:
            starts = self._boundaries(mod, sym)
        except (ElfFileError, DecodeError):
            return
        if offset not in starts:
            before = max((s for s in starts if s < offset), default=0)
            after = min((s for s in starts if s > offset), default=None)
            near = f"+{before:#x}" + (f" or +{after:#x}" if after is not None else "")
            raise ProbeError(f"probe {text!r}: +{offset:#x} is inside an instruction of "
                             f"{sym.name}; the nearest instruction boundaries are {near}")

    def _check_boundary_by_containing(self, mod: Module, vaddr: int, text: str) -> None:
        for sym in mod.image.functions():
            if sym.address <= vaddr < sym.address + sym.size:
                self._check_boundary(mod, sym, vaddr - sym.address, text)
                return

    def describe(self, address: int) -> str:
        """``module:symbol+off`` for an address, for reports."""
        for mod in self.modules.values():
            lt = mod.linktime(address)
            if lt is None:
                continue
            for sym in mod.image.functions():
                if sym.address <= lt < sym.address + max(sym.size, 1):
                    off = lt - sym.address
                    return f"{mod.name}:{sym.name}" + (f"+{off:#x}" if off else "")
            return f"{mod.name}:{lt:#x}"
        return f"{address:#x}"


def _unknown(symbol: str | None, where: str, names: list[str]) -> str:
    close = difflib.get_close_matches(symbol or "", sorted(set(names)), n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown symbol {symbol!r} in {where}{hint}"


def _check_ifunc(spec: ProbeSpec, mod: Module) -> None:
    try:
        is_ifunc = spec.symbol in mod.image.ifuncs
    except ElfFileError:
        return
    if is_ifunc:
        raise ProbeError(
            f"probe {spec.text!r}: {spec.symbol} is an indirect function (IFUNC) in "
            f"{mod.name}: its symbol is the resolver that picks an implementation once, "
            "when the library is loaded, so a probe there never sees a call; probe the "
            "implementation (by its name where the library has one, or by address)")


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


__all__ = ["Module", "NotYet", "Resolved", "Resolver", "module_matches", "read_maps"]
