/*
 * writer — the native writer of the consistency-checker workload (docs/workload.md).
 *
 * An ordinary program that knows nothing about uffdsnap: it maps a shared-memory object that
 * uffdsnap.workload.create_object() laid out, and loops over steps until the header's stop word is
 * set (or --max-ops steps are done). Step k of writer i:
 *   a) read every writer j's published seq into obs[j];
 *   b) fill data page p(k) = (k*A_i + B_i) mod D with stamp(i, k), one aligned u64 store at a
 *      time, front to back;
 *   c) write the counter page's observation entries (value, then step tag) front to back, then
 *      publish seq = k last (release store; x86 TSO keeps the order for other CPUs).
 * The layout and the A_i, B_i, stamp formulas must match uffdsnap/workload.py exactly.
 *
 * Usage: writer --object PATH --index I [--rate OPS_PER_SEC] [--max-ops N] [--map-twice]
 *               [--partial]
 * Prints "ready pid=P index=I seq=S" (flushed) once mapped, and "done seq=S ops=N" at exit.
 * Exit status: 0 done, 1 runtime error, 2 usage error or an object that is not a workload.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define WL_MAGIC 0x4C5750414E534655ULL /* the bytes "UFSNAPWL", little-endian */
#define WL_VERSION 1
#define WL_STAMP_TAG 0xA5ULL
#define WL_STEP_BITS 40
#define WL_STEP_MAX ((1ULL << WL_STEP_BITS) - 1)
#define WL_MAX_WRITERS 252
#define WL_IMPL_C 1

/* Header words (page 0). */
enum { H_MAGIC, H_VERSION, H_NWRITERS, H_DATA_PAGES, H_PAGE_SIZE, H_STOP, H_WORDS };
/* Counter page words; entry j is the pair (value, step) at C_OBS + 2j. */
enum { C_SEQ = 0, C_IMPL = 1, C_PID = 2, C_OBS = 8 };

struct view {
    volatile uint64_t *hdr;
    volatile uint64_t *ctr[WL_MAX_WRITERS];
    volatile uint64_t *data; /* this writer's D data pages */
};

static void die(int status, const char *fmt, ...)
{
    va_list ap;
    fputs("writer: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(status);
}

static uint64_t multiplier(uint64_t i, uint64_t d)
{
    return ((((2 * i + 1) * 0x9E3779B97F4A7C15ULL) >> 32) | 1) & (d - 1);
}

static uint64_t addend(uint64_t i, uint64_t d)
{
    return (((i + 1) * 0xC2B2AE3D27D4EB4FULL) >> 32) & (d - 1);
}

static uint64_t stamp(uint64_t i, uint64_t k)
{
    return WL_STAMP_TAG << 56 | i << WL_STEP_BITS | k;
}

static volatile uint64_t *map_range(int fd, uint64_t off, uint64_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)off);
    if (p == MAP_FAILED)
        die(1, "mmap(offset=%" PRIu64 ", len=%" PRIu64 "): %s", off, len, strerror(errno));
    return p;
}

