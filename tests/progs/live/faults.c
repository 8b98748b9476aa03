/* Probed instructions that fault: the program's own handlers must see the same signal
   and the same faulting pc as without UBP. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>

static sigjmp_buf back;
static volatile void *fault_pc;
static volatile int fault_sig;

/* each starts with the instruction that faults */
extern int load(int *p);
extern long divide(long a, long b);
extern void undefined(void);
__asm__(".text\n.globl load\n.type load,@function\nload:\n  movl (%rdi), %eax\n  ret\n"
        ".globl divide\n.type divide,@function\ndivide:\n"
        "  movq %rdi, %rax\n  cqto\n  idivq %rsi\n  ret\n"
        ".globl undefined\n.type undefined,@function\nundefined:\n  ud2\n  ret\n");

static void on_fault(int sig, siginfo_t *si, void *ctx)
{
    (void)si;
    fault_sig = sig;
    fault_pc = (void *)((ucontext_t *)ctx)->uc_mcontext.gregs[REG_RIP];
    siglongjmp(back, 1);
}

int main(void)
{
    struct sigaction sa = {0};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, NULL);
    sigaction(SIGFPE, &sa, NULL);
    sigaction(SIGILL, &sa, NULL);
    for (int round = 0; round < 3; round++) {
        if (!sigsetjmp(back, 1)) load(NULL);
        printf("load: sig=%d at_entry=%d\n", fault_sig, fault_pc == (void *)load);
        if (!sigsetjmp(back, 1)) divide(1, 0);
        printf("divide: sig=%d at_idiv=%d\n", fault_sig,
               fault_pc == (void *)((char *)divide + 5));
        if (!sigsetjmp(back, 1)) undefined();
        printf("undefined: sig=%d at_entry=%d\n", fault_sig, fault_pc == (void *)undefined);
    }
    int x = 42;
    printf("load ok=%d\n", load(&x));
    return 0;
}
