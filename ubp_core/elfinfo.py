"""ELF files: which arch they hold, and their function symbols (pyelftools)."""

from __future__ import annotations

import bisect
import os
import struct
from dataclasses import dataclass
from functools import cached_property

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .errors import UbpError
from .types import ElfIdent

SHF_EXECINSTR = 0x4
SHN_LORESERVE = 0xFF00  # section indices from here on are special (ABS, COMMON, ...)
_TYPES = {0: "STT_NOTYPE", 1: "STT_OBJECT", 2: "STT_FUNC", 3: "STT_SECTION", 4: "STT_FILE",
          5: "STT_COMMON", 6: "STT_TLS", 10: "STT_GNU_IFUNC"}
_BINDS = {0: "STB_LOCAL", 1: "STB_GLOBAL", 2: "STB_WEAK", 10: "STB_GNU_UNIQUE"}


class ElfFileError(UbpError):
    """Not an ELF file, or one pyelftools cannot read."""


#: what pyelftools raises on a truncated or inconsistent file (ELFParseError is an
#: ELFError; offsets and counts past the end give struct, value and overflow errors)
CORRUPT = (ELFError, ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError,
           AttributeError, TypeError, struct.error, OSError, MemoryError, RecursionError)


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    address: int  # st_value (link-time virtual address)
    size: int
    kind: str  # "func", or "label" (an untyped global symbol in code)
    binding: str
    #: a non-default symbol version: code kept for old programs, not what a name binds to
    hidden: bool = False


def elf_ident_of(path: str) -> ElfIdent:
    f = _open_file(path)
    with f:
        return _ident(_open(f, path))


def _open_file(path: str):
    """Open a regular file (a FIFO would block the open, a device or /proc file is not
    an ELF image); a clear error otherwise."""
    try:
        if not os.path.isfile(path):
            os.stat(path)  # the precise reason when it does not exist or cannot be reached
            raise ElfFileError(f"{path}: not a regular file")
        return open(path, "rb")
    except OSError as exc:
        raise ElfFileError(f"{path}: {exc.strerror}") from None


def _open(f, path: str) -> ELFFile:
    try:
        return ELFFile(f)
    except CORRUPT as exc:
        raise ElfFileError(f"{path}: not a readable ELF file ({exc})") from None


def _ident(elf: ELFFile) -> ElfIdent:
    try:
        return ElfIdent(elf["e_machine"], elf.elfclass,
                        "little" if elf.little_endian else "big", elf["e_flags"])
    except CORRUPT as exc:
        raise ElfFileError(f"{elf.stream.name}: corrupt ELF header ({exc})") from None


