/* Probed instructions that fault, and faults reached through a probe.  Built without
   PIE, so every code and data address is the same in every run: the program's own
   handler prints what it sees (signal, si_code, si_addr, the pc, the stack pointer
   relative to the case's frame, every general register, the arithmetic flags, the
   kernel's trap number and error code), and a run under UBP must print exactly what an
   unprobed run prints.

   Each case sets every register to a known value, then runs the instruction at its
   global label fault_NAME (the test probes that label, with each strategy the plugin
   allows there).

   usage: faulty ROUNDS */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

#define RWPAGE 0x70000000UL /* one read-write page; the next one is never mapped */

long saved_rsp;
const long ro_word = 42;
int zero32;
long aligned_data[8] __attribute__((aligned(16)));
char src_bytes[64] = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde";

__asm__(
    ".macro SETREGS\n"
    "  movabs $0x0101010101010101, %rax\n  movabs $0x0202020202020202, %rbx\n"
    "  movabs $0x0303030303030303, %rcx\n  movabs $0x0404040404040404, %rdx\n"
    "  movabs $0x0505050505050505, %rsi\n  movabs $0x0606060606060606, %rdi\n"
    "  movabs $0x0707070707070707, %rbp\n  movabs $0x0808080808080808, %r8\n"
    "  movabs $0x0909090909090909, %r9\n   movabs $0x0a0a0a0a0a0a0a0a, %r10\n"
    "  movabs $0x0b0b0b0b0b0b0b0b, %r11\n  movabs $0x0c0c0c0c0c0c0c0c, %r12\n"
    "  movabs $0x0d0d0d0d0d0d0d0d, %r13\n  movabs $0x0e0e0e0e0e0e0e0e, %r14\n"
    "  movabs $0x0f0f0f0f0f0f0f0f, %r15\n"
    "  mov %rsp, saved_rsp(%rip)\n"
    ".endm\n"
    /* CASE name: the code before the label sets the operands; FAULT: the label */
    ".macro CASE name\n.text\n.globl case_\\name\n.type case_\\name,@function\ncase_\\name:\n"
    "  SETREGS\n.endm\n"
    ".macro FAULT name\n.globl fault_\\name\nfault_\\name:\n.endm\n"
    ".macro END name\n  hlt\n.size case_\\name, .-case_\\name\n.endm\n"

    "CASE load_unmapped\n  movabs $0xdead0000, %rax\nFAULT load_unmapped\n"
    "  mov (%rax), %rbx\nEND load_unmapped\n"
    "CASE store_readonly\n  lea ro_word(%rip), %rax\nFAULT store_readonly\n"
    "  mov %rcx, (%rax)\nEND store_readonly\n"
    "CASE riprel_unmapped\nFAULT riprel_unmapped\n"
    "  mov 0x30000000(%rip), %rax\nEND riprel_unmapped\n"
    "CASE riprel_store_readonly\nFAULT riprel_store_readonly\n"
    "  movq $7, ro_word(%rip)\nEND riprel_store_readonly\n"
    "CASE lock_unmapped\n  movabs $0xdead5000, %rax\nFAULT lock_unmapped\n"
    "  lock incq (%rax)\nEND lock_unmapped\n"
    "CASE idiv_zero\n  xor %ecx, %ecx\nFAULT idiv_zero\n  idivq %rcx\nEND idiv_zero\n"
    "CASE div_riprel_zero\nFAULT div_riprel_zero\n  divl zero32(%rip)\nEND div_riprel_zero\n"
    "CASE push_bad_stack\n  movabs $0xdead1008, %rsp\nFAULT push_bad_stack\n"
    "  push %rax\nEND push_bad_stack\n"
    "CASE pop_bad_stack\n  movabs $0xdead6000, %rsp\nFAULT pop_bad_stack\n"
    "  pop %rax\nEND pop_bad_stack\n"
    "CASE call_bad_stack\n  movabs $0xdead7008, %rsp\nFAULT call_bad_stack\n"
    "  call case_load_unmapped\nEND call_bad_stack\n"
    "CASE push_mem_unmapped\n  movabs $0xdead8000, %rax\nFAULT push_mem_unmapped\n"
    "  pushq (%rax)\nEND push_mem_unmapped\n"
    "CASE ret_unmapped\n  movabs $0xdead2000, %rax\n  push %rax\nFAULT ret_unmapped\n"
    "  ret\nEND ret_unmapped\n"
    "CASE call_reg_unmapped\n  movabs $0xdead3000, %rax\nFAULT call_reg_unmapped\n"
    "  call *%rax\nEND call_reg_unmapped\n"
    "CASE jmp_mem_unmapped\n  movabs $0xdead4000, %rax\nFAULT jmp_mem_unmapped\n"
    "  jmp *(%rax)\nEND jmp_mem_unmapped\n"
    "CASE rep_movsb_partial\n  lea src_bytes(%rip), %rsi\n  movabs $0x70000ff0, %rdi\n"
    "  mov $48, %ecx\nFAULT rep_movsb_partial\n  rep movsb\nEND rep_movsb_partial\n"
    "CASE movaps_misaligned\n  lea aligned_data+8(%rip), %rax\nFAULT movaps_misaligned\n"
    "  movaps (%rax), %xmm0\nEND movaps_misaligned\n"
    "CASE ud2_probed\nFAULT ud2_probed\n  ud2\nEND ud2_probed\n"
    "CASE jmp_to_ud2\nFAULT jmp_to_ud2\n  jmp 1f\n  nop\n1:\n  ud2\nEND jmp_to_ud2\n"
    "CASE lea_then_ud2\nFAULT lea_then_ud2\n  lea 8(%rax,%rbx,2), %rdx\n  ud2\nEND lea_then_ud2\n"
    "CASE call_to_ud2\nFAULT call_to_ud2\n  call fault_ud2_probed\nEND call_to_ud2\n"
    "CASE nop_then_int3\nFAULT nop_then_int3\n  nopl 0(%rax)\n  int3\nEND nop_then_int3\n"
    "CASE jcc_to_ud2\n  cmp %rax, %rax\nFAULT jcc_to_ud2\n  je 1f\n  nop\n1:\n  ud2\nEND jcc_to_ud2\n"
);

