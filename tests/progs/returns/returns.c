/* Return probes on a reference CPU (tests/test_powerpc_returns.py,
 * tests/test_s390_returns.py): recursion (fact, fib), a __builtin_longjmp that leaves
 * two frames (inner, middle), a tail call between two probed functions (outer ->
 * tailee).  Freestanding: no libc, no system call.  What the C code computes lands in
 * globals, for the tests to compare with what the probes saw. */

long fact_log[32];  /* every value fact returns, in the order it returns them */
long fib_log[256];
int fact_n, fib_n;
int fact_calls, fib_calls, middle_calls, inner_calls, tailee_calls;
int middle_returns, inner_returns;  /* counted by their callers: calls that returned */

__attribute__((noinline)) long fact(long n)
{
    fact_calls++;
    long r = n <= 1 ? 1 : n * fact(n - 1);
    fact_log[fact_n++] = r;
    return r;
}

__attribute__((noinline)) long fib(long n)
{
    fib_calls++;
    long r = n < 2 ? n : fib(n - 1) + fib(n - 2);
    fib_log[fib_n++] = r;
    return r;
}

static void *jb[5];

__attribute__((noinline)) long inner(long x)
{
    inner_calls++;
    if (x % 3 == 0)
        __builtin_longjmp(jb, 1);  /* inner and middle never return */
    return x * 10;
}

__attribute__((noinline)) long middle(long x)
{
    middle_calls++;
    long r = inner(x) + 1;
    inner_returns++;
    return r;
}

/* not probed by the tests: stale frames of middle are left at its own depth */
__attribute__((noinline)) long catcher(long x)
{
    if (__builtin_setjmp(jb))
        return 1000 + x;
    long r = middle(x);
    middle_returns++;
    return r;
}

__attribute__((noinline)) long tailee(long x)
{
    tailee_calls++;
    return x * 7 + 1;
}

/* a sibling call: tailee returns straight to outer's caller */
__attribute__((noinline)) long outer(long x)
{
    return tailee(x + 2);
}

long run(long n)
{
    long s = fact(n);
    s += fib(n);
    for (long x = 0; x < 7; x++)
        s += catcher(x) * (x + 1);
    s += outer(n) + outer(n + 1);
    s += fact(3);
    return s;
}
