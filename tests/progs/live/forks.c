/* fork, vfork and posix_spawn children and an exec, each calling step() a known number
   of times; every process prints what it counted. */
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;
static volatile long counter;

__attribute__((noinline)) void step(long k) { counter += k; }

static void run(long n) { for (long i = 0; i < n; i++) step(1); }

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "child") == 0) {   /* the exec'ed image */
        run(7);
        printf("exec child counter=%ld\n", counter);
        return 3;
    }
    run(10);
    fflush(stdout);
    pid_t p = fork();
    if (p == 0) { run(20); printf("fork child counter=%ld\n", counter); exit(0); }
    waitpid(p, NULL, 0);
    p = vfork();
    if (p == 0) { step(0); _exit(0); }                  /* one call inside the vfork child */
    waitpid(p, NULL, 0);
    char *args[] = {argv[0], "child", NULL};
    posix_spawn(&p, argv[0], NULL, NULL, args, environ);
    int st;
    waitpid(p, &st, 0);
    run(5);
    printf("parent counter=%ld exec child exit=%d\n", counter, WEXITSTATUS(st));
    if (argc > 1 && strcmp(argv[1], "exec") == 0)
        execv(argv[0], (char *[]){argv[0], "child", NULL});
    return 0;
}
