/* Small functions run on a reference CPU with a probe on every instruction
 * (tests/test_s390_programs.py).  Built with -march=z13 -O2 so the compiler uses what
 * s390x code really contains: relative branches and compare-and-branch (cij, crj),
 * brctg loops, larl/lgrl/stgrl for globals, a jump table (branch through a register),
 * calls through a pointer (basr), variable-length copies and clears (mvc/xc run by
 * exrl), an EX written by hand, compare-and-swap, and stmg/lmg around every call.
 * Freestanding: no libc, no system call; results land in `out` and `counter`. */

long out[48];
long counter;
static long state = 12345;
unsigned char buf_a[300], buf_b[300];

__attribute__((noinline)) long collatz(long n)
{
    long steps = 0;
    while (n > 1 && steps < 200) {
        n = (n & 1) ? 3 * n + 1 : n >> 1;
        steps++;
    }
    return steps;
}

__attribute__((noinline)) long power_mod(long base, long exp, long mod)
{
    if (exp == 0)
        return 1;
    long half = power_mod(base, exp >> 1, mod);
    long sq = half * half % mod;
    return (exp & 1) ? sq * base % mod : sq;
}

__attribute__((noinline)) unsigned adler32(const unsigned char *p, unsigned long n)
{
    unsigned a = 1, b = 0;
    for (unsigned long i = 0; i < n; i++) {
        a = (a + p[i]) % 65521;
        b = (b + a) % 65521;
    }
    return (b << 16) | a;
}

__attribute__((noinline)) void insertion_sort(long *v, unsigned long n)
{
    for (unsigned long i = 1; i < n; i++) {
        long key = v[i];
        unsigned long j = i;
        for (; j > 0 && v[j - 1] > key; j--)
            v[j] = v[j - 1];
        v[j] = key;
    }
}

__attribute__((noinline)) long dispatch(long op, long a, long b)
{
    switch (op % 9) {
    case 0: return a + b;
    case 1: return a - b;
    case 2: return a * b;
    case 3: return b ? a / b : 0;
    case 4: return a & b;
    case 5: return a | b;
    case 6: return a ^ b;
    case 7: return a << (b & 15);
    default: return -a;
    }
}

__attribute__((noinline)) static long add1(long x) { return x + 1; }
__attribute__((noinline)) static long dbl(long x) { return x * 2; }
long (*volatile ops[2])(long) = { add1, dbl };

__attribute__((noinline)) long apply(long i, long x)
{
    return ops[i & 1](x) + 1;  /* not a tail call: basr */
}

__attribute__((noinline)) long bump(long n)
{
    long old = counter, seen;
    /* a compare-and-swap loop (csg) */
    while ((seen = __sync_val_compare_and_swap(&counter, old, old * 3 + n)) != old)
        old = seen;
    return old * 3 + n;
}

__attribute__((noinline)) long next_random(void)
{
    /* a static global: larl/lgrl/stgrl */
    state = state * 6364136223846793005L + 1442695040888963407L;
    return state >> 33;
}

/* what gcc emits for a copy of variable length: mvc 256 bytes at a time, the rest by
 * an mvc that exrl runs with the length from a register */
__attribute__((noinline)) void copy(unsigned char *dst, const unsigned char *src, unsigned long n)
{
    while (n > 256) {
        __asm__ volatile("mvc 0(256,%0),0(%1)" : : "a"(dst), "a"(src) : "memory");
        dst += 256;
        src += 256;
        n -= 256;
    }
    if (n)
        __asm__ volatile(
            "   exrl  %2,0f\n"
            "   j     1f\n"
            "0: mvc   0(1,%0),0(%1)\n"
            "1:\n"
            : : "a"(dst), "a"(src), "a"(n - 1) : "memory");
}

__attribute__((noinline)) void clear(unsigned char *dst, unsigned long n)
{
    __builtin_memset(dst, 0, n);
}

__attribute__((noinline)) int compare(const unsigned char *a, const unsigned char *b, unsigned long n)
{
    for (unsigned long i = 0; i < n; i++)
        if (a[i] != b[i])
            return a[i] < b[i] ? -1 : 1;
    return 0;
}

/* EXECUTE written by hand: mvc with its length from a register, target found by larl */
__attribute__((noinline)) void ex_copy(unsigned char *dst, const unsigned char *src, unsigned long n)
{
    __asm__ volatile(
        "   aghi  %2,-1\n"
        "   larl  1,0f\n"
        "   ex    %2,0(1)\n"
        "   j     1f\n"
        "0: mvc   0(1,%0),0(%1)\n"
        "1:\n"
        : : "a"(dst), "a"(src), "d"(n) : "1", "memory");
}

__attribute__((noinline)) long mix(long x)
{
    short h = (short)x;
    signed char c = (signed char)(x >> 3);
    return (x << 7) ^ (x >> 3) ^ (x * 0x9E37) ^ h ^ c;
}

__attribute__((noinline)) __int128 wide(__int128 a, long b)
{
    return a * b + (a >> 7);
}

long run(long n)
{
    long acc = 0;
    int k = 0;
    for (long i = 0; i < n; i++) {
        out[k++ % 48] = collatz(27 + i);
        out[k++ % 48] = power_mod(7 + i, 13 + i, 1000003);
        out[k++ % 48] = dispatch(i * 5 + 3, 1000 + i, 7 - i);
        out[k++ % 48] = apply(i, 40 + i);
        out[k++ % 48] = mix(i * 0x12345);
        out[k++ % 48] = bump(i + 1);
        out[k++ % 48] = next_random();
        acc += out[(k - 1) % 48];
    }
    for (int i = 0; i < 300; i++)
        buf_a[i] = (unsigned char)(i * 7 + n);
    out[k++ % 48] = adler32(buf_a, 24);
    copy(buf_b, buf_a, 5 + n);
    copy(buf_b + 40, buf_a + 7, 260 + n);
    clear(buf_b + 20, 9 + n);
    ex_copy(buf_b + 280, buf_a + 100, 11);
    out[k++ % 48] = compare(buf_a, buf_b, 64);
    out[k++ % 48] = adler32(buf_b + 270, 24);
    long arr[9] = { 9, -3, 27, 4, 4, -100, 55, 0, 12 };
    insertion_sort(arr, 9);
    for (int i = 0; i < 9; i++)
        acc = acc * 31 + arr[i];
    __int128 w = wide(((__int128)acc << 40) | 77, n + 3);
    out[k++ % 48] = (long)(w >> 64) ^ (long)w;
    return acc ^ counter;
}