class ElfImage:
    """An ELF file opened for symbol and code lookups."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ifuncs: set[str] = set()  # filled with :attr:`symbols`
        self._f = _open_file(path)
        try:
            self.elf = _open(self._f, path)
            self.ident = _ident(self.elf)
            try:
                self._segments = [
                    (seg["p_vaddr"], seg["p_memsz"], seg["p_filesz"], seg["p_offset"],
                     seg["p_flags"])
                    for seg in self.elf.iter_segments() if seg["p_type"] == "PT_LOAD"
                ]
            except CORRUPT as exc:
                raise ElfFileError(f"{path}: corrupt program headers ({exc})") from None
        except BaseException:
            self._f.close()
            raise

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> ElfImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_pie_or_shared(self) -> bool:
        return self.elf["e_type"] == "ET_DYN"

    @cached_property
    def _code_sections(self) -> set[int]:
        try:
            return {i for i, sec in enumerate(self.elf.iter_sections())
                    if sec["sh_flags"] & SHF_EXECINSTR}
        except CORRUPT as exc:
            raise ElfFileError(f"{self.path}: corrupt section headers ({exc})") from None

    def _descriptor_entry(self, address: int) -> int | None:
        """The code address a function descriptor at ``address`` names (its first word)."""
        size = self.elf.elfclass // 8
        try:
            raw = self.read(address, size)
        except ElfFileError:
            return None
        entry = int.from_bytes(raw, "little" if self.elf.little_endian else "big")
        if any(lo <= entry < hi for lo, hi in self.executable_ranges()):
            return entry
        return None

    def _raw_symbols(self, secname: str):
        """(name, value, size, type, bind, shndx, hidden) of every entry of a symbol table,
        unpacked with struct: pyelftools builds a parsed object per symbol, ten times
        slower (0.2 s for libc), and that cost is paid by every probe of a new library."""
        try:
            sec = self.elf.get_section_by_name(secname)
            if sec is None or sec["sh_type"] not in ("SHT_SYMTAB", "SHT_DYNSYM"):
                return
            data = sec.data()
            strtab = self.elf.get_section(sec["sh_link"]).data()
            versym = b""
            if secname == ".dynsym":
                vs = self.elf.get_section_by_name(".gnu.version")
                versym = vs.data() if vs is not None else b""
        except CORRUPT as exc:
            raise ElfFileError(f"{self.path}: corrupt {secname} ({exc})") from None
        order = "<" if self.elf.little_endian else ">"
        # bit 15 of a symbol's version: hidden, not the default (an old version kept for
        # programs linked long ago: memcpy@GLIBC_2.2.5 beside memcpy@@GLIBC_2.14)
        hidden = [v & 0x8000 for (v,) in struct.iter_unpack(order + "H",
                                                             versym[:len(versym) & ~1])]
        if self.elf.elfclass == 64:
            fmt, size = order + "IBBHQQ", 24
        else:
            fmt, size = order + "IIIBBH", 16
        usable = len(data) - len(data) % size
        for i, entry in enumerate(struct.iter_unpack(fmt, data[:usable])):
            if size == 24:
                st_name, info, _other, shndx, value, sz = entry
            else:
                st_name, value, sz, info, _other, shndx = entry
            end = strtab.find(b"\0", st_name)
            if st_name >= len(strtab) or end < 0:
                continue  # a name outside the string table: no usable name
            name = strtab[st_name:end].decode("utf-8", "replace")
            yield (name, value, sz, _TYPES.get(info & 0xF), _BINDS.get(info >> 4), shndx,
                   i < len(hidden) and bool(hidden[i]))

    @cached_property
    def symbols(self) -> list[Symbol]:
        """Function symbols from .symtab and .dynsym, one per (name, address).

        A function symbol outside executable sections is a function descriptor (the ABI
        of some 64-bit targets: ``.opd``): its first word is the code address, and the
        code runs up to the next function (the descriptor's size is not the code's).
        """
        seen: set[tuple[str, int]] = set()
        out: list[Symbol] = []
        described: list[int] = []
        code = self._code_sections
        for secname in (".symtab", ".dynsym"):
            for name, address, size, kind, bind, shndx, hidden in self._raw_symbols(secname):
                if kind == "STT_GNU_IFUNC" and shndx:
                    # its code is the resolver that picks an implementation once, when
                    # the library loads: a probe there would never see a call
                    self._ifuncs.add(name.split("@")[0])
                    continue
                if kind not in ("STT_FUNC", "STT_NOTYPE") or not name:
                    continue
                special = shndx == 0 or shndx >= SHN_LORESERVE
                if kind == "STT_NOTYPE" and not (  # a label in code (hand-written asm)
                        not special and shndx in code and bind != "STB_LOCAL"):
                    continue
                if shndx == 0 or address == 0:  # undefined
                    continue
                name = name.split("@")[0]
                if not special and shndx not in code:
                    entry = self._descriptor_entry(address)
                    if entry is None:
                        continue
                    address, size = entry, 0
                    described.append(len(out))
                key = (name, address)
                if key in seen:
                    continue
                seen.add(key)
                out.append(Symbol(name, address, size,
                                  "label" if kind == "STT_NOTYPE" else "func",
                                  bind or "STB_LOCAL", hidden))
        if described:
            starts = sorted({s.address for s in out})
            ends = [hi for _, hi in self.executable_ranges()]
            for i in described:
                sym = out[i]
                nxt = bisect.bisect_right(starts, sym.address)
                limit = min((e for e in ends if e > sym.address), default=sym.address)
                end = min(starts[nxt], limit) if nxt < len(starts) else limit
                out[i] = Symbol(sym.name, sym.address, end - sym.address, sym.kind, sym.binding)
        return out

    @property
    def ifuncs(self) -> set[str]:
        """Names of GNU indirect functions (not in :attr:`symbols`)."""
        self.symbols  # noqa: B018 (reading the tables fills the set)
        return self._ifuncs

    def functions(self) -> list[Symbol]:
        """Function symbols with a size, one per address (aliases folded)."""
        by_addr: dict[int, Symbol] = {}
        for sym in self.symbols:
            if sym.size <= 0:
                continue
            have = by_addr.get(sym.address)
            if have is None or (have.binding != "STB_GLOBAL" and sym.binding == "STB_GLOBAL"):
                by_addr[sym.address] = sym
        return sorted(by_addr.values(), key=lambda s: s.address)

    def read(self, vaddr: int, size: int) -> bytes:
        """Bytes of the file image at a link-time virtual address."""
        for start, _memsz, filesz, offset, _flags in self._segments:
            if start <= vaddr < start + filesz:
                size = min(size, start + filesz - vaddr)
                try:
                    self._f.seek(offset + vaddr - start)
                    return self._f.read(size)
                except (OSError, OverflowError, ValueError) as exc:
                    raise ElfFileError(f"{self.path}: cannot read {size} bytes at file "
                                       f"offset {offset + vaddr - start:#x} ({exc})") from None
        raise ElfFileError(f"{self.path}: no file data at {vaddr:#x}")

    def data_symbol(self, name: str) -> int | None:
        """Link-time address of a data (or any) symbol, e.g. the dynamic linker's
        ``_r_debug``; None when absent."""
        for secname in (".dynsym", ".symtab"):
            for sym, value, _size, _kind, _bind, shndx, _hidden in self._raw_symbols(secname):
                if value and shndx != 0 and sym.split("@")[0] == name:
                    return value
        return None

    def in_memory_image(self, vaddr: int) -> bool:
        """True when a loaded segment covers ``vaddr`` (file data or zero-filled)."""
        return any(start <= vaddr < start + memsz for start, memsz, *_ in self._segments)

    def executable_ranges(self) -> list[tuple[int, int]]:
        return [(s, s + fs) for s, _m, fs, _o, fl in self._segments if fl & 1]

    def vaddr_to_offset(self, vaddr: int) -> int | None:
        for start, _memsz, filesz, offset, _flags in self._segments:
            if start <= vaddr < start + filesz:
                return offset + vaddr - start
        return None

    def offset_to_vaddr(self, off: int) -> int | None:
        for start, _memsz, filesz, offset, _flags in self._segments:
            if offset <= off < offset + filesz:
                return start + off - offset
        return None

    def file_size(self) -> int:
        return os.fstat(self._f.fileno()).st_size
