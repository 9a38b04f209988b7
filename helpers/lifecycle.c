/*
 * lifecycle — a workload writer that changes its process and address space on demand, for
 * tests of tracking through fork() and mremap() during a snapshot. Unaware of uffdsnap.
 *
 * usage: lifecycle --object PATH --index I [--child-index J] [--supervisor]
 *   SIGUSR1: fork(); the child becomes writer J (on the inherited mapping) and writes too.
 *   --supervisor: this process maps the object writable but does not write (a pre-forking
 *   server's master): it only forks writer J on SIGUSR1, so it can fork at any moment.
 *   SIGUSR2: mremap() the whole mapping to a new address and carry on writing through it.
 * Prints "ready pid=P index=I", then "forked pid=C index=J" (from the child) and
 * "remapped from=A to=B"; each process prints "done pid=P seq=S" when the stop flag is set.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "workload.h"

static volatile sig_atomic_t want_fork, want_remap;

static void on_usr1(int sig)
{
    (void)sig;
    want_fork = 1;
}

static void on_usr2(int sig)
{
    (void)sig;
    want_remap = 1;
}

static void die(const char *what)
{
    fprintf(stderr, "lifecycle: %s: %s\n", what, strerror(errno));
    exit(1);
}

int main(int argc, char **argv)
{
    const char *path = NULL;
    long index = -1, child_index = -1;
    int supervisor = 0;
    static const struct option opts[] = {
        {"object", required_argument, 0, 'o'},
        {"index", required_argument, 0, 'i'},
        {"child-index", required_argument, 0, 'c'},
        {"supervisor", no_argument, 0, 's'},
        {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'o')
            path = optarg;
        else if (c == 'i')
            index = strtol(optarg, NULL, 10);
        else if (c == 'c')
            child_index = strtol(optarg, NULL, 10);
        else if (c == 's')
            supervisor = 1;
        else
            return 2;
    }
    if (!path || index < 0) {
        fputs("usage: lifecycle --object PATH --index I [--child-index J]\n", stderr);
        return 2;
    }
    int fd = open(path, O_RDWR);
    if (fd < 0)
        die("open");
    uint64_t hdr[H_WORDS];
    if (pread(fd, hdr, sizeof hdr, 0) != (ssize_t)sizeof hdr)
        die("read header");
    struct wl_layout lay;
    const char *bad = wl_layout_from_header(&lay, hdr);
    if (bad || (uint64_t)index >= lay.nwriters ||
        (child_index >= 0 && (uint64_t)child_index >= lay.nwriters)) {
        fprintf(stderr, "lifecycle: %s\n", bad ? bad : "index out of range");
        return 2;
    }
    volatile uint64_t *all = mmap(NULL, lay.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (all == MAP_FAILED)
        die("mmap");
    close(fd);
    struct wl_writer w;
    wl_view_of_whole(&w.views[0], all, &lay, (uint64_t)index);
    wl_writer_init(&w, &lay, (uint64_t)index, 1, (uint64_t)getpid());
    signal(SIGUSR1, on_usr1);
    signal(SIGUSR2, on_usr2);
    printf("ready pid=%d index=%ld seq=%" PRIu64 "\n", getpid(), index, w.seq);
    fflush(stdout);
    while (!wl_stopped(&w)) {
        if (want_fork && child_index >= 0) {
            want_fork = 0;
            pid_t pid = fork();
            if (pid < 0)
                die("fork");
            if (pid == 0) { /* the child: writer J on the inherited mapping */
                signal(SIGUSR1, SIG_IGN);
                wl_view_of_whole(&w.views[0], all, &lay, (uint64_t)child_index);
                wl_writer_init(&w, &lay, (uint64_t)child_index, 1, (uint64_t)getpid());
                child_index = -1;
                supervisor = 0;
                printf("forked pid=%d index=%" PRIu64 "\n", getpid(), w.index);
                fflush(stdout);
            }
        }
        if (want_remap) {
            want_remap = 0;
            /* reserve a fresh range, then move the mapping onto it */
            void *to = mmap(NULL, lay.size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (to == MAP_FAILED)
                die("mmap reserve");
            void *moved = mremap((void *)all, lay.size, lay.size, MREMAP_MAYMOVE | MREMAP_FIXED,
                                 to);
            if (moved == MAP_FAILED)
                die("mremap");
            printf("remapped from=%p to=%p\n", (void *)all, moved);
            fflush(stdout);
            all = moved;
            uint64_t seq = w.seq, ops = w.ops;
            wl_view_of_whole(&w.views[0], all, &lay, w.index);
            wl_writer_init(&w, &lay, w.index, 1, (uint64_t)getpid());
            w.seq = seq;
            w.ops = ops;
        }
        if (supervisor) {
            usleep(1000); /* never touches the memory: reads of the stop flag do not fault */
            continue;
        }
        if (wl_step(&w))
            break;
    }
    printf("done pid=%d seq=%" PRIu64 "\n", getpid(), w.seq);
    fflush(stdout);
    return 0;
}
