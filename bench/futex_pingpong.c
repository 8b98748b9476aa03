/* The floor under a trap-free probe with a handler: one futex round trip between two
   processes through a shared word, the handshake ubp_core.rendezvous makes per hit
   (without its lock, registers or Python).

       gcc -O2 -o /tmp/pingpong bench/futex_pingpong.c
       taskset -c 0 /tmp/pingpong 200000     # both on one CPU
       /tmp/pingpong 100000                  # wherever the scheduler puts them  */
#include <linux/futex.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long futex(int *word, int op, int val)
{
    return syscall(SYS_futex, word, op, val, NULL, NULL, 0);
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 100000;
    int *state = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    pid_t server = fork();
    if (server == 0) { /* UBP's side: wait for a request (1), answer it (2) */
        for (;;) {
            int seen = __atomic_load_n(state, __ATOMIC_ACQUIRE);
            if (seen == 1) {
                __atomic_store_n(state, 2, __ATOMIC_RELEASE);
                futex(state, FUTEX_WAKE, 1);
            } else {
                futex(state, FUTEX_WAIT, seen);
            }
        }
    }
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) { /* the probed thread's side */
        __atomic_store_n(state, 1, __ATOMIC_RELEASE);
        futex(state, FUTEX_WAKE, 1);
        while (__atomic_load_n(state, __ATOMIC_ACQUIRE) == 1)
            futex(state, FUTEX_WAIT, 1);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    kill(server, SIGKILL);
    printf("%.3f us per round trip\n",
           ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n / 1000.0);
    return 0;
}