static uint64_t parse_u64(const char *opt, const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-')
        die(2, "%s: not a non-negative integer: %s", opt, s);
    return v;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void sleep_until_ns(uint64_t t)
{
    struct timespec ts = { .tv_sec = (time_t)(t / 1000000000ULL),
                           .tv_nsec = (long)(t % 1000000000ULL) };
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static void usage(void)
{
    fputs("usage: writer --object PATH --index I [--rate OPS_PER_SEC] [--max-ops N]"
          " [--map-twice] [--partial]\n", stderr);
    exit(2);
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
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    const char *path = NULL;
    uint64_t index = UINT64_MAX, max_ops = 0;
    double rate = 0;
    int twice = 0, partial = 0, c;

    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'o': path = optarg; break;
        case 'i': index = parse_u64("--index", optarg); break;
        case 'm': max_ops = parse_u64("--max-ops", optarg); break;
        case 't': twice = 1; break;
        case 'p': partial = 1; break;
        case 'r': {
            char *end;
            rate = strtod(optarg, &end);
            if (end == optarg || *end || !(rate >= 0))
                die(2, "--rate: not a non-negative number: %s", optarg);
            break;
        }
        default: usage();
        }
    }
    if (!path || index == UINT64_MAX || optind != argc)
        usage();

    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die(2, "open %s: %s", path, strerror(errno));
    /* Read the header with pread (works for shmem and hugetlbfs alike), then map. */
    uint64_t h[H_WORDS];
    if (pread(fd, h, sizeof h, 0) != (ssize_t)sizeof h)
        die(2, "%s: cannot read the workload header", path);
    const uint64_t n = h[H_NWRITERS], d = h[H_DATA_PAGES], ps = h[H_PAGE_SIZE];
    if (h[H_MAGIC] != WL_MAGIC || h[H_VERSION] != WL_VERSION)
        die(2, "%s: not a workload object (bad magic or version)", path);
    if (n == 0 || n > WL_MAX_WRITERS || d == 0 || (d & (d - 1)) || ps < 4096 || (ps & (ps - 1))
        || C_OBS + 2 * n > ps / 8)
        die(2, "%s: bad header (nwriters=%" PRIu64 " data_pages=%" PRIu64 " page_size=%" PRIu64
               ")", path, n, d, ps);
    if (index >= n)
        die(2, "--index %" PRIu64 " out of range: the object has %" PRIu64 " writers", index, n);
    const uint64_t region = (1 + d) * ps, size = ps + n * region;
    struct stat st;
    if (fstat(fd, &st) || (uint64_t)st.st_size < size)
        die(2, "%s: object is smaller than its header says (%" PRIu64 " bytes)", path, size);

    /* One or two complete views of the object, each one whole mapping or (--partial) a mapping
     * per page range this writer touches: header, every counter page, its own region. */
    struct view views[2];
    const int nviews = twice ? 2 : 1;
    for (int v = 0; v < nviews; v++) {
        struct view *w = &views[v];
        volatile uint64_t *own;
        if (partial) {
            w->hdr = map_range(fd, 0, ps);
            for (uint64_t j = 0; j < n; j++)
                if (j != index)
                    w->ctr[j] = map_range(fd, ps + j * region, ps);
            own = map_range(fd, ps + index * region, region);
        } else {
            volatile uint64_t *all = map_range(fd, 0, size);
            w->hdr = all;
            for (uint64_t j = 0; j < n; j++)
                w->ctr[j] = all + (ps + j * region) / 8;
            own = all + (ps + index * region) / 8;
        }
        w->ctr[index] = own;
        w->data = own + ps / 8;
    }
    close(fd);

    const uint64_t a = multiplier(index, d), b = addend(index, d), words = ps / 8;
    volatile uint64_t *mine = views[0].ctr[index];
    uint64_t seq = mine[C_SEQ]; /* resume where a previous writer i left off */
    uint64_t obs[WL_MAX_WRITERS];
    mine[C_IMPL] = WL_IMPL_C;
    mine[C_PID] = (uint64_t)getpid();
    printf("ready pid=%d index=%" PRIu64 " seq=%" PRIu64 "\n", (int)getpid(), index, seq);
    fflush(stdout);

    const uint64_t start = now_ns();
    uint64_t ops = 0;
    while (!views[0].hdr[H_STOP] && (max_ops == 0 || ops < max_ops) && seq < WL_STEP_MAX) {
        if (rate > 0)
            sleep_until_ns(start + (uint64_t)((double)ops * 1e9 / rate));
        const uint64_t k = seq + 1;
        const struct view *w = &views[k % nviews];
        for (uint64_t j = 0; j < n; j++) /* a) */
            obs[j] = __atomic_load_n(&w->ctr[j][C_SEQ], __ATOMIC_ACQUIRE);
        volatile uint64_t *page = w->data + ((k * a + b) & (d - 1)) * words; /* b) */
        const uint64_t s = stamp(index, k);
        for (uint64_t x = 0; x < words; x++)
            page[x] = s;
        volatile uint64_t *ctr = w->ctr[index]; /* c) */
        for (uint64_t j = 0; j < n; j++) {
            ctr[C_OBS + 2 * j] = obs[j];
            ctr[C_OBS + 2 * j + 1] = k;
        }
        __atomic_store_n(&ctr[C_SEQ], k, __ATOMIC_RELEASE);
        seq = k;
        ops++;
    }
    printf("done seq=%" PRIu64 " ops=%" PRIu64 "\n", seq, ops);
    return fflush(stdout) ? 1 : 0;
}
