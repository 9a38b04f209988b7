/*
 * chain — a workload writer that lives as a chain of short-lived processes: each one writes as
 * writer I for --lifetime-ms, then forks its successor (which carries on as writer I from the
 * seq in the counter page) and exits. Like a daemon that re-execs itself, or a pre-forking
 * server recycling its workers, faster than an agent can be started for each.
 *
 * usage: chain --object PATH --index I [--lifetime-ms L] [--tracked-lifetime-ms T] [--rate R]
 * With --tracked-lifetime-ms, a process whose mapping of the object is registered with a uffd
 * for write-protection (VmFlags "uw" in /proc/self/smaps, looked at when it is born) lives T ms
 * instead: a chain slow enough to attach that forks fast once a snapshot tracks it.
 * Prints "ready pid=P index=I" once (the first process, flushed); each process prints nothing
 * else. Stops when the header's stop word is set (the current process exits 0).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define HELPER_NAME "chain"
#define USAGE "usage: chain --object PATH --index I [--lifetime-ms L] " \
              "[--tracked-lifetime-ms T] [--rate R]"
#define HELPER_INT_BASE 10
#include "util.h"
#include "workload.h"

/* Is the mapping at `addr` registered for uffd write-protection (VmFlags "uw")? */
static int wp_registered(const void *addr)
{
    FILE *f = fopen("/proc/self/smaps", "re");
    if (!f)
        return 0;
    char line[512], start[32];
    snprintf(start, sizeof start, "%lx-", (unsigned long)addr);
    int in = 0, found = 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, start, strlen(start)) == 0)
            in = 1;
        else if (in && strncmp(line, "VmFlags:", 8) == 0) {
            found = strstr(line, " uw") != NULL;
            break;
        }
    }
    fclose(f);
    return found;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "object", required_argument, NULL, 'o' },
        { "index", required_argument, NULL, 'i' },
        { "lifetime-ms", required_argument, NULL, 'l' },
        { "rate", required_argument, NULL, 'r' },
        { "tracked-lifetime-ms", required_argument, NULL, 't' },
        { NULL, 0, NULL, 0 },
    };
    const char *path = NULL;
    uint64_t index = UINT64_MAX, lifetime_ms = 30, tracked_ms = 0;
    double rate = 0;
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'o')
            path = optarg;
        else if (c == 'i')
            index = parse_u64("--index", optarg);
        else if (c == 'l')
            lifetime_ms = parse_u64("--lifetime-ms", optarg);
        else if (c == 'r')
            rate = parse_rate("--rate", optarg);
        else if (c == 't')
            tracked_ms = parse_u64("--tracked-lifetime-ms", optarg);
        else
            die(2, USAGE);
    }
    if (!path || index == UINT64_MAX)
        die(2, USAGE);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die(2, "open %s: %s", path, strerror(errno));
    uint64_t h[H_WORDS];
    struct wl_layout lay;
    if (pread(fd, h, sizeof h, 0) != (ssize_t)sizeof h || wl_layout_from_header(&lay, h) ||
        index >= lay.nwriters)
        die(2, "%s: not a workload object, or --index out of range", path);
    volatile uint64_t *all = mmap(NULL, lay.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (all == MAP_FAILED)
        die(1, "mmap: %s", strerror(errno));
    close(fd);
    struct wl_writer w;
    wl_view_of_whole(&w.views[0], all, &lay, index);
    wl_writer_init(&w, &lay, index, 1, (uint64_t)getpid());
    printf("ready pid=%d index=%" PRIu64 "\n", getpid(), index);
    fflush(stdout);
    for (;;) { /* one generation */
        const uint64_t born = now_ns(), ops0 = w.ops;
        const uint64_t life_ms = tracked_ms && wp_registered((const void *)all) ? tracked_ms
                                                                             : lifetime_ms;
        while (now_ns() - born < life_ms * 1000000ULL) {
            if (wl_stopped(&w))
                return 0;
            if (rate > 0)
                sleep_until_ns(born + (uint64_t)((double)(w.ops - ops0) * 1e9 / rate));
            if (wl_step(&w))
                return 1;
        }
        pid_t child = fork();
        if (child < 0)
            die(1, "fork: %s", strerror(errno));
        if (child > 0)
            _exit(0); /* the successor carries on */
        wl_writer_init(&w, &lay, index, 1, (uint64_t)getpid()); /* resume from the counter */
    }
}
