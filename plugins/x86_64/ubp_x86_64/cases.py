"""Hand-picked x86-64 instructions for the conformance kit, and a random-encoding source.

Each case is here because it exercises one decision of the plugin: an emulation, a
fixup, a scratch-register rewrite, a refusal.
"""

from __future__ import annotations

import random

D32 = bytes.fromhex("40000000")  # +0x40 displacement / rel32

CASES: list[tuple[bytes, str]] = [
    # emulated stack operations
    (bytes.fromhex("55"), "push rbp"),
    (bytes.fromhex("4154"), "push r12 (REX.B)"),
    (bytes.fromhex("5d"), "pop rbp"),
    (bytes.fromhex("415f"), "pop r15"),
    (bytes.fromhex("5c"), "pop rsp: the loaded value wins"),
    (bytes.fromhex("54"), "push rsp: pushes the old value"),
    (bytes.fromhex("6a80"), "push imm8, sign-extended"),
    (bytes.fromhex("6878563412"), "push imm32"),
    (bytes.fromhex("6655"), "push bp (16-bit): not emulated"),
    # nops
    (bytes.fromhex("90"), "nop"),
    (bytes.fromhex("6690"), "xchg ax,ax nop"),
    (bytes.fromhex("4990"), "xchg r8,rax: not a nop"),
    (bytes.fromhex("f390"), "pause"),
    (bytes.fromhex("0f1f00"), "nop dword [rax]"),
    (bytes.fromhex("0f1f440000"), "nop 5 bytes"),
    (bytes.fromhex("660f1f840000000000"), "nop 9 bytes"),
    (bytes.fromhex("662e0f1f840000000000"), "cs nop 10 bytes"),
    (bytes.fromhex("f30f1efa"), "endbr64"),
    # relative branches
    (bytes.fromhex("eb10"), "jmp rel8"),
    (bytes.fromhex("ebfe"), "jmp to itself"),
    (bytes.fromhex("eb80"), "jmp rel8 backwards"),
    (b"\xe9" + D32, "jmp rel32"),
    (bytes.fromhex("e900000080"), "jmp rel32 -2GiB"),
    *[(bytes([0x70 + cc, 0x20]), f"jcc rel8 cc={cc}") for cc in range(16)],
    *[(bytes([0x0F, 0x80 + cc]) + D32, f"jcc rel32 cc={cc}") for cc in range(16)],
    (bytes.fromhex("2e7410"), "jz with not-taken hint"),
    (bytes.fromhex("3e7510"), "jnz with taken hint"),
    (bytes.fromhex("f2eb10"), "bnd jmp"),
    (bytes.fromhex("66eb10"), "jmp rel8 with operand-size prefix: not emulated"),
    (bytes.fromhex("e2f0"), "loop"),
    (bytes.fromhex("e1f0"), "loope"),
    (bytes.fromhex("e0f0"), "loopne"),
    (bytes.fromhex("e310"), "jrcxz"),
    (bytes.fromhex("67e310"), "jecxz"),
    (bytes.fromhex("e2fe"), "loop to itself"),
    # calls and returns
    (b"\xe8" + D32, "call rel32"),
    (bytes.fromhex("e8fbffffff"), "call to itself"),
    (bytes.fromhex("ffd0"), "call rax"),
    (bytes.fromhex("41ffd3"), "call r11"),
    (b"\xff\x15" + D32, "call [rip+x]"),
    (bytes.fromhex("ff5008"), "call [rax+8]"),
    (bytes.fromhex("ff14c4"), "call [rsp+rax*8]"),
    (bytes.fromhex("42ff14e5f0ffffff"), "call [r12*8-0x10] (REX.X)"),
    (bytes.fromhex("ffe0"), "jmp rax"),
    (bytes.fromhex("3effe0"), "notrack jmp rax"),
    (b"\xff\x25" + D32, "jmp [rip+x] (PLT)"),
    (b"\xf2\xff\x25" + D32, "bnd jmp [rip+x]"),
    (bytes.fromhex("41ff24c7"), "jmp [r15+rax*8]"),
    (bytes.fromhex("64ff2425f0ffffff"), "jmp fs:[-0x10]: not emulated"),
    (bytes.fromhex("c3"), "ret"),
    (bytes.fromhex("f2c3"), "bnd ret"),
    (bytes.fromhex("c21000"), "ret 0x10"),
    (bytes.fromhex("cb"), "lret"),
    (bytes.fromhex("48cb"), "lretq"),
    (bytes.fromhex("ff6808"), "ljmp [rax+8]"),
    (bytes.fromhex("ff5808"), "lcall [rax+8]"),
    # rip-relative operands
    (b"\x48\x8b\x05" + D32, "mov rax,[rip+x]"),
    (b"\x49\x8b\x05" + D32, "mov rax,[rip+x] with a meaningless REX.B"),
    (b"\x4c\x8b\x1d" + D32, "mov r11,[rip+x]"),
    (b"\x48\x8d\x3d" + D32, "lea rdi,[rip+x]"),
    (b"\x48\x8d\x35" + D32, "lea rsi,[rip+x]"),
    (b"\x48\x89\x35" + D32, "mov [rip+x],rsi"),
    (b"\x80\x3d" + D32 + b"\x00", "cmp byte [rip+x],0 (immediate after disp)"),
    (b"\x66\x81\x3d" + D32 + b"\x34\x12", "cmp word [rip+x],imm16"),
    (b"\x48\xc7\x05" + D32 + b"\x78\x56\x34\x12", "mov qword [rip+x],imm32"),
    (b"\x0f\x28\x05" + D32, "movaps xmm0,[rip+x]"),
    (b"\x66\x0f\x6f\x0d" + D32, "movdqa xmm1,[rip+x]"),
    (b"\xf3\x0f\x7e\x05" + D32, "movq xmm0,[rip+x]"),
    (b"\xc5\xfd\x6f\x05" + D32, "vmovdqa ymm0,[rip+x] (VEX2)"),
    (b"\xc4\x62\x7d\x58\x05" + D32, "vpbroadcastd ymm8,[rip+x] (VEX3)"),
    (b"\xc4\x41\x7d\x6f\x05" + D32, "vmovdqa ymm8,[rip+x] (VEX3 with ~B clear)"),
    (b"\xc5\xf5\xfe\x05" + D32, "vpaddd ymm0,ymm1,[rip+x] (vvvv source)"),
    (b"\x62\xe1\xfe\x48\x6f\x05" + D32, "vmovdqu64 zmm16,[rip+x] (EVEX)"),
    (b"\x62\xd1\xfe\x48\x6f\x05" + D32, "vmovdqu64 zmm0,[rip+x] (EVEX ~B clear)"),
    (b"\x62\xf1\x75\x48\xfe\x05" + D32, "vpaddd zmm0,zmm1,[rip+x] (EVEX)"),
    (b"\xf0\x48\x0f\xb1\x15" + D32, "lock cmpxchg [rip+x],rdx (implicit rax)"),
    (b"\x48\x0f\xc7\x0d" + D32, "cmpxchg16b [rip+x] (implicit rax rbx rcx rdx)"),
    (b"\x48\xf7\x25" + D32, "mul qword [rip+x] (implicit rax rdx)"),
    (b"\x48\xf7\x35" + D32, "div qword [rip+x]"),
    (b"\xff\x35" + D32, "push [rip+x]"),
    (b"\x8f\x05" + D32, "pop [rip+x]"),
    (b"\x48\x87\x35" + D32, "xchg [rip+x],rsi"),
    (b"\x48\x0f\xa3\x05" + D32, "bt [rip+x],rax"),
    (b"\xdd\x05" + D32, "fld qword [rip+x]"),
    (b"\x0f\xae\x15" + D32, "ldmxcsr [rip+x]"),
    (b"\x0f\x18\x0d" + D32, "prefetcht0 [rip+x]"),
    (b"\x67\x8b\x05" + D32, "mov eax,[eip+x] (address-size prefix)"),
    (b"\x64\x48\x8b\x05" + D32, "mov rax,fs:[rip+x]"),
    (bytes.fromhex("488b0500000080"), "mov rax,[rip-2GiB]"),
    # system calls, flags, strings, x87, faults
    (bytes.fromhex("0f05"), "syscall"),
    (bytes.fromhex("9c"), "pushf: the step's trap flag must not leak"),
    (bytes.fromhex("9d"), "popf"),
    (bytes.fromhex("f3a4"), "rep movsb"),
    (bytes.fromhex("f348ab"), "rep stosq"),
    (bytes.fromhex("f2ae"), "repne scasb"),
    (bytes.fromhex("f3a6"), "repe cmpsb"),
    (bytes.fromhex("a4"), "movsb"),
    (bytes.fromhex("fd"), "std"),
    (bytes.fromhex("d9e8"), "fld1"),
    (bytes.fromhex("ddd8"), "fstp st0"),
    (bytes.fromhex("dec1"), "faddp"),
    (bytes.fromhex("9b"), "fwait"),
    (bytes.fromhex("d9d0"), "fnop"),
    (bytes.fromhex("dbe1"), "fdisi (an 8087 leftover, a nop that leaves FIP alone)"),
    (bytes.fromhex("dbe2"), "fnclex"),
    (bytes.fromhex("d97c24f0"), "fnstcw [rsp-0x10]"),
    (bytes.fromhex("c8100003"), "enter 0x10,3 (nesting)"),
    (bytes.fromhex("0f014424f0"), "sgdt [rsp-0x10] (UMIP: boost only)"),
    (bytes.fromhex("0f0b"), "ud2"),
    (bytes.fromhex("f4"), "hlt (faults in user mode)"),
    (bytes.fromhex("fa"), "cli (faults in user mode)"),
    (bytes.fromhex("ec"), "in al,dx (faults without ioperm)"),
    (bytes.fromhex("48f7f1"), "div rcx (faults on zero)"),
    (bytes.fromhex("488b00"), "mov rax,[rax]"),
    (bytes.fromhex("f00108"), "lock add [rax],ecx"),
    (bytes.fromhex("64488b042528000000"), "mov rax,fs:0x28 (stack guard)"),
    (bytes.fromhex("c8100000"), "enter 0x10,0"),
    (bytes.fromhex("c9"), "leave"),
    (bytes.fromhex("48b8efcdab8967452301"), "movabs rax,imm64"),
    (bytes.fromhex("48a1f0ffffffff7f0000"), "movabs rax,[moffs64]"),
    (bytes.fromhex("0f31"), "rdtsc (volatile)"),
    (bytes.fromhex("0f01f9"), "rdtscp (volatile)"),
    (bytes.fromhex("0fa2"), "cpuid"),
    (bytes.fromhex("480fc7f0"), "rdrand rax (volatile)"),
    (bytes.fromhex("0f01d6"), "xtest"),
    (bytes.fromhex("0f01d0"), "xgetbv"),
    (bytes.fromhex("c5f8ae5c24f0"), "vstmxcsr [rsp-0x10]"),
    (bytes.fromhex("c5f5fec2"), "vpaddd ymm0,ymm1,ymm2 (AVX2)"),
    (bytes.fromhex("62f17548fec2"), "vpaddd zmm0,zmm1,zmm2 (AVX-512)"),
    (bytes.fromhex("c5f877"), "vzeroupper"),
    (bytes.fromhex("0f38c8c1"), "sha1nexte xmm0,xmm1"),
    # refused
    (bytes.fromhex("cc"), "int3: refused"),
    (bytes.fromhex("cd80"), "int 0x80: refused"),
    (bytes.fromhex("f1"), "int1: refused"),
    (bytes.fromhex("48cf"), "iretq: refused"),
    (bytes.fromhex("8ed0"), "mov ss,ax: refused"),
    (bytes.fromhex("c7f810000000"), "xbegin: refused"),
    (bytes.fromhex("0f34"), "sysenter: refused"),
]


