/* Return probes: recursion, a longjmp that skips two frames, threads. */
#include <pthread.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

__attribute__((noinline)) long fact(long n) { return n <= 1 ? 1 : n * fact(n - 1); }

static jmp_buf jb;
__attribute__((noinline)) long inner(long x)
{
    if (x == 3)
        longjmp(jb, 1);          /* inner and middle never return for x == 3 */
    return x * 10;
}
__attribute__((noinline)) long middle(long x) { return inner(x) + 1; }

/* UBP detaches while six hijacked frames are on the stack: each must get its
 * real return address back, or the program crashes on the way out. */
__attribute__((noinline)) long deep(long n)
{
    if (n == 0) {
        usleep(1500000);
        return 7;
    }
    return deep(n - 1) + 1;
}

static void *worker(void *arg)
{
    long sum = 0;
    for (int i = 0; i < 200; i++)
        sum += fact(5 + (long)arg % 3);
    return (void *)sum;
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "deep")) {
        printf("deep=%ld\n", deep(5));
        return 0;
    }
    int nthreads = argc > 1 ? atoi(argv[1]) : 4;
    printf("fact(10)=%ld\n", fact(10));
    long total = 0;
    for (long x = 0; x < 10; x++) {
        if (!setjmp(jb))
            total += middle(x);
        else
            total += 1000;
    }
    printf("jumps total=%ld\n", total);
    pthread_t t[64];
    for (long i = 0; i < nthreads; i++)
        pthread_create(&t[i], NULL, worker, (void *)i);
    long sum = 0;
    for (int i = 0; i < nthreads; i++) {
        void *r;
        pthread_join(t[i], &r);
        sum += (long)r;
    }
    printf("threads sum=%ld\n", sum);
    return 0;
}
