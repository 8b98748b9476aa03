/* Signals at a high rate while probed code runs.  The program checks, in its handlers,
   what it would check without UBP:

   - the interrupted pc: never in anonymous memory (an XOL area), and inside spin() only
     at an instruction boundary (every offset seen is printed for the test to check);
   - the interrupted registers: spin() keeps rbx, r12-r15 constant and rsp at its frame
     (8 lower right after its push), so any other value is a register UBP corrupted;
   - the siginfo: a queued signal says SI_QUEUE, our pid and its sequence number; a timer
     signal says SI_TIMER and its overrun count.

   usage: sigstorm rt WORKERS SIGNALS [IN_FLIGHT]
                                        the main thread queues SIGNALS real-time signals
                                        to each worker, numbered, at most IN_FLIGHT
                                        (default 8) ahead of the worker; each must
                                        arrive once, with its siginfo (bad_seq: a number
                                        lost or repeated; reordered goes to stderr)
          sigstorm timer USEC MS [rt]   a POSIX timer every USEC us for MS ms of spinning
                                        (SIGALRM, or SIGRTMIN+1 with rt);
                                        the expirations the kernel counted (signals plus
                                        overruns) must equal the time elapsed */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#define C_RBX 0x1111111111111111L
#define C_R12 0x2222222222222222L
#define C_R13 0x3333333333333333L
#define C_R14 0x4444444444444444L
#define C_R15 0x5555555555555555L

long spin_count;
__thread long spin_rsp;
extern long spin(long n);
extern char spin_loop[], spin_after_push[], spin_loop_end[], spin_end[];
__asm__(".text\n.globl spin\n.type spin,@function\nspin:\n"
        "  push %rbx\n  push %r12\n  push %r13\n  push %r14\n  push %r15\n"
        "  movabs $0x1111111111111111, %rbx\n"
        "  movabs $0x2222222222222222, %r12\n"
        "  movabs $0x3333333333333333, %r13\n"
        "  movabs $0x4444444444444444, %r14\n"
        "  movabs $0x5555555555555555, %r15\n"
        "  movq %rsp, %fs:spin_rsp@tpoff\n"
        ".globl spin_loop\nspin_loop:\n"
        "  lock addq %rbx, spin_count(%rip)\n"
        "  lea (%r12,%r13), %rax\n"
        "  mov %r14, %rdx\n"
        "  push %r15\n"
        ".globl spin_after_push\nspin_after_push:\n"
        "  pop %rcx\n"
        "  xor %rdx, %rcx\n"
        "  add %rcx, %rax\n"
        "  dec %rdi\n"
        "  jnz spin_loop\n"
        ".globl spin_loop_end\nspin_loop_end:\n"
        "  pop %r15\n  pop %r14\n  pop %r13\n  pop %r12\n  pop %rbx\n"
        "  ret\n"
        ".globl spin_end\nspin_end:\n"
        ".size spin, .-spin\n");

static atomic_long bad_pc, bad_regs, bad_code, bad_seq, reordered, in_spin;
static unsigned char seen_off[256];
extern char __executable_start[], etext[];

static int anonymous(char *pc)
{
    if (pc >= __executable_start && pc < etext)
        return 0;
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    int anon = 1;
    while (f && fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        char path[256] = "";
        if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %255s", &lo, &hi, path) >= 2
            && (char *)lo <= pc && pc < (char *)hi && (path[0] == '/' || path[0] == '['))
            anon = 0;
    }
    if (f)
        fclose(f);
    return anon;
}

static void check_context(ucontext_t *uc)
{
    greg_t *g = uc->uc_mcontext.gregs;
    char *pc = (char *)g[REG_RIP];
    if (pc >= (char *)spin && pc < spin_end)
        seen_off[pc - (char *)spin] = 1;
    else if (anonymous(pc))
        atomic_fetch_add(&bad_pc, 1);
    if (pc >= spin_loop && pc <= spin_loop_end) {
        atomic_fetch_add(&in_spin, 1);
        long want_rsp = spin_rsp - (pc == spin_after_push ? 8 : 0);
        if (g[REG_RBX] != C_RBX || g[REG_R12] != C_R12 || g[REG_R13] != C_R13
            || g[REG_R14] != C_R14 || g[REG_R15] != C_R15 || g[REG_RSP] != want_rsp)
            atomic_fetch_add(&bad_regs, 1);
    }
}

static void print_offsets(void)
{
    printf("offsets=");
    for (int i = 0; i < 256; i++)
        if (seen_off[i])
            printf("%d,", i);
    printf("\n");
}

/* ------------------------------------------------------------------ rt mode */
#define MAXW 64
static pthread_t workers[MAXW];
static atomic_long received[MAXW];
static atomic_int stop_workers;
static __thread int my_index = -1;
static long per_worker;
#define MAXSEQ 1000000
static unsigned char seen[MAXW][MAXSEQ / 8];

static void on_rt(int sig, siginfo_t *si, void *ctx)
{
    (void)sig;
    check_context(ctx);
    int w = my_index;
    if (si->si_code != SI_QUEUE || si->si_pid != getpid())
        atomic_fetch_add(&bad_code, 1);
    /* each number must come exactly once (seen[] bit); out of order is counted apart */
    int seq = si->si_value.sival_int;
    if (w < 0 || seq < 0 || seq >= MAXSEQ || seen[w][seq / 8] & (1 << seq % 8))
        atomic_fetch_add(&bad_seq, 1);
    else
        seen[w][seq / 8] |= 1 << seq % 8;
    if (w >= 0 && seq != received[w])
        atomic_fetch_add(&reordered, 1);
    if (w >= 0)
        atomic_fetch_add(&received[w], 1);
}

