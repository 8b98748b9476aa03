"""How the reference CPUs run s390x: the quirks of unicorn's s390x (QEMU 5) the plugin's
UnicornSpec works around, and qemu-user behind its GDB stub, each shown on the real CPU."""

from __future__ import annotations

import signal

import pytest

from ubp_core.conformance.kit import select_cpus
from ubp_core.refcpu import PAGE
from ubp_core.refcpu.unicorn_cpu import UnicornTarget
from ubp_core.target import StopKind

CODE = 0x401000
DATA = 0x30000000


@pytest.fixture(scope="module")
def s390(plugins):
    return plugins.arch("s390x")


@pytest.fixture(params=["unicorn", "qemu"])
def target(request, plugins, s390):
    cpus = select_cpus(plugins, s390, [request.param])
    if not cpus:
        pytest.skip(f"reference CPU {request.param} is not available here")
    t = cpus[0].open()
    t.map_region(CODE, 2 * PAGE, "rx")
    t.map_region(DATA, PAGE, "rw")
    yield t
    t.close()


def _one(plugins, s390, name):
    cpus = select_cpus(plugins, s390, [name])
    if not cpus:
        pytest.skip(f"{name} is not available here")
    t = cpus[0].open()
    yield t
    t.close()


@pytest.fixture
def uc_target(plugins, s390):
    yield from _one(plugins, s390, "unicorn")


@pytest.fixture
def qemu_target(plugins, s390):
    yield from _one(plugins, s390, "qemu")


