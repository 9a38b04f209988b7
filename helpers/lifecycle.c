/*
 * lifecycle — a workload writer that changes its process and address space on demand, for
 * tests of tracking through fork() and mremap() during a snapshot. Unaware of uffdsnap.
 *
 * usage: lifecycle --object PATH --index I [--child-index J] [--supervisor] [--on-usr2 MODE]
 *   SIGUSR1: fork(); the child becomes writer J (on the inherited mapping) and writes too.
 *   --supervisor: this process maps the object writable but does not write (a pre-forking
 *   server's master): it only forks writer J on SIGUSR1, so it can fork at any moment. After a
 *   SIGUSR2 that leaves it a mapping (move, grow*, replace, exec) it starts writing as writer I,
 *   through that mapping only.
 *   SIGUSR2, by MODE:
 *     move (default): mremap() the whole mapping to a new address, carry on writing through it;
 *     grow: mremap() it to a new address and a larger size, taking in the object's pages past
 *       the workload (the object must be larger than its layout), then also write the step
 *       number into the first word of each of those pages at every step;
 *     grow-in-place: the same, growing the mapping where it is (no move);
 *     replace: munmap() the mapping, mmap() the object again elsewhere, carry on through that;
 *     exec: execve() this program again, which maps the object anew and carries on as the
 *       same writer (a new address space under the same pid);
 *     unmap: munmap() the mapping and stop writing (the stop word is then read with pread);
 *     remove: MADV_REMOVE this writer's data pages (punching holes), then carry on writing.
 * Prints "ready pid=P index=I", then "forked pid=C index=J" (from the child), "remapped
 * from=A to=B" (after any SIGUSR2 mode but exec, which prints "ready" again from the new
 * image); each process prints "done pid=P seq=S" when the stop flag is set.
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
#include <sys/stat.h>
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
    const char *mode = "move";
    static const struct option opts[] = {
        {"object", required_argument, 0, 'o'},
        {"index", required_argument, 0, 'i'},
        {"child-index", required_argument, 0, 'c'},
        {"supervisor", no_argument, 0, 's'},
        {"on-usr2", required_argument, 0, 'u'},
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
        else if (c == 'u')
            mode = optarg;
        else
            return 2;
    }
    if (!path || index < 0 || (strcmp(mode, "move") && strcmp(mode, "grow") &&
                               strcmp(mode, "grow-in-place") && strcmp(mode, "replace") &&
                               strcmp(mode, "exec") && strcmp(mode, "unmap") &&
                               strcmp(mode, "remove"))) {
        fputs("usage: lifecycle --object PATH --index I [--child-index J] [--supervisor]"
              " [--on-usr2 move|grow|grow-in-place|replace|exec|unmap|remove]\n", stderr);
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
    struct stat st;
    if (fstat(fd, &st))
        die("fstat");
    /* the object's pages past the workload, taken in by the grow modes */
    uint64_t extra = (uint64_t)st.st_size > lay.size ? (uint64_t)st.st_size - lay.size : 0;
    extra -= extra % lay.page_size;
    if (!strncmp(mode, "grow", 4) && !extra) {
        fputs("lifecycle: --on-usr2 grow*: the object has no pages past the workload\n", stderr);
        return 2;
    }
    /* grow-in-place needs free address space right after the mapping: reserve it */
    void *where = NULL;
    if (!strcmp(mode, "grow-in-place")) {
        where = mmap(NULL, lay.size + extra, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (where == MAP_FAILED)
            die("mmap reserve");
    }
    volatile uint64_t *all = mmap(where, lay.size, PROT_READ | PROT_WRITE,
                                  MAP_SHARED | (where ? MAP_FIXED : 0), fd, 0);
    if (all == MAP_FAILED)
        die("mmap");
    volatile uint64_t *grown = NULL; /* the pages past the workload, once taken in */
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
        if (want_remap && !strcmp(mode, "exec")) {
            fflush(stdout);
            char **again = calloc((size_t)argc + 1, sizeof *again);
            int n = 0;
            for (int i = 0; again && i < argc; i++) /* the new image writes (a supervisor's too) */
                if (strcmp(argv[i], "--supervisor"))
                    again[n++] = argv[i];
            if (!again)
                die("calloc");
            execv("/proc/self/exe", again); /* the same writer resumes from its counter page */
            die("execv");
        }
        if (want_remap && !strcmp(mode, "unmap")) {
            if (munmap((void *)all, lay.size))
                die("munmap");
            printf("remapped from=%p to=(none)\n", (void *)all);
            fflush(stdout);
            uint64_t stop = 0;
            while (!stop) { /* nothing mapped: read the stop word from the file */
                usleep(1000);
                if (pread(fd, &stop, sizeof stop, H_STOP * 8) != (ssize_t)sizeof stop)
                    die("pread stop");
            }
            printf("done pid=%d seq=%" PRIu64 "\n", getpid(), w.seq);
            return 0;
        }
        if (want_remap && !strcmp(mode, "remove")) {
            want_remap = 0;
            char *data = (char *)w.views[0].data;
            if (madvise(data, lay.data_pages * lay.page_size, MADV_REMOVE))
                die("madvise(MADV_REMOVE)");
            printf("remapped from=%p to=%p (removed)\n", (void *)data, (void *)data);
            fflush(stdout);
        }
        if (want_remap) {
            want_remap = 0;
            void *moved;
            uint64_t size = lay.size;
            if (!strcmp(mode, "grow-in-place")) {
                if (munmap((char *)all + lay.size, extra))
                    die("munmap reserve");
                size += extra;
                moved = mremap((void *)all, lay.size, size, 0);
            } else if (!strcmp(mode, "replace")) {
                if (munmap((void *)all, lay.size))
                    die("munmap");
                moved = mmap(NULL, lay.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            } else {
                /* reserve a fresh range, then move the mapping onto it */
                size += !strcmp(mode, "grow") ? extra : 0;
                void *to = mmap(NULL, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                if (to == MAP_FAILED)
                    die("mmap reserve");
                moved = mremap((void *)all, lay.size, size, MREMAP_MAYMOVE | MREMAP_FIXED, to);
            }
            if (moved == MAP_FAILED)
                die("mremap");
            if (size > lay.size)
                grown = (volatile uint64_t *)((char *)moved + lay.size);
            supervisor = 0; /* from now on it writes, through this mapping only */
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
        for (uint64_t p = 0; grown && p < extra / lay.page_size; p++)
            grown[p * lay.page_size / 8] = w.seq;
    }
    printf("done pid=%d seq=%" PRIu64 "\n", getpid(), w.seq);
    fflush(stdout);
    return 0;
}
