/* Job control while probed code runs: THREADS threads call job_work() in a loop until
   SIGUSR2.  The program prints its pid and the address of its progress counter (so a
   test can read it through /proc/PID/mem and see that a stopped program does not run),
   counts every SIGCONT its handler receives, and at the end prints the calls it made.

   usage: jobs THREADS [chain]
   chain: each thread creates the next (50 us after it starts), so threads keep
   appearing, created by threads other than the main one, for a few milliseconds */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

long job_calls;  /* written only by job_work's lock-prefixed add */
extern long job_work(long i);
__asm__(".text\n.globl job_work\n.type job_work,@function\njob_work:\n"
        "  push %rbp\n"
        "  lock incq job_calls(%rip)\n"
        "  lea 1(%rdi), %rax\n"
        "  pop %rbp\n"
        "  ret\n"
        ".size job_work, .-job_work\n");

static atomic_int done;
static atomic_long conts;

static void on_cont(int sig) { (void)sig; atomic_fetch_add(&conts, 1); }
static void on_usr2(int sig) { (void)sig; atomic_store(&done, 1); }

static int chain, nthreads;
static pthread_t t[64];

static void *run(void *arg)
{
    long n = 0, x = (long)arg;
    if (chain && x + 1 < nthreads) {
        usleep(50);
        pthread_create(&t[x + 1], NULL, run, (void *)(x + 1));
    }
    while (!atomic_load(&done)) {
        x = job_work(x);
        n++;
    }
    return (void *)n;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 4;
    if (n < 1 || n > 64)
        return 2;
    nthreads = n;
    chain = argc > 2 && !strcmp(argv[2], "chain");
    signal(SIGCONT, on_cont);
    struct sigaction sa = {0};
    sa.sa_handler = on_usr2;  /* no SA_RESTART needed: the threads only compute */
    sigaction(SIGUSR2, &sa, NULL);
    /* only the main thread takes SIGUSR2 and SIGCONT's handler (they are per process) */
    printf("pid=%d counter=%p\n", getpid(), (void *)&job_calls);
    fflush(stdout);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    sigaddset(&set, SIGCONT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    for (long i = 0; i < (chain ? 1 : n); i++)
        pthread_create(&t[i], NULL, run, (void *)i);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    while (!atomic_load(&done))
        pause();
    long total = 0;
    for (int i = 0; i < n; i++) {
        void *r;
        pthread_join(t[i], &r);
        total += (long)r;
    }
    printf("calls=%ld counted=%ld conts=%ld ok=%d\n", total, job_calls, (long)conts,
           total == job_calls);
    return total == job_calls ? 0 : 1;
}