def random_encoding(rng: random.Random) -> bytes:
    """Random bytes shaped like an instruction: prefixes, REX/VEX/EVEX, opcode, ModRM."""
    out = bytearray()
    if rng.random() < 0.2:
        out.append(rng.choice((0x66, 0xF2, 0xF3, 0xF0, 0x64, 0x65, 0x2E, 0x3E, 0x67)))
    k = rng.random()
    if k < 0.08:
        out += bytes((0xC5, rng.randrange(256)))
    elif k < 0.16:
        out += bytes((0xC4, (rng.randrange(8) << 5) | rng.randrange(1, 4), rng.randrange(256)))
    elif k < 0.22:
        out += bytes((0x62, (rng.randrange(16) << 4) | rng.randrange(1, 4),
                      (rng.randrange(128) << 1) | 0x04 | rng.randrange(2) << 7,
                      rng.randrange(256)))
    else:
        if rng.random() < 0.4:
            out.append(0x40 | rng.randrange(16))
        if rng.random() < 0.35:
            out.append(0x0F)
            if rng.random() < 0.2:
                out.append(rng.choice((0x38, 0x3A)))
    out.append(rng.randrange(256))
    if rng.random() < 0.3:
        out.append(0x05 | (rng.randrange(8) << 3))  # rip-relative ModRM
    out += rng.randbytes(16)
    return bytes(out[:15])
