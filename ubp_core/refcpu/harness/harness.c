/* The reference-CPU harness run under qemu-user (or any GDB stub) by ubp_core.refcpu.
 *
 * Plain C for any Linux arch with a cross compiler: the tracer finds everything it
 * needs through this program's symbols, so nothing here names an instruction.
 *
 * - main installs a fault handler and stops itself with SIGTRAP; from then on the
 *   tracer owns the CPU and only borrows two things from this program: a system-call
 *   instruction (inside libc's syscall()) for injecting mmap/mprotect, and the handler.
 * - A GDB stub reports a SIGSEGV/SIGBUS but not the faulting address, and a SIGILL but
 *   not why (an opcode the CPU lacks, or an operand the instruction rejects).  The tracer
 *   saves the registers, delivers the signal, and the handler writes what siginfo says
 *   into ubp_mailbox and stops with SIGTRAP; the tracer reads it and puts the registers
 *   back.  The handler runs on its own stack (the faulting stack pointer is whatever the
 *   test chose) and with SA_NODEFER (it never returns, so the signal must stay open).
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

struct ubp_mailbox {
    volatile uint64_t magic;
    volatile uint64_t signo;
    volatile uint64_t code;
    volatile uint64_t addr;
    volatile uint64_t count;
};

struct ubp_mailbox ubp_mailbox __attribute__((used));
/* arguments a system call takes in memory (s390's old_mmap) */
uint64_t ubp_scratch[8] __attribute__((used));
static unsigned char ubp_altstack[1 << 16] __attribute__((aligned(64)));

static void ubp_report(void)
{
    syscall(SYS_tgkill, (long)getpid(), (long)syscall(SYS_gettid), (long)SIGTRAP);
}

static void ubp_on_fault(int signo, siginfo_t *info, void *uctx)
{
    (void)uctx;
    ubp_mailbox.signo = (uint64_t)signo;
    ubp_mailbox.code = (uint64_t)(int64_t)info->si_code;
    ubp_mailbox.addr = (uint64_t)(uintptr_t)info->si_addr;
    ubp_mailbox.count = ubp_mailbox.count + 1;
    for (;;)
        ubp_report();   /* the tracer never resumes past the first report */
}

int main(void)
{
    stack_t ss = { .ss_sp = ubp_altstack, .ss_size = sizeof ubp_altstack, .ss_flags = 0 };
    struct sigaction sa = { 0 };
    sigaltstack(&ss, 0);
    sa.sa_sigaction = ubp_on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, 0);
    sigaction(SIGBUS, &sa, 0);
    sigaction(SIGILL, &sa, 0);   /* its si_code tells an unknown opcode from a bad operand */
    ubp_mailbox.magic = 0x5542504d41494cULL;  /* "UBPMAIL": setup done */
    for (;;)
        ubp_report();
    return 0;
}