#define CASES(X) X(load_unmapped) X(store_readonly) X(riprel_unmapped) \
    X(riprel_store_readonly) X(lock_unmapped) X(idiv_zero) X(div_riprel_zero) \
    X(push_bad_stack) X(pop_bad_stack) X(call_bad_stack) X(push_mem_unmapped) \
    X(ret_unmapped) X(call_reg_unmapped) X(jmp_mem_unmapped) X(rep_movsb_partial) \
    X(movaps_misaligned) X(ud2_probed) X(jmp_to_ud2) X(lea_then_ud2) X(call_to_ud2) \
    X(nop_then_int3) X(jcc_to_ud2)
#define DECL(n) extern void case_##n(void);
CASES(DECL)
#define ENTRY(n) {#n, case_##n},
static const struct { const char *name; void (*fn)(void); } cases[] = {CASES(ENTRY)};

static sigjmp_buf back;
static char report[1024];

static void on_fault(int sig, siginfo_t *si, void *ctx)
{
    greg_t *g = ((ucontext_t *)ctx)->uc_mcontext.gregs;
    long sp = g[REG_RSP] - saved_rsp;
    char spbuf[40];
    if (sp > -4096 && sp < 4096)
        snprintf(spbuf, sizeof spbuf, "frame%+ld", sp);
    else
        snprintf(spbuf, sizeof spbuf, "%#llx", (unsigned long long)g[REG_RSP]);
    snprintf(report, sizeof report,
             "sig=%d code=%d addr=%p pc=%#llx sp=%s trapno=%lld err=%#llx flags=%#llx "
             "rax=%llx rbx=%llx rcx=%llx rdx=%llx rsi=%llx rdi=%llx rbp=%llx r8=%llx "
             "r9=%llx r10=%llx r11=%llx r12=%llx r13=%llx r14=%llx r15=%llx",
             sig, si->si_code, si->si_addr, (unsigned long long)g[REG_RIP], spbuf,
             (long long)g[REG_TRAPNO], (unsigned long long)g[REG_ERR],
             (unsigned long long)(g[REG_EFL] & 0xcd5),
             (unsigned long long)g[REG_RAX], (unsigned long long)g[REG_RBX],
             (unsigned long long)g[REG_RCX], (unsigned long long)g[REG_RDX],
             (unsigned long long)g[REG_RSI], (unsigned long long)g[REG_RDI],
             (unsigned long long)g[REG_RBP], (unsigned long long)g[REG_R8],
             (unsigned long long)g[REG_R9], (unsigned long long)g[REG_R10],
             (unsigned long long)g[REG_R11], (unsigned long long)g[REG_R12],
             (unsigned long long)g[REG_R13], (unsigned long long)g[REG_R14],
             (unsigned long long)g[REG_R15]);
    siglongjmp(back, 1);
}

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 1;
    static char altstack[65536];
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack};
    sigaltstack(&ss, NULL);
    struct sigaction sa = {0};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    int sigs[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP};
    for (unsigned i = 0; i < sizeof sigs / sizeof *sigs; i++)
        sigaction(sigs[i], &sa, NULL);
    if (mmap((void *)RWPAGE, 4096, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) != (void *)RWPAGE)
        return 3;
    int faults = 0;
    for (int r = 0; r < rounds; r++)
        for (unsigned i = 0; i < sizeof cases / sizeof *cases; i++) {
            strcpy(report, "no fault");
            memset((void *)RWPAGE, 0, 4096);
            if (!sigsetjmp(back, 1))
                cases[i].fn();
            else
                faults++;
            printf("%s: %s copied=%.16s\n", cases[i].name, report,
                   (char *)RWPAGE + 0xff0);
        }
    printf("faults=%d\n", faults);
    return 0;
}
