/* A program that counts its own calls, for live probes through the GDB remote
 * protocol (tests/test_remote_live.py): the probe counts must equal these counts, and
 * its output must be the same with and without probes.
 *
 *   calls ROUNDS THREADS
 *
 * leaf: plain arithmetic (every instruction probed); fact: recursion (return probes);
 * dive: left by longjmp from its deepest call (it never returns); work: called from
 * THREADS threads at once; strtol: a libc function (dynamic builds). */
#include <pthread.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>

static long n_leaf, n_fact, n_fact_ret, n_dive, n_dive_ret, n_work, n_strtol;
static jmp_buf env;
static int rounds = 200;

#define COUNT(x) __atomic_fetch_add(&(x), 1, __ATOMIC_RELAXED)

__attribute__((noinline)) long leaf(long a, long b)
{
    n_leaf++;
    long r = a * 7 + (b ^ 3);
    if (r & 1)
        r += a;
    else
        r -= b >> 1;
    return r - b;
}

__attribute__((noinline)) long fact(long n)
{
    n_fact++;
    long r = n <= 1 ? 1 : n * fact(n - 1);
    n_fact_ret++;
    return r;
}

__attribute__((noinline)) void dive(int depth)
{
    n_dive++;
    if (depth == 0)
        longjmp(env, 1);
    dive(depth - 1);
    n_dive_ret++; /* never reached: the deepest call jumps out of all of them */
}

__attribute__((noinline)) long work(long x)
{
    COUNT(n_work);
    return x * 3 + (x >> 2);
}

static void *worker(void *arg)
{
    long s = (long)arg;
    for (int i = 0; i < rounds; i++)
        s += work(i);
    return (void *)s;
}

int main(int argc, char **argv)
{
    int nthreads = 4;
    if (argc > 1) {
        rounds = (int)strtol(argv[1], 0, 10);
        n_strtol++;
    }
    if (argc > 2) {
        nthreads = (int)strtol(argv[2], 0, 10);
        n_strtol++;
    }
    long sum = 0;
    char digits[16];
    for (int i = 0; i < rounds; i++) {
        sum += leaf(i, i * 3);
        sum += fact(i % 13);
        snprintf(digits, sizeof digits, "%d", i);
        sum += strtol(digits, 0, 10);
        n_strtol++;
    }
    for (int i = 0; i < rounds / 20 + 1; i++)
        if (!setjmp(env))
            dive(i % 7);
    /* calls after the longjmps: their returns must still be matched */
    for (int i = 0; i < 3; i++)
        sum += fact(4 + i);
    pthread_t t[64];
    long tsum = 0;
    if (nthreads > 64)
        nthreads = 64;
    for (long i = 0; i < nthreads; i++)
        pthread_create(&t[i], 0, worker, (void *)i);
    for (int i = 0; i < nthreads; i++) {
        void *r;
        pthread_join(t[i], &r);
        tsum += (long)r;
    }
    printf("sum %ld threads %ld\n", sum, tsum);
    printf("calls leaf=%ld fact=%ld fact_returns=%ld dive=%ld dive_returns=%ld work=%ld strtol=%ld\n",
           n_leaf, n_fact, n_fact_ret, n_dive, n_dive_ret, n_work, n_strtol);
    return 7;
}
