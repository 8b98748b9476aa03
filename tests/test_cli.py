"""The ``ubp`` command as users run it."""

from __future__ import annotations

import json
import subprocess
import sys


def ubp(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ubp_core.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_archs_lists_x86():
    out = ubp("archs", "--json")
    assert out.returncode == 0
    rows = json.loads(out.stdout)
    x = next(r for r in rows if r["name"] == "x86_64")
    assert x["elf"] == {"machine": "EM_X86_64", "class": 64, "byteorder": "little"}
    assert x["strategies"] == ["emulate", "boost", "ssol", "inline"]
    assert "unicorn" in x["reference_cpus"]
    assert "x86_64" in ubp("archs").stdout


def test_analyze_libc_json(libc_x86):
    out = ubp("analyze", libc_x86, "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["arch"] == "x86_64"
    assert set(d["strategies"]) == {"emulate", "boost", "ssol", "inline", "refused"}
    assert sum(d["strategies"].values()) == d["instructions"]
    assert d["functions"] > 1000
    assert isinstance(d["refusals"], dict)


def test_analyze_one_function_lists_instructions(libc_x86):
    out = ubp("analyze", libc_x86, "--function", "getpid", "--json")
    d = json.loads(out.stdout)
    assert d["functions"] == 1 and d["listing"]
    assert all(row["function"] == "getpid" for row in d["listing"])
    text = ubp("analyze", libc_x86, "--function", "getpid").stdout
    assert "syscall" in text and "no trap beyond the breakpoint" in text


def test_analyze_unknown_function_suggests(libc_x86):
    out = ubp("analyze", libc_x86, "--function", "mallok")
    assert out.returncode == 2
    assert "malloc" in out.stderr


def test_analyze_file_no_plugin_handles(tmp_path):
    elf = tmp_path / "arm.elf"
    # a minimal ELF header for a 32-bit little-endian ARM file
    hdr = bytearray(52)
    hdr[:4] = b"\x7fELF"
    hdr[4], hdr[5], hdr[6] = 1, 1, 1
    hdr[16:18] = (2).to_bytes(2, "little")  # ET_EXEC
    hdr[18:20] = (40).to_bytes(2, "little")  # EM_ARM
    hdr[20:24] = (1).to_bytes(4, "little")
    hdr[40:42] = (52).to_bytes(2, "little")
    elf.write_bytes(bytes(hdr))
    out = ubp("analyze", str(elf))
    assert out.returncode == 2
    assert "no installed plugin handles" in out.stderr and "EM_ARM" in out.stderr


def test_analyze_not_an_elf(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello")
    out = ubp("analyze", str(junk))
    assert out.returncode == 2
    assert "not a readable ELF file" in out.stderr


def test_conformance_unknown_arch():
    out = ubp("conformance", "vax")
    assert out.returncode == 2
    assert "no plugin for architecture 'vax'" in out.stderr


def test_conformance_corpus_libc_finds_the_arch_libc():
    """`--corpus libc` names the arch's libc.so.6 (native or cross), chosen by its ELF
    header; with none installed, a clear error says what to install."""
    out = ubp("conformance", "x86_64", "--corpus", "libc", "--sample", "30",
              "--no-plugin-cases", "--cpu", "unicorn", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["corpus"] == {"/lib/x86_64-linux-gnu/libc.so.6": 30,
                           "/lib/x86_64-linux-gnu/libc.so.6 (available)": 108284}
    assert d["failed"] == 0 and d["passed"] == 30


def test_conformance_corpus_libc_missing_says_what_to_install(monkeypatch):
    import pytest

    from ubp_core import cli
    from ubp_core.errors import UbpError
    from ubp_core.plugins import default_plugins

    plugins = default_plugins()
    monkeypatch.setattr(cli, "LIBC_GLOBS", ("/nonexistent/*/libc.so.6",))
    with pytest.raises(UbpError, match=r"no libc\.so\.6 for x86_64 .* install"):
        cli._libc_for(plugins, plugins.arch("x86_64"))
