/* Trap-free counting probes: sites that qualify and sites that must not.

   site_push: push %rbp; mov %rsp,%rbp -- relocatable, qualifies.
   site_loop: a loop whose head is 2 bytes into the function: a jump there would land
              in the middle of the 5-byte jmp.
   site_table: an indirect jump (a jump table may land anywhere in the function).
   site_tiny: 3 bytes long, too short for a 5-byte jmp.
   The program counts its own calls and prints them. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

long site_push(long x);
long site_loop(long n);
long site_table(long x);
long site_tiny(void);
__asm__(".text\n"
        ".globl site_push\n.type site_push,@function\nsite_push:\n"
        "  push %rbp\n  mov %rsp, %rbp\n  lea 1(%rdi), %rax\n  pop %rbp\n  ret\n"
        ".size site_push, .-site_push\n"
        ".globl site_loop\n.type site_loop,@function\nsite_loop:\n"
        "  xor %eax, %eax\n1: inc %rax\n  cmp %rdi, %rax\n  jl 1b\n  ret\n"
        ".size site_loop, .-site_loop\n"
        ".globl site_table\n.type site_table,@function\nsite_table:\n"
        "  push %rbx\n  lea 2f(%rip), %rax\n  jmp *%rax\n2: pop %rbx\n  lea 1(%rdi), %rax\n  ret\n"
        ".size site_table, .-site_table\n"
        ".globl site_tiny\n.type site_tiny,@function\nsite_tiny:\n"
        "  xor %eax, %eax\n  ret\n"
        ".size site_tiny, .-site_tiny\n");

static long per_thread;

static void *worker(void *arg)
{
    long x = 0;
    for (long i = 0; i < per_thread; i++)
        x = site_push(x);
    return (void *)x;
}

int main(int argc, char **argv)
{
    int nthreads = argc > 1 ? atoi(argv[1]) : 4;
    per_thread = argc > 2 ? atol(argv[2]) : 100000;
    int forks = argc > 3 ? atoi(argv[3]) : 0;
    long calls = 0, x = 0;
    for (int i = 0; i < 10; i++) {
        x += site_loop(3) + site_table(i) + site_tiny();
        calls++;
    }
    pthread_t t[64];
    for (long i = 0; i < nthreads; i++)
        pthread_create(&t[i], NULL, worker, NULL);
    for (int i = 0; i < nthreads; i++) {
        void *r;
        pthread_join(t[i], &r);
        calls += (long)r;
    }
    for (int i = 0; i < forks; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            long y = 0;
            for (long j = 0; j < per_thread; j++)
                y = site_push(y);
            printf("child site_push calls=%ld\n", y);
            fflush(stdout);
            _exit(0);
        }
        waitpid(pid, NULL, 0);
    }
    printf("site_push calls=%ld other=%ld\n", calls - 10, x);
    return 0;
}
