/* Trap-free probes with a handler (ubp_core.rendezvous) on a live program.

   site_add(a, b) = a + b, starting with push %rbp (relocatable).  A handler that
   changes rsi changes what the program computes: the program prints what it got.
   regs: calls site_add from assembly with every other register holding a pattern and
         the flags set, then checks them all; prints the number of clobbered ones.
   site_short: 4 bytes, too short for the jump (refused, so a trap probe instead).
   threads N M: N threads call site_add(i, 1) M times each; prints the sum and exits 0
         only when it is right.
   signals M: a 200 us interval timer whose SIGALRM handler calls site_add too, while
         the main thread calls it M times: a handler may interrupt a rendezvous and hit
         the probe again.  Prints the calls made by each.
   fork M: calls site_add M times in the parent and in a forked child.  */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

long site_add(long a, long b);
long regs_check(long rounds);
long site_short(long x);
__asm__(".text\n"
        ".globl site_add\n.type site_add,@function\nsite_add:\n"
        "  push %rbp\n  mov %rsp, %rbp\n  lea (%rdi,%rsi), %rax\n  pop %rbp\n  ret\n"
        ".size site_add, .-site_add\n"
        /* too short for a jump: a trap-free probe falls back to a trap probe */
        ".globl site_short\n.type site_short,@function\nsite_short:\n"
        "  mov %rdi, %rax\n  ret\n"
        ".size site_short, .-site_short\n"
        /* regs_check(rounds): returns how many register checks failed */
        ".globl regs_check\n.type regs_check,@function\nregs_check:\n"
        "  push %rbx\n  push %rbp\n  push %r12\n  push %r13\n  push %r14\n  push %r15\n"
        "  mov %rdi, %r15\n  xor %r14d, %r14d\n"   /* r15: rounds left (saved below) */
        "1:\n"
        "  push %r15\n  push %r14\n"
        "  movabs $0x1111111111111111, %rbx\n  movabs $0x2222222222222222, %rbp\n"
        "  movabs $0x3333333333333333, %r8\n  movabs $0x4444444444444444, %r9\n"
        "  movabs $0x5555555555555555, %r10\n  movabs $0x6666666666666666, %r11\n"
        "  movabs $0x7777777777777777, %r12\n  movabs $0x0123456789abcdef, %r13\n"
        "  movabs $0x7edcba9876543210, %r14\n  movabs $0x0f0f0f0f0f0f0f0f, %r15\n"
        "  movabs $0x00000000000000aa, %rcx\n  movabs $0x00000000000000bb, %rdx\n"
        "  mov $40, %edi\n  mov $2, %esi\n"
        "  stc\n"                                   /* CF set across the call */
        "  call site_add\n"
        "  setc %cl\n"
        "  xor %esi, %esi\n"
        "  movabs $0x1111111111111111, %rdi\n  cmp %rdi, %rbx\n  setne %sil\n  add %rsi, %r13\n"
        "  movabs $0x2222222222222222, %rdi\n  cmp %rdi, %rbp\n  setne %sil\n  add %rsi, %r13\n"
        "  movabs $0x3333333333333333, %rdi\n  cmp %rdi, %r8\n  setne %sil\n  add %rsi, %r13\n"
        "  movabs $0x4444444444444444, %rdi\n  cmp %rdi, %r9\n  setne %sil\n  add %rsi, %r13\n"
        "  movabs $0x5555555555555555, %rdi\n  cmp %rdi, %r10\n  setne %sil\n  add %rsi, %r13\n"
        "  movabs $0x6666666666666666, %rdi\n  cmp %rdi, %r11\n  setne %sil\n  add %rsi, %r13\n"
        "  movabs $0x7777777777777777, %rdi\n  cmp %rdi, %r12\n  setne %sil\n  add %rsi, %r13\n"
        "  movabs $0x7edcba9876543210, %rdi\n  cmp %rdi, %r14\n  setne %sil\n  add %rsi, %r13\n"
        "  movabs $0x0f0f0f0f0f0f0f0f, %rdi\n  cmp %rdi, %r15\n  setne %sil\n  add %rsi, %r13\n"
        "  cmp $0xbb, %rdx\n  setne %sil\n  add %rsi, %r13\n"
        "  cmp $1, %cl\n  setne %sil\n  add %rsi, %r13\n"    /* the carry survived */
        "  cmp $42, %rax\n  setne %sil\n  add %rsi, %r13\n"  /* and the result */
        "  movabs $0x0123456789abcdef, %rdi\n  sub %rdi, %r13\n" /* r13: failures */
        "  pop %r14\n  pop %r15\n"
        "  add %r13, %r14\n"
        "  dec %r15\n  jnz 1b\n"
        "  mov %r14, %rax\n"
        "  pop %r15\n  pop %r14\n  pop %r13\n  pop %r12\n  pop %rbp\n  pop %rbx\n  ret\n"
        ".size regs_check, .-regs_check\n");

static long per_thread;
static volatile long in_handler;

static void *worker(void *arg)
{
    long sum = 0;
    for (long i = 0; i < per_thread; i++)
        sum += site_add((long)arg, 1);
    return (void *)sum;
}

static void on_alarm(int sig)
{
    (void)sig;
    if (site_add(1, 2) == 3)
        in_handler++;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "threads";
    if (strcmp(mode, "add") == 0) {
        printf("add=%ld short=%ld\n", site_add(40, 2), site_short(7));
        return 0;
    }
    if (strcmp(mode, "regs") == 0) {
        long rounds = argc > 2 ? atol(argv[2]) : 1000;
        printf("rounds=%ld clobbered=%ld\n", rounds, regs_check(rounds));
        return 0;
    }
    if (strcmp(mode, "threads") == 0) {
        int n = argc > 2 ? atoi(argv[2]) : 4;
        per_thread = argc > 3 ? atol(argv[3]) : 10000;
        pthread_t t[64];
        long total = 0;
        for (long i = 0; i < n; i++)
            pthread_create(&t[i], NULL, worker, (void *)i);
        for (int i = 0; i < n; i++) {
            void *r;
            pthread_join(t[i], &r);
            total += (long)r;
        }
        printf("calls=%ld sum=%ld\n", n * per_thread, total);
        return total == per_thread * ((long)n * (n + 1) / 2) ? 0 : 3;
    }
    if (strcmp(mode, "signals") == 0) {
        long m = argc > 2 ? atol(argv[2]) : 20000, bad = 0;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_alarm;
        sa.sa_flags = SA_RESTART;
        sigaction(SIGALRM, &sa, NULL);
        struct itimerval it = {{0, 200}, {0, 200}};
        setitimer(ITIMER_REAL, &it, NULL);
        for (long i = 0; i < m; i++)
            if (site_add(i, 1) != i + 1)
                bad++;
        struct itimerval off = {{0, 0}, {0, 0}};
        setitimer(ITIMER_REAL, &off, NULL);
        printf("main=%ld handler=%ld bad=%ld\n", m, in_handler, bad);
        return 0;
    }
    if (strcmp(mode, "fork") == 0) {
        long m = argc > 2 ? atol(argv[2]) : 1000, sum = 0;
        pid_t child = fork();
        for (long i = 0; i < m; i++)
            sum += site_add(i, 1);
        if (child == 0)
            return sum == m * (m + 1) / 2 ? 0 : 1;
        int status;
        waitpid(child, &status, 0);
        printf("sum=%ld child=%d\n", sum, WEXITSTATUS(status));
        return 0;
    }
    return 2;
}