static void *worker(void *arg)
{
    my_index = (int)(long)arg;
    /* born with SIGRTMIN blocked (main's mask): a signal before my_index is set would
       be counted for no worker */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGRTMIN);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    while (!atomic_load(&stop_workers))
        spin(64);
    return NULL;
}

static int rt_mode(int n, long count, long in_flight)
{
    if (count > MAXSEQ)
        return 2;
    struct sigaction sa = {0};
    sa.sa_sigaction = on_rt;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGRTMIN, &sa, NULL);
    per_worker = count;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGRTMIN);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    for (long i = 0; i < n; i++)
        pthread_create(&workers[i], NULL, worker, (void *)i);
    long sent = 0;
    for (long seq = 0; seq < count; seq++)
        for (int w = 0; w < n; w++) {
            /* keep a few in flight per worker: they queue, and must stay in order */
            while (seq - atomic_load(&received[w]) > in_flight)
                sched_yield();
            union sigval v = {.sival_int = (int)seq};
            while (pthread_sigqueue(workers[w], SIGRTMIN, v) == EAGAIN)
                sched_yield();
            sent++;
        }
    for (int w = 0; w < n; w++)
        while (atomic_load(&received[w]) < count)
            sched_yield();
    atomic_store(&stop_workers, 1);
    long got = 0;
    for (int w = 0; w < n; w++) {
        pthread_join(workers[w], NULL);
        got += received[w];
    }
    printf("sent=%ld received=%ld bad_code=%ld bad_seq=%ld bad_pc=%ld bad_regs=%ld\n", sent, got,
           (long)bad_code, (long)bad_seq, (long)bad_pc, (long)bad_regs);
    print_offsets();
    fprintf(stderr, "reordered=%ld in_spin=%ld\n", (long)reordered, (long)in_spin);
    return 0;
}

/* ------------------------------------------------------------------ timer mode */
static atomic_long timer_signals, timer_expirations;
static timer_t timer;
static int timer_sig = SIGALRM;

static void on_timer(int sig, siginfo_t *si, void *ctx)
{
    (void)sig;
    check_context(ctx);
    if (si->si_code != SI_TIMER)
        atomic_fetch_add(&bad_code, 1);
    atomic_fetch_add(&timer_signals, 1);
    atomic_fetch_add(&timer_expirations, 1 + (si->si_code == SI_TIMER ? si->si_overrun : 0));
}

static long ns(struct timespec t) { return t.tv_sec * 1000000000L + t.tv_nsec; }

static int timer_mode(long usec, long ms)
{
    struct sigaction sa = {0};
    sa.sa_sigaction = on_timer;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(timer_sig, &sa, NULL);
    struct sigevent ev = {0};
    ev.sigev_notify = SIGEV_THREAD_ID;
    ev.sigev_signo = timer_sig;
    ev._sigev_un._tid = gettid();
    if (timer_create(CLOCK_MONOTONIC, &ev, &timer))
        return 2;
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long interval = usec * 1000;
    struct itimerspec it = {{0, interval}, {0, 0}};
    long first = ns(t0) + interval;
    it.it_value.tv_sec = first / 1000000000L;
    it.it_value.tv_nsec = first % 1000000000L;
    timer_settime(timer, TIMER_ABSTIME, &it, NULL);
    do {
        spin(256);
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while (ns(now) - ns(t0) < ms * 1000000L);
    /* account for every expiration: block, read the next expiry, collect what is
       pending, and compare with the time elapsed */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, timer_sig);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    /* the time to the next expiry, which lies between two clock readings (reading the
       clock after instead overstated the expiries by one whenever the thread lost the
       CPU in between).  Read, not disarmed: on recent kernels (6.18 here) disarming drops the signal
       of an expiry that fired after the block above and is still pending, which the
       count below would then miss.  So the timer runs on while what is pending is
       collected: the expiries it may add by then bound the count from above. */
    struct itimerspec left, off = {{0, 0}, {0, 0}};
    struct timespec before;
    clock_gettime(CLOCK_MONOTONIC, &before);
    timer_gettime(timer, &left);
    long expected = (ns(before) + ns(left.it_value) - first + interval / 2) / interval;
    siginfo_t si;
    struct timespec zero = {0, 0};
    long pending = 0;
    while (sigtimedwait(&set, &si, &zero) == timer_sig)
        pending += 1 + si.si_overrun;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long expected_hi = (ns(now) - first) / interval + 1;
    timer_settime(timer, 0, &off, NULL);
    long accounted = timer_expirations + pending;
    printf("timer: accounted_for=%s bad_code=%ld bad_pc=%ld bad_regs=%ld\n",
           accounted >= expected && accounted <= expected_hi + 1 ? "yes" : "no", (long)bad_code,
           (long)bad_pc, (long)bad_regs);
    print_offsets();
    fprintf(stderr, "signals=%ld expirations=%ld pending=%ld expected=%ld in_spin=%ld\n",
            (long)timer_signals, (long)timer_expirations, pending, expected, (long)in_spin);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 3 && !strcmp(argv[1], "rt"))
        return rt_mode(atoi(argv[2]) > MAXW ? MAXW : atoi(argv[2]), atol(argv[3]),
                       argc > 4 ? atol(argv[4]) : 8);
    if (argc > 3 && !strcmp(argv[1], "timer")) {
        if (argc > 4 && !strcmp(argv[4], "rt"))
            timer_sig = SIGRTMIN + 1;
        return timer_mode(atol(argv[2]), atol(argv[3]));
    }
    fprintf(stderr, "usage: sigstorm rt WORKERS SIGNALS [IN_FLIGHT] | timer USEC MS [rt]\n");
    return 2;
}
