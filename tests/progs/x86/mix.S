# A flat x86-64 program exercising every kind of instruction the strategies treat
# differently: stack ops, relative/indirect branches and calls, returns, rip-relative
# loads and stores, a system call, string ops, flags images, x87 and SSE.
# Assembled position-independently and run on a reference CPU; it ends on int3.
        .intel_syntax noprefix
        .text
        .globl _start
_start:
        mov     ecx, 40
        xor     eax, eax
        lea     r12, [rip + table]
loop:
        push    rcx
        mov     rdi, rcx
        call    f
        mov     rdi, rax
        call    [rip + gptr]
        lea     r11, [rip + h]
        call    r11
        pop     rcx
        dec     ecx
        jnz     loop
        mov     rax, 24             # sched_yield: same result in every run
        syscall
        mov     rcx, 16
        lea     rsi, [rip + table]
        lea     rdi, [rip + copy]
        cld
        rep movsb
        pushfq
        pop     rdx
        and     edx, 0x8d5
        fld1
        fldpi
        faddp   st(1), st
        fstp    qword ptr [rip + fres]
        movsd   xmm0, [rip + fres]
        addsd   xmm0, xmm0
        movsd   [rip + fres2], xmm0
        cmp     byte ptr [rip + table], 0
        jrcxz   .Lend
.Lend:
        mov     r8, [rip + acc]
        int3
f:
        push    rbp
        mov     rbp, rsp
        push    rbx
        mov     rbx, rdi
        and     rbx, 7
        mov     rdx, [r12 + rbx*8]
        add     [rip + acc], rdx
        test    dl, 1
        je      1f
        add     rax, rdx
        jmp     2f
1:      sub     rax, rdx
2:      cmp     rbx, 3
        jbe     3f
        imul    rax, rax, 3
3:      pop     rbx
        pop     rbp
        ret
g:
        endbr64
        lea     rax, [rdi + 1]
        ret
h:
        nop
        nop     dword ptr [rax + rax]
        xor     rax, 0x55
        ret     0

        .data
        .p2align 3
gptr:   .quad   g
table:  .quad   5, 8, 13, 21, 34, 55, 89, 144
acc:    .quad   0
fres:   .quad   0
fres2:  .quad   0
copy:   .zero   32
        .zero   64
