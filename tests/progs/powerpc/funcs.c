/* Small functions run on a reference CPU with a probe on every instruction
 * (tests/test_powerpc_programs.py): loops, recursion, a jump table (bctr), calls through
 * a pointer (bctrl), a larx/stcx. atomic, rotates and loads/stores of every width.
 * Freestanding: no libc, no system call; results land in `out` and `counter`. */

int out[40];
volatile int counter;

__attribute__((noinline)) int fib(int n)
{
    int a = 0, b = 1;
    while (n-- > 0) {
        int t = a + b;
        a = b;
        b = t;
    }
    return a;
}

__attribute__((noinline)) int fact(int n)
{
    return n <= 1 ? 1 : n * fact(n - 1);
}

__attribute__((noinline)) unsigned crc32(const unsigned char *p, int n)
{
    unsigned c = ~0u;
    while (n--) {
        c ^= *p++;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
    }
    return ~c;
}

__attribute__((noinline)) void sort(int *a, int n)
{
    for (int i = 0; i < n; i++)
        for (int j = n - 1; j > i; j--)
            if (a[j] < a[j - 1]) {
                int t = a[j];
                a[j] = a[j - 1];
                a[j - 1] = t;
            }
}

__attribute__((noinline)) int classify(int x)
{
    switch (x & 7) {
    case 0: return 11;
    case 1: return 23;
    case 2: return 37;
    case 3: return x * 3;
    case 4: return x - 100;
    case 5: return 51;
    case 6: return x ^ 0x55;
    default: return -7;
    }
}

__attribute__((noinline)) static int add1(int x) { return x + 1; }
__attribute__((noinline)) static int dbl(int x) { return x * 2; }
int (*volatile ops[2])(int) = { add1, dbl };

__attribute__((noinline)) int apply(int i, int x)
{
    return ops[i & 1](x);
}

__attribute__((noinline)) int atomic_add(volatile int *p, int n)
{
    return __atomic_fetch_add(p, n, __ATOMIC_SEQ_CST);
}

__attribute__((noinline)) long mix(long x)
{
    short h = (short)x;
    signed char c = (signed char)(x >> 3);
    return (x << 7) ^ (x >> 3) ^ (x * 0x9E37) ^ h ^ c;
}

int run(int n)
{
    unsigned char buf[8];
    int arr[6];
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)(i * 7 + n);
    for (int i = 0; i < 6; i++)
        arr[i] = (i * 5 + n) % 7;
    out[0] = fib(n + 6);
    out[1] = fact(n + 3);
    out[2] = (int)crc32(buf, 4);
    sort(arr, 6);
    for (int i = 0; i < 6; i++)
        out[3 + i] = arr[i];
    for (int i = 0; i < 8; i++)
        out[9 + i] = classify(i + n);
    out[17] = apply(0, n);
    out[18] = apply(1, n);
    for (int i = 0; i < 3; i++)
        out[19] = atomic_add(&counter, i + n);
    out[20] = counter;
    out[21] = (int)mix(n * 1000003L);
    return out[0] + out[1] + out[20];
}
