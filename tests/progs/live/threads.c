/* N threads each call work() CALLS times; the program counts the calls itself. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

static atomic_long calls;

__attribute__((noinline)) long work(long i)
{
    atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
    return i * 3 + 1;
}

static long per_thread;

static void *run(void *arg)
{
    long sum = 0;
    for (long i = 0; i < per_thread; i++)
        sum += work(i + (long)arg);
    return (void *)sum;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 16;
    per_thread = argc > 2 ? atol(argv[2]) : 100000;
    pthread_t t[256];
    long total = 0;
    for (int i = 0; i < n; i++)
        pthread_create(&t[i], NULL, run, (void *)(long)i);
    for (int i = 0; i < n; i++) {
        void *r;
        pthread_join(t[i], &r);
        total += (long)r;
    }
    printf("threads=%d calls=%ld sum=%ld\n", n, (long)calls, total);
    return 0;
}
