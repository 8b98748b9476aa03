"""Symbol tables: UBP's own reader against pyelftools', symbol versions and IFUNCs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from elftools.elf.elffile import ELFFile

from ubp_core.elfinfo import ElfImage
from ubp_core.symbols import Module

LIBCS = [p for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/powerpc64le-linux-gnu/lib/libc.so.6",
                     "/usr/powerpc64-linux-gnu/lib/libc.so.6", "/usr/powerpc-linux-gnu/lib/libc.so.6",
                     "/usr/s390x-linux-gnu/lib/libc.so.6", "/lib64/ld-linux-x86-64.so.2")
         if os.path.exists(p)]


@pytest.mark.parametrize("path", LIBCS)
def test_every_symbol_entry_reads_as_pyelftools_reads_it(path):
    """The struct-unpacked tables (ten times faster) hold what pyelftools parses, entry by
    entry: name, value, size, type, binding, section; and the version's hidden bit is
    pyelftools' version table's."""
    with ElfImage(path) as image, open(path, "rb") as f:
        elf = ELFFile(f)
        for secname in (".dynsym", ".symtab"):
            sec = elf.get_section_by_name(secname)
            mine = list(image._raw_symbols(secname))
            if sec is None:
                assert mine == []
                continue
            theirs = list(sec.iter_symbols())
            assert len(mine) == len(theirs) > 0
            versym = elf.get_section_by_name(".gnu.version") if secname == ".dynsym" else None
            for i, (row, sym) in enumerate(zip(mine, theirs)):
                name, value, size, kind, bind, shndx, hidden = row
                assert name == sym.name and value == sym["st_value"] and size == sym["st_size"]
                their_kind = sym["st_info"]["type"]
                assert kind == ("STT_GNU_IFUNC" if their_kind == "STT_LOOS" else their_kind)
                assert bind == ("STB_GNU_UNIQUE" if sym["st_info"]["bind"] == "STB_LOOS"
                                else sym["st_info"]["bind"])
                their_shndx = sym["st_shndx"]
                assert shndx == their_shndx if isinstance(their_shndx, int) else shndx >= 0xFF00 \
                    or (shndx == 0 and their_shndx == "SHN_UNDEF")
                if versym is not None:  # pyelftools: the raw version index, hidden = bit 15
                    ndx = versym.get_symbol(i)["ndx"]
                    assert hidden == (isinstance(ndx, int) and bool(ndx & 0x8000))
                else:
                    assert not hidden


def test_a_name_binds_to_its_default_version_not_an_old_one():
    """libc keeps memcpy@GLIBC_2.2.5 (an old memmove) beside memcpy@@GLIBC_2.14, an IFUNC:
    the old one is not what programs call, so it is never what 'memcpy' resolves to;
    a name that only exists as an old version (__pthread_mutex_lock) still resolves."""
    libc = "/lib/x86_64-linux-gnu/libc.so.6"
    mod = Module(libc)
    assert "memcpy" in mod.image.ifuncs and "memcpy" not in mod.by_name
    assert any(s.name == "memcpy" and s.hidden for s in mod.image.symbols)
    assert mod.by_name["pthread_mutex_lock"].hidden is False
    old = mod.by_name["__pthread_mutex_lock"]
    assert old.hidden and old.address == mod.by_name["pthread_mutex_lock"].address


def test_probing_an_ifunc_says_what_it_is():
    out = subprocess.run([sys.executable, "-m", "ubp_core.cli", "trace", "--count", "memcpy",
                          "--", "/bin/true"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "indirect function (IFUNC)" in out.stderr and "Traceback" not in out.stderr