def run(t, code: bytes, address: int = CODE, step: bool = False, **regs):
    """Place ``code`` (breakpoints after it) at ``address`` and run or step it."""
    page = address & ~(PAGE - 1)
    image = bytearray(t.arch.breakpoint * (PAGE // 2))
    image[address - page:address - page + len(code)] = code
    t.write_memory(page, bytes(image))
    r = t.get_regs(t.tid)
    r.update({k: v for k, v in regs.items()}, pswa=address)
    t.set_regs(t.tid, r)
    t.resume(t.tid, step=step)
    return t.wait(10), t.get_regs(t.tid)


def test_the_breakpoint_traps_with_the_pc_past_it(target):
    stop, regs = run(target, b"\x00\x01")
    assert stop.kind is StopKind.TRAP
    assert regs["pswa"] == CODE + 2


def test_an_instruction_then_the_breakpoint(target):
    stop, regs = run(target, bytes.fromhex("a7290005"))  # lghi r2,5
    assert stop.kind is StopKind.TRAP and regs["pswa"] == CODE + 6 and regs["r2"] == 5


def test_divide_by_zero_is_sigfpe_at_the_instruction(target):
    stop, regs = run(target, bytes.fromhex("b9870024"), r2=0, r3=9, r4=0)  # dlgr r2,r4
    assert stop.kind is StopKind.SIGNAL and stop.signo == signal.SIGFPE
    assert regs["pswa"] in (CODE, CODE + 4)  # Linux reports divide exceptions past it


def test_a_single_step_of_a_branch_into_nowhere_completes(target):
    stop, regs = run(target, bytes.fromhex("07f3"), step=True, r3=0x7000000)  # br r3
    assert stop.kind is StopKind.TRAP and regs["pswa"] == 0x7000000


def test_unicorn_tells_its_program_exceptions_apart(uc_target):
    """All arrive as interrupt 3: the program-interruption code decides the signal, and
    an encoding unicorn lacks (z14's agh) is reported as such."""
    t = uc_target
    t.map_region(CODE, PAGE, "rx")
    stop, _ = run(t, bytes.fromhex("b9970012"))  # dlr r1,r2: odd register pair
    assert (stop.signo, stop.unsupported) == (signal.SIGILL, False)
    stop, _ = run(t, bytes.fromhex("b2b20000"))  # lpswe: privileged in problem state
    assert (stop.signo, stop.unsupported) == (signal.SIGILL, False)
    stop, _ = run(t, bytes.fromhex("e32010000038"), r1=DATA)  # agh (z14)
    assert stop.unsupported is True


def test_unicorn_page_start_exceptions_are_classified_again(uc_target):
    """At a page start with no page before it, unicorn reports any exception of the first
    instruction as an addressing exception; the plugin runs it again to know better."""
    t = uc_target
    t.map_region(CODE, PAGE, "rx")
    for address in (CODE, CODE + 2):
        stop, regs = run(t, bytes.fromhex("b2b20000"), address=address)  # lpswe
        assert (stop.signo, stop.unsupported, regs["pswa"]) == (signal.SIGILL, False, address)
    stop, regs = run(t, b"\x00\x01", address=CODE)
    assert stop.kind is StopKind.TRAP and regs["pswa"] == CODE + 2


def test_unicorn_maps_what_an_instruction_touches_before_it_runs(uc_target, s390):
    t = uc_target
    t.map_region(CODE, PAGE, "rx")
    t.filler = lambda page: bytes([page >> 12 & 0xFF]) * PAGE
    t.begin_case()
    stop, regs = run(t, bytes.fromhex("e32030080004"), r3=0x50005000)  # lg r2,8(r3)
    # the page appeared with the filler's content (0x05 everywhere), not zeros
    assert stop.kind is StopKind.TRAP and regs["r2"] == 0x0505050505050505
    assert 0x50005000 in t.lazy_pages()
    stop, _ = run(t, bytes.fromhex("d20710002000"), r1=0x51000ffc, r2=0x52000000)  # mvc
    assert stop.kind is StopKind.TRAP
    assert {0x51000000, 0x51001000, 0x52000000} <= set(t.lazy_pages())


def test_unicorn_steps_execute_and_its_target_as_one_instruction(uc_target):
    t = uc_target
    t.map_region(CODE, 2 * PAGE, "rx")
    t.write_memory(CODE + PAGE, bytes.fromhex("1823"))  # lr r2,r3 (not run by a helper)
    stop, regs = run(t, bytes.fromhex("44004000"), step=True, r4=CODE + PAGE, r3=77, r2=0)
    assert stop.kind is StopKind.TRAP
    assert regs["pswa"] == CODE + 4 and regs["r2"] == 77


def test_unicorn_completes_a_system_call_as_linux_would(uc_target):
    t = uc_target
    t.map_region(CODE, PAGE, "rx")
    stop, regs = run(t, bytes.fromhex("0a14"))  # svc 20: getpid
    assert stop.kind is StopKind.TRAP and regs["pswa"] == CODE + 4 and regs["r2"] == 4242
    stop, regs = run(t, bytes.fromhex("0a00"), r1=999)
    assert regs["r2"] == (-38) & ((1 << 64) - 1)  # ENOSYS


def test_unicorn_execute_of_a_relative_branch_is_relative_to_the_execute(uc_target):
    """The QEMU 5 deviation the plugin declares (qemu 7.2 follows the architecture)."""
    t = uc_target
    t.map_region(CODE, 2 * PAGE, "rx")
    t.write_memory(CODE + PAGE, bytes.fromhex("a7f40010"))  # j +0x20, at CODE + PAGE
    stop, regs = run(t, bytes.fromhex("44004000"), r4=CODE + PAGE)
    assert stop.kind is StopKind.TRAP
    assert regs["pswa"] - 2 == CODE + 0x20  # the architecture says CODE + PAGE + 0x20


def test_qemu_execute_of_a_relative_branch_is_relative_to_the_target(qemu_target):
    t = qemu_target
    t.map_region(CODE, 2 * PAGE, "rx")
    t.write_memory(CODE + PAGE, bytes.fromhex("a7f40010") + b"\x00\x01" * 32)
    stop, regs = run(t, bytes.fromhex("44004000"), r4=CODE + PAGE)
    assert stop.kind is StopKind.TRAP
    assert regs["pswa"] - 2 == CODE + PAGE + 0x20


def test_stfle_into_unmapped_memory_completes_on_unicorn_only(plugins, s390, target):
    """The QEMU 5 deviation the plugin declares for stfle: unicorn stores the facility
    list nowhere and goes on; qemu-user, like Linux, raises SIGSEGV."""
    stop, regs = run(target, bytes.fromhex("b2b00100"), r0=0)  # stfle 0x100 (page 0)
    if isinstance(target, UnicornTarget):
        assert stop.kind is StopKind.TRAP and regs["pswa"] == CODE + 6
        assert "stfle" in target.arch.unicorn_spec().unfaithful(
            s390.analyze(s390.decode(bytes.fromhex("b2b00100"), CODE)))
    else:
        assert stop.kind is StopKind.SIGNAL and stop.signo == signal.SIGSEGV


def test_qemu_tells_an_operand_exception_from_an_opcode_it_lacks(qemu_target):
    """qemu's stub says SIGILL and no more; the harness's si_code tells them apart."""
    t = qemu_target
    t.map_region(CODE, PAGE, "rx")
    stop, _ = run(t, bytes.fromhex("b9970012"))  # dlr r1,r2: odd register pair
    assert (stop.signo, stop.unsupported) == (signal.SIGILL, False)
    stop, _ = run(t, bytes.fromhex("0000"))  # no such opcode: undecided
    assert (stop.signo, stop.unsupported) == (signal.SIGILL, None)
    stop, _ = run(t, bytes.fromhex("07f3"), r3=CODE + 0x101)  # br to an odd address
    assert (stop.signo, stop.unsupported) == (signal.SIGILL, False)
