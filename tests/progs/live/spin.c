/* Runs until killed, calling tick() in a loop from two threads (for attach tests). */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static volatile long ticks;
__attribute__((noinline)) void tick(void) { ticks++; }

static void *loop(void *a) { (void)a; for (;;) { tick(); usleep(100); } return NULL; }

int main(void)
{
    pthread_t t;
    pthread_create(&t, NULL, loop, NULL);
    printf("ready %d\n", getpid());
    fflush(stdout);
    loop(NULL);
}
