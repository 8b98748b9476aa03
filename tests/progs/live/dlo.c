/* Loads a library after start and calls into it. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    long (*fn)(long) = (long (*)(long))dlsym(h, "plugin_fn");
    long n = argc > 2 ? atol(argv[2]) : 1000, sum = 0;
    for (long i = 0; i < n; i++)
        sum += fn(i);
    printf("sum=%ld\n", sum);
    return 0;
}
