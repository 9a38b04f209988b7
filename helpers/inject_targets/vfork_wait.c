/*
 * vfork_wait — a target that cannot be ptrace-stopped for a while (tests/test_inject.py).
 *
 * The parent vfork()s and then sits in the kernel's uninterruptible vfork wait (state D) until
 * the child, which blocks reading one byte from stdin, exits: PTRACE_INTERRUPT cannot stop it
 * meanwhile. Prints "vforking PID" before and "done" after; exit status 0.
 */
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void)
{
    char c;
    printf("vforking %d\n", (int)getpid());
    fflush(stdout);
    pid_t child = vfork();
    if (child == 0)
        _exit(read(0, &c, 1) == 1 ? 0 : 1);
    if (child < 0)
        return 1;
    printf("done\n");
    fflush(stdout);
    return waitpid(child, NULL, 0) == child ? 0 : 1;
}
