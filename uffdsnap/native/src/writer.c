/*
 * writer — the native writer of the consistency-checker workload (docs/workload.md).
 *
 * An ordinary program that knows nothing about uffdsnap: it maps a shared-memory object that
 * uffdsnap.workload.create_object() laid out, and loops over steps (workload.h) until the
 * header's stop word is set (or --max-ops steps are done).
 *
 * Usage: writer --object PATH --index I [--rate OPS_PER_SEC] [--max-ops N] [--map-twice]
 *               [--partial] [--threads T [--leader-exits]] [--readonly-view]
 * With --threads T the process runs T writers, indexes I..I+T-1, one per thread (the main thread
 * is writer I); --rate and --max-ops apply to each. Without --partial they share the process's
 * mapping(s) of the object; with it each thread maps the pages it touches itself.
 * With --leader-exits every writer gets a thread of its own and the main thread pthread_exit()s,
 * as some programs do: the process lives on with a zombie thread-group leader, whose
 * /proc/PID/maps reads empty. "ready" then waits until that is so.
 * With --readonly-view the process also maps the whole object read-only through a second,
 * O_RDONLY descriptor (a mapping that can never be written) and watches the stop word there too.
 * Prints "ready pid=P index=I seq=S" (with " threads=T" if T > 1; flushed) once every thread has
 * mapped the object, and at exit "done seq=S ops=N" (one thread) or "done index=I seq=S ops=N"
 * per thread.
 * Exit status: 0 done, 1 runtime error, 2 usage error or an object that is not a workload.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define HELPER_NAME "writer"
#define HELPER_INT_BASE 10
#include "util.h"

#include "workload.h"

#define MAX_THREADS 64

struct thread {
    pthread_t tid;
    struct wl_writer w;
};

static struct {
    int fd;
    struct wl_layout lay;
    int twice, partial, leader_exits, readonly_view;
    volatile const uint64_t *ro; /* --readonly-view */
    double rate;
    uint64_t max_ops, index, nthreads;
    volatile uint64_t *whole[2]; /* shared whole-object mappings (not with --partial) */
    pthread_barrier_t ready;
    pthread_t leader;
    struct thread *first;
    pthread_mutex_t out;
} g = { .out = PTHREAD_MUTEX_INITIALIZER };

static volatile uint64_t *map_range(uint64_t off, uint64_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, g.fd, (off_t)off);
    if (p == MAP_FAILED)
        die(1, "mmap(offset=%" PRIu64 ", len=%" PRIu64 "): %s", off, len, strerror(errno));
    return p;
}

static void usage(void)
{
    fputs("usage: writer --object PATH --index I [--rate OPS_PER_SEC] [--max-ops N]"
          " [--map-twice] [--partial] [--threads T [--leader-exits]] [--readonly-view]\n",
          stderr);
    exit(2);
}

/* Writer `index`'s views: of the shared whole mappings, or (--partial) a mapping per page range
 * it touches: header, every other writer's counter page, its own region. */
static void setup_writer(struct wl_writer *w, uint64_t index)
{
    const struct wl_layout *lay = &g.lay;
    const int nviews = g.twice ? 2 : 1;
    for (int v = 0; v < nviews; v++) {
        struct wl_view *view = &w->views[v];
        if (!g.partial) {
            wl_view_of_whole(view, g.whole[v], lay, index);
            continue;
        }
        view->hdr = map_range(0, lay->page_size);
        for (uint64_t j = 0; j < lay->nwriters; j++)
            if (j != index)
                view->ctr[j] = map_range(lay->page_size + j * lay->region, lay->page_size);
        view->ctr[index] = map_range(lay->page_size + index * lay->region, lay->region);
        view->data = view->ctr[index] + lay->page_size / 8;
    }
    wl_writer_init(w, lay, index, nviews, (uint64_t)getpid());
}

/* Step until stopped, --max-ops or the end of the step counter. */
static void run_writer(struct wl_writer *w)
{
    const uint64_t start = now_ns();
    while (!wl_stopped(w) && !(g.ro && g.ro[H_STOP])
           && (g.max_ops == 0 || w->ops < g.max_ops)) {
        if (g.rate > 0)
            sleep_until_ns(start + (uint64_t)((double)w->ops * 1e9 / g.rate));
        if (wl_step(w))
            break;
    }
}

/* --leader-exits: wait until the main thread has exited and /proc/self/maps (the leader's view)
 * reads empty, so whoever reads "ready" sees the process as it will stay. */
static void wait_for_leader_exit(void)
{
    pthread_join(g.leader, NULL);
    for (int tries = 0; tries < 10000; tries++) {
        char c;
        int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
        ssize_t n = fd < 0 ? -1 : read(fd, &c, 1);
        if (fd >= 0)
            close(fd);
        if (n == 0)
            return;
        usleep(1000);
    }
    die(1, "--leader-exits: /proc/self/maps still readable 10 s after the main thread exited");
}

