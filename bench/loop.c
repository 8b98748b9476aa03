/* The benchmark's target: calls one probe site N times and reports how long that took.

   site_push starts with push %rbp (Linux uprobes emulates it), site_lea with a lea
   (Linux must single-step it), site_jmp with a short jmp (emulated by both Linux and
   UBP, touching no memory).  They are written in assembly so the compiler cannot
   change their first instruction. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

long site_push(long x);
long site_lea(long x);
long site_jmp(long x);
__asm__(".text\n"
        ".globl site_push\n.type site_push,@function\nsite_push:\n"
        "  push %rbp\n  mov %rsp, %rbp\n  lea 1(%rdi), %rax\n  pop %rbp\n  ret\n"
        ".size site_push, .-site_push\n"
        ".globl site_lea\n.type site_lea,@function\nsite_lea:\n"
        "  lea 1(%rdi), %rax\n  nop\n  ret\n"
        ".size site_lea, .-site_lea\n"
        ".globl site_jmp\n.type site_jmp,@function\nsite_jmp:\n"
        "  jmp 1f\n1:\n  lea 1(%rdi), %rax\n  ret\n"
        ".size site_jmp, .-site_jmp\n");

int main(int argc, char **argv)
{
    const char *which = argc > 1 ? argv[1] : "push";
    long n = argc > 2 ? atol(argv[2]) : 100000;
    long (*fn)(long) = strcmp(which, "lea") == 0 ? site_lea
                       : strcmp(which, "jmp") == 0 ? site_jmp : site_push;
    struct timespec a, b;
    long x = 0;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        x = fn(x);
    clock_gettime(CLOCK_MONOTONIC, &b);
    long ns = (b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec);
    printf("calls=%ld ns=%ld check=%ld\n", n, ns, x);
    return x == n ? 0 : 1;
}
