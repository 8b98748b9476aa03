/* A fast timer signal while probed code runs.  The handler checks the pc it interrupted
   lies in the program's own code (never in an XOL area) and counts deliveries. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <ucontext.h>

static volatile long delivered, bad_pc, work_calls;
extern char __executable_start[], etext[];

__attribute__((noinline)) long work(long i)
{
    work_calls++;
    long x = i;
    for (int k = 0; k < 20; k++)
        x = x * 7 + k;
    return x;
}

static void on_alarm(int sig, siginfo_t *si, void *ctx)
{
    (void)sig; (void)si;
    ucontext_t *uc = ctx;
    char *pc = (char *)uc->uc_mcontext.gregs[REG_RIP];
    delivered++;
    /* work() and main() are ours: an interrupted pc outside our text must be in libc,
       never in anonymous memory such as an XOL area */
    if (pc < __executable_start || pc >= etext) {
        FILE *f = fopen("/proc/self/maps", "r");
        char line[512];
        int in_file = 0;
        while (f && fgets(line, sizeof line, f)) {
            unsigned long lo, hi;
            char perms[8], path[256] = "";
            if (sscanf(line, "%lx-%lx %7s %*s %*s %*s %255s", &lo, &hi, perms, path) >= 3
                && (char *)lo <= pc && pc < (char *)hi && path[0] == '/')
                in_file = 1;
        }
        if (f) fclose(f);
        if (!in_file) bad_pc++;
    }
}

/* "ack" mode: another thread sends SIGUSR1 to the worker N times, each time waiting
   until the handler has seen it, so no two can merge: exactly N must arrive. */
static atomic_long acked;
static pthread_t worker;
static volatile int done;

static void on_usr1(int sig) { (void)sig; atomic_fetch_add(&acked, 1); }

static void *sender(void *arg)
{
    long n = (long)arg;
    for (long i = 0; i < n; i++) {
        pthread_kill(worker, SIGUSR1);
        while (atomic_load(&acked) <= i)
            ;
    }
    done = 1;
    return NULL;
}

static int ack_mode(long n)
{
    signal(SIGUSR1, on_usr1);
    worker = pthread_self();
    pthread_t s;
    pthread_create(&s, NULL, sender, (void *)n);
    long sum = 0, i = 0;
    while (!done)
        sum += work(i++);
    pthread_join(s, NULL);
    printf("sent=%ld received=%ld\n", n, (long)acked);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 2 && argv[2][0] == 'a')
        return ack_mode(atol(argv[1]));
    long n = argc > 1 ? atol(argv[1]) : 200000;
    struct sigaction sa = {0};
    sa.sa_sigaction = on_alarm;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{0, 200}, {0, 200}};
    setitimer(ITIMER_REAL, &it, NULL);
    long sum = 0;
    for (long i = 0; i < n; i++)
        sum += work(i);
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    printf("work=%ld sum=%ld delivered=%s bad_pc=%ld\n", work_calls, sum,
           delivered > 0 ? "yes" : "no", bad_pc);
    fprintf(stderr, "delivered=%ld\n", delivered);
    return 0;
}