static void *thread_main(void *arg)
{
    struct thread *t = arg;
    if (t == g.first) {
        if (g.leader_exits)
            wait_for_leader_exit();
        printf("ready pid=%d index=%" PRIu64 " seq=%" PRIu64, (int)getpid(), g.index, t->w.seq);
        if (g.nthreads > 1)
            printf(" threads=%" PRIu64, g.nthreads);
        printf("\n");
        fflush(stdout);
    }
    pthread_barrier_wait(&g.ready);
    run_writer(&t->w);
    if (g.leader_exits) { /* no main thread to report for us */
        pthread_mutex_lock(&g.out);
        printf("done index=%" PRIu64 " seq=%" PRIu64 " ops=%" PRIu64 "\n", t->w.index, t->w.seq,
               t->w.ops);
        fflush(stdout);
        pthread_mutex_unlock(&g.out);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "object", required_argument, NULL, 'o' },
        { "index", required_argument, NULL, 'i' },
        { "rate", required_argument, NULL, 'r' },
        { "max-ops", required_argument, NULL, 'm' },
        { "map-twice", no_argument, NULL, 't' },
        { "partial", no_argument, NULL, 'p' },
        { "threads", required_argument, NULL, 'T' },
        { "leader-exits", no_argument, NULL, 'L' },
        { "readonly-view", no_argument, NULL, 'R' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    const char *path = NULL;
    uint64_t index = UINT64_MAX, nthreads = 1;
    int c;

    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'o': path = optarg; break;
        case 'i': index = parse_u64("--index", optarg); break;
        case 'm': g.max_ops = parse_u64("--max-ops", optarg); break;
        case 't': g.twice = 1; break;
        case 'L': g.leader_exits = 1; break;
        case 'R': g.readonly_view = 1; break;
        case 'p': g.partial = 1; break;
        case 'T':
            nthreads = parse_u64("--threads", optarg);
            if (nthreads < 1 || nthreads > MAX_THREADS)
                die(2, "--threads: not in 1..%d: %s", MAX_THREADS, optarg);
            break;
        case 'r': g.rate = parse_rate("--rate", optarg); break;
        default: usage();
        }
    }
    if (!path || index == UINT64_MAX || optind != argc)
        usage();

    g.fd = open(path, O_RDWR | O_CLOEXEC);
    if (g.fd < 0)
        die(2, "open %s: %s", path, strerror(errno));
    /* Read the header with pread (works for shmem and hugetlbfs alike), then map. */
    uint64_t h[H_WORDS];
    if (pread(g.fd, h, sizeof h, 0) != (ssize_t)sizeof h)
        die(2, "%s: cannot read the workload header", path);
    const char *bad = wl_layout_from_header(&g.lay, h);
    if (bad)
        die(2, "%s: bad header (nwriters=%" PRIu64 " data_pages=%" PRIu64 " page_size=%" PRIu64
               "): %s", path, h[H_NWRITERS], h[H_DATA_PAGES], h[H_PAGE_SIZE], bad);
    if (index >= g.lay.nwriters || nthreads > g.lay.nwriters - index)
        die(2, "--index %" PRIu64 " --threads %" PRIu64 " out of range: the object has %" PRIu64
               " writers", index, nthreads, g.lay.nwriters);
    struct stat st;
    if (fstat(g.fd, &st) || (uint64_t)st.st_size < g.lay.size)
        die(2, "%s: object is smaller than its header says (%" PRIu64 " bytes)", path,
            g.lay.size);
    if (!g.partial)
        for (int v = 0; v < (g.twice ? 2 : 1); v++)
            g.whole[v] = map_range(0, g.lay.size);
    if (g.readonly_view) {
        int rfd = open(path, O_RDONLY | O_CLOEXEC);
        void *p = rfd < 0 ? MAP_FAILED : mmap(NULL, g.lay.size, PROT_READ, MAP_SHARED, rfd, 0);
        if (p == MAP_FAILED)
            die(1, "--readonly-view: %s", strerror(errno));
        close(rfd);
        g.ro = p;
    }

    static struct thread threads[MAX_THREADS];
    for (uint64_t t = 0; t < nthreads; t++)
        setup_writer(&threads[t].w, index + t);
    close(g.fd);
    g.index = index;
    g.nthreads = nthreads;
    g.first = &threads[0];
    g.leader = pthread_self();
    if (pthread_barrier_init(&g.ready, NULL, (unsigned)nthreads))
        die(1, "pthread_barrier_init failed");
    for (uint64_t t = g.leader_exits ? 0 : 1; t < nthreads; t++) {
        int err = pthread_create(&threads[t].tid, NULL, thread_main, &threads[t]);
        if (err)
            die(1, "pthread_create: %s", strerror(err));
    }
    if (g.leader_exits)
        pthread_exit(NULL); /* the last writer thread to finish ends the process, status 0 */
    thread_main(&threads[0]);
    for (uint64_t t = 1; t < nthreads; t++)
        pthread_join(threads[t].tid, NULL);

    if (nthreads == 1)
        printf("done seq=%" PRIu64 " ops=%" PRIu64 "\n", threads[0].w.seq, threads[0].w.ops);
    else
        for (uint64_t t = 0; t < nthreads; t++)
            printf("done index=%" PRIu64 " seq=%" PRIu64 " ops=%" PRIu64 "\n",
                   threads[t].w.index, threads[t].w.seq, threads[t].w.ops);
    return fflush(stdout) ? 1 : 0;
}
