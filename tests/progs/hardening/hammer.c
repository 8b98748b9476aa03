/* Load: THREADS threads each call three small functions CALLS times; the program counts
   every call itself (lock-prefixed counters in the functions, a checksum in C), so a
   tracer's hit counts and the program's own output can both be checked exactly.

   The functions are written in assembly so every instruction has a known kind: the
   tests probe each instruction with each strategy its analysis allows (push/pop, call,
   jcc and ret: emulate; mov, lea, lock add with a rip-relative operand: boost, SSOL).
   Every instruction of every function runs exactly once per call (arguments are never
   0, so the jz is never taken).

   usage: hammer THREADS CALLS */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

long calls_entry, calls_leaf;  /* written only by the lock-prefixed instructions */

extern long h_entry(long i);
extern long h_branch(long i);
extern long h_leaf(long i);
__asm__(".text\n"
        ".globl h_entry\n.type h_entry,@function\nh_entry:\n"
        "  push %rbp\n"
        "  mov %rsp, %rbp\n"
        "  lock incq calls_entry(%rip)\n"
        "  lea 3(%rdi,%rdi,2), %rax\n"
        "  xor %rdi, %rax\n"
        "  pop %rbp\n"
        "  ret\n"
        ".size h_entry, .-h_entry\n"
        ".globl h_branch\n.type h_branch,@function\nh_branch:\n"
        "  test %rdi, %rdi\n"
        "  jz 1f\n"
        "  push %rbx\n"
        "  mov %rdi, %rbx\n"
        "  call h_leaf\n"
        "  add %rbx, %rax\n"
        "  pop %rbx\n"
        "1:\n"
        "  ret\n"
        ".size h_branch, .-h_branch\n"
        ".globl h_leaf\n.type h_leaf,@function\nh_leaf:\n"
        "  lock incq calls_leaf(%rip)\n"
        "  mov %rdi, %rax\n"
        "  shl $1, %rax\n"
        "  ret\n"
        ".size h_leaf, .-h_leaf\n");

static long per_thread;

static void *run(void *arg)
{
    long base = (long)arg * 1000003L, sum = 0;
    for (long i = 1; i <= per_thread; i++) {
        sum += h_entry(base + i);
        sum += h_branch(base + i);
    }
    return (void *)sum;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 64;
    per_thread = argc > 2 ? atol(argv[2]) : 1000;
    pthread_t t[1024];
    if (n < 1 || n > 1024)
        return 2;
    for (long i = 0; i < n; i++)
        if (pthread_create(&t[i], NULL, run, (void *)i))
            return 3;
    unsigned long total = 0;
    for (int i = 0; i < n; i++) {
        void *r;
        pthread_join(t[i], &r);
        total += (unsigned long)r;
    }
    long want = n * per_thread;
    printf("threads=%d calls=%ld entry=%ld leaf=%ld sum=%lu ok=%d\n", n, per_thread,
           calls_entry, calls_leaf, total, calls_entry == want && calls_leaf == want);
    return calls_entry == want && calls_leaf == want ? 0 : 1;
}
