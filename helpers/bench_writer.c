/*
 * bench_writer — the timing writer of `uffdsnap bench` (docs/benchmarks.md).
 *
 * Maps a shared-memory object (MAP_SHARED, whole size) and writes it page by page, timing every
 * write with clock_gettime(CLOCK_MONOTONIC) on both sides, until SIGTERM/SIGINT or --max-seconds.
 * One operation writes --bytes bytes (default 4096, a whole 4 KiB page) at a 4 KiB-aligned offset
 * chosen at random (default) or in sequence.
 *
 * What it measures, per operation:
 *   store latency  t_after_store - t_before_store (the write alone: a write-protect fault shows
 *                  up here whole, from the store to the writer's resumption);
 *   stall          t_after_store - t_scheduled, where t_scheduled is when the operation was due
 *                  (with --rate) or when the previous one finished (without): a stop (SIGSTOP)
 *                  or a preemption between stores shows up here too.
 * With --rate a writer that falls more than 1 ms behind schedule skips the missed operations
 * instead of bursting, so a stall costs throughput and is recorded once, at its full length.
 *
 * What it records (per thread, merged at exit into --log FILE):
 *   intervals      per --interval-us bucket since start: operations completed, longest stall;
 *   slow           (t_scheduled, stall) of every operation whose stall >= --slow-ns;
 *   wp             with --probe-wp, (t_before_store, store latency) of every write whose page
 *                  /proc/self/pagemap showed write-protected by userfaultfd (bit 57) just before
 *                  the store: exactly the writes that took a write-protect fault.
 *
 * Other modes:
 *   --fill         write a non-zero pattern over every page of the object, then exit (so the
 *                  object is all data and a copy cannot skip zero pages).
 *   --idle         map (and --prefault) the object, then only wait for SIGTERM.
 *   --uffd-sock P  after mapping, create a userfaultfd for this process, send it to the native
 *                  reference handler (bench_handler) at Unix socket P with the mapping's address
 *                  and length (SCM_RIGHTS), close our copy, and wait for its "ok".
 *
 * Prints "ready pid=P" (flushed) when it is about to write, "done ops=N" at exit.
 * Exit status: 0 done, 1 runtime error, 2 usage error. Dies with its parent (PR_SET_PDEATHSIG).
 *
 * Log format (all little-endian u64): magic "UFBWLOG1", then the header words below, then
 * n_intervals pairs (ops, max_stall_ns), n_slow pairs (t_ns, stall_ns), n_wp pairs
 * (t_ns, latency_ns). Parsed by uffdsnap/bench/writerlog.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define HELPER_NAME "bench_writer"
#include "util.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#define USERFAULTFD_IOC_NEW 0xAA00
#define PM_UFFD_WP (1ULL << 57)
#define MAX_THREADS 64
#define SLOW_CAP (1u << 20)
#define WP_CAP (1u << 20)
#define BEHIND_RESET_NS 1000000ULL

enum { HDR_VERSION, HDR_PID, HDR_START_NS, HDR_INTERVAL_NS, HDR_N_INTERVALS, HDR_N_SLOW,
       HDR_N_WP, HDR_OPS, HDR_SLOW_NS, HDR_DROPPED_SLOW, HDR_DROPPED_WP, HDR_THREADS,
       HDR_WORDS };

struct pair { uint64_t a, b; };

struct thread {
    pthread_t tid;
    unsigned index;
    uint64_t rng;
    uint64_t ops;
    struct pair *intervals; /* (ops, max stall) per interval */
    uint64_t n_intervals;   /* highest interval used + 1 */
    struct pair *slow;
    uint64_t n_slow, dropped_slow;
    struct pair *wp;
    uint64_t n_wp, dropped_wp;
};

static struct {
    const char *path, *log, *uffd_sock;
    int fill, idle, prefault, probe, sequential;
    double rate; /* per thread, ops/s; 0 = as fast as possible */
    unsigned nthreads;
    uint64_t bytes, slow_ns, interval_ns, max_intervals, max_seconds, seed;
    int fd, pagemap;
    uint8_t *base;
    uint64_t size, npages; /* npages: 4 KiB pages */
    uint64_t start_ns;
} g = { .nthreads = 1, .bytes = 4096, .slow_ns = 100000, .interval_ns = 1000000,
        .max_seconds = 600, .seed = 1, .fd = -1, .pagemap = -1 };

static volatile sig_atomic_t stop;

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static void *alloc_zeroed(uint64_t bytes)
{
    /* Anonymous memory: untouched pages cost nothing, so generous caps are free. */
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        die(1, "mmap %" PRIu64 " bytes of log buffer: %s", bytes, strerror(errno));
    return p;
}

static int page_is_wp(uint64_t page)
{
    uint64_t entry = 0;
    uintptr_t vpage = ((uintptr_t)g.base >> 12) + page;
    if (pread(g.pagemap, &entry, sizeof entry, (off_t)(vpage * sizeof entry)) != sizeof entry)
        return 0;
    return (entry & PM_UFFD_WP) != 0;
}

static void record(struct thread *t, uint64_t sched, uint64_t before, uint64_t after, int wp)
{
    uint64_t stall = after - sched;
    uint64_t slot = (after - g.start_ns) / g.interval_ns;
    if (slot >= g.max_intervals)
        slot = g.max_intervals - 1;
    struct pair *iv = &t->intervals[slot];
    iv->a++;
    if (stall > iv->b)
        iv->b = stall;
    if (slot + 1 > t->n_intervals)
        t->n_intervals = slot + 1;
    if (stall >= g.slow_ns) {
        if (t->n_slow < SLOW_CAP)
            t->slow[t->n_slow++] = (struct pair){ sched, stall };
        else
            t->dropped_slow++;
    }
    if (wp) {
        if (t->n_wp < WP_CAP)
            t->wp[t->n_wp++] = (struct pair){ before, after - before };
        else
            t->dropped_wp++;
    }
}

static void *run_thread(void *arg)
{
    struct thread *t = arg;
    const uint64_t period = g.rate > 0 ? (uint64_t)(1e9 / g.rate) : 0;
    const uint64_t deadline = g.start_ns + g.max_seconds * 1000000000ULL;
    const uint64_t span = g.bytes > 4096 ? (g.bytes + 4095) / 4096 : 1;
    const uint64_t slots = g.npages >= span ? g.npages - span + 1 : 1;
    uint64_t next = now_ns(), prev_end = next, seq = t->index * (slots / g.nthreads);
    uint8_t value = 1;

    while (!stop) {
        uint64_t sched;
        if (period) {
            uint64_t now = now_ns();
            if (now < next)
                sleep_until_ns(next);
            sched = next; /* the stall is measured from when this write was due ... */
            if (now > next + BEHIND_RESET_NS)
                next = now; /* ... but after one, skip the missed writes instead of bursting */
            next += period;
        } else {
            sched = prev_end;
        }
        uint64_t page = g.sequential ? seq++ % slots : xorshift(&t->rng) % slots;
        int wp = g.probe && page_is_wp(page);
        uint64_t before = now_ns();
        __asm__ volatile("" ::: "memory");
        memset(g.base + page * 4096, value, g.bytes);
        __asm__ volatile("" ::: "memory");
        uint64_t after = now_ns();
        value = (uint8_t)(value % 255 + 1);
        t->ops++;
        record(t, sched, before, after, wp);
        prev_end = after;
        if (after >= deadline)
            break;
    }
    return NULL;
}

static void fill_object(void)
{
    /* A non-zero pattern, different per page, so nothing copies as a hole or a zero block. */
    for (uint64_t p = 0; p < g.size / 4096; p++) {
        uint64_t *w = (uint64_t *)(g.base + p * 4096);
        for (int i = 0; i < 512; i++)
            w[i] = (p << 16) ^ (uint64_t)i ^ 0x5A5A000000000000ULL;
    }
}

static void send_uffd(void)
{
    int uffd = (int)syscall(SYS_userfaultfd, O_NONBLOCK | O_CLOEXEC);
    if (uffd < 0) {
        int err = errno;
        int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (dev < 0)
            die(1, "userfaultfd: %s (and /dev/userfaultfd: %s)", strerror(err),
                strerror(errno));
        uffd = ioctl(dev, USERFAULTFD_IOC_NEW, O_NONBLOCK | O_CLOEXEC);
        if (uffd < 0)
            die(1, "USERFAULTFD_IOC_NEW: %s", strerror(errno));
        close(dev);
    }
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (strlen(g.uffd_sock) >= sizeof addr.sun_path)
        die(2, "--uffd-sock path too long: %s", g.uffd_sock);
    strcpy(addr.sun_path, g.uffd_sock);
    if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof addr))
        die(1, "connect %s: %s", g.uffd_sock, strerror(errno));
    uint64_t msg[3] = { (uint64_t)(uintptr_t)g.base, g.size, (uint64_t)getpid() };
    char cbuf[CMSG_SPACE(sizeof(int))];
    memset(cbuf, 0, sizeof cbuf);
    struct iovec iov = { msg, sizeof msg };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                         .msg_controllen = sizeof cbuf };
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &uffd, sizeof(int));
    if (sendmsg(s, &mh, 0) != (ssize_t)sizeof msg)
        die(1, "sendmsg to %s: %s", g.uffd_sock, strerror(errno));
    close(uffd); /* the handler holds the only reference: its exit releases us */
    char reply[64] = { 0 };
    ssize_t n = read(s, reply, sizeof reply - 1);
    if (n < 2 || strncmp(reply, "ok", 2) != 0)
        die(1, "handler at %s did not accept the userfaultfd: %s", g.uffd_sock,
            n > 0 ? reply : "no answer");
    close(s);
}

static void write_all(FILE *f, const void *p, size_t n)
{
    if (n && fwrite(p, 1, n, f) != n)
        die(1, "writing %s: %s", g.log, strerror(errno));
}

static void write_log(struct thread *threads)
{
    uint64_t n_iv = 0, n_slow = 0, n_wp = 0, ops = 0, dslow = 0, dwp = 0;
    for (unsigned i = 0; i < g.nthreads; i++) {
        struct thread *t = &threads[i];
        if (t->n_intervals > n_iv)
            n_iv = t->n_intervals;
        n_slow += t->n_slow;
        n_wp += t->n_wp;
        ops += t->ops;
        dslow += t->dropped_slow;
        dwp += t->dropped_wp;
    }
    for (unsigned i = 1; i < g.nthreads; i++) /* merge intervals into thread 0's */
        for (uint64_t s = 0; s < threads[i].n_intervals; s++) {
            threads[0].intervals[s].a += threads[i].intervals[s].a;
            if (threads[i].intervals[s].b > threads[0].intervals[s].b)
                threads[0].intervals[s].b = threads[i].intervals[s].b;
        }
    FILE *f = fopen(g.log, "wb");
    if (!f)
        die(1, "open %s: %s", g.log, strerror(errno));
    uint64_t hdr[HDR_WORDS] = {
        [HDR_VERSION] = 1, [HDR_PID] = (uint64_t)getpid(), [HDR_START_NS] = g.start_ns,
        [HDR_INTERVAL_NS] = g.interval_ns, [HDR_N_INTERVALS] = n_iv, [HDR_N_SLOW] = n_slow,
        [HDR_N_WP] = n_wp, [HDR_OPS] = ops, [HDR_SLOW_NS] = g.slow_ns,
        [HDR_DROPPED_SLOW] = dslow, [HDR_DROPPED_WP] = dwp, [HDR_THREADS] = g.nthreads,
    };
    write_all(f, "UFBWLOG1", 8);
    write_all(f, hdr, sizeof hdr);
    write_all(f, threads[0].intervals, n_iv * sizeof(struct pair));
    for (unsigned i = 0; i < g.nthreads; i++)
        write_all(f, threads[i].slow, threads[i].n_slow * sizeof(struct pair));
    for (unsigned i = 0; i < g.nthreads; i++)
        write_all(f, threads[i].wp, threads[i].n_wp * sizeof(struct pair));
    if (fclose(f))
        die(1, "closing %s: %s", g.log, strerror(errno));
}

static void usage(void)
{
    fputs("usage: bench_writer --object PATH [--fill | --idle] [--prefault] [--rate OPS]\n"
          "         [--threads N] [--sequential] [--bytes N] [--probe-wp] [--slow-ns NS]\n"
          "         [--interval-us US] [--max-seconds S] [--seed N] [--log FILE]\n"
          "         [--uffd-sock PATH]\n", stderr);
    exit(2);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "object", required_argument, NULL, 'o' },
        { "fill", no_argument, NULL, 'F' },
        { "idle", no_argument, NULL, 'I' },
        { "prefault", no_argument, NULL, 'P' },
        { "rate", required_argument, NULL, 'r' },
        { "threads", required_argument, NULL, 'T' },
        { "sequential", no_argument, NULL, 'S' },
        { "bytes", required_argument, NULL, 'b' },
        { "probe-wp", no_argument, NULL, 'w' },
        { "slow-ns", required_argument, NULL, 's' },
        { "interval-us", required_argument, NULL, 'i' },
        { "max-seconds", required_argument, NULL, 'm' },
        { "seed", required_argument, NULL, 'e' },
        { "log", required_argument, NULL, 'l' },
        { "uffd-sock", required_argument, NULL, 'u' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'o': g.path = optarg; break;
        case 'F': g.fill = 1; break;
        case 'I': g.idle = 1; break;
        case 'P': g.prefault = 1; break;
        case 'S': g.sequential = 1; break;
        case 'w': g.probe = 1; break;
        case 'l': g.log = optarg; break;
        case 'u': g.uffd_sock = optarg; break;
        case 'b': g.bytes = parse_u64("--bytes", optarg); break;
        case 's': g.slow_ns = parse_u64("--slow-ns", optarg); break;
        case 'i': g.interval_ns = parse_u64("--interval-us", optarg) * 1000; break;
        case 'm': g.max_seconds = parse_u64("--max-seconds", optarg); break;
        case 'e': g.seed = parse_u64("--seed", optarg); break;
        case 'T': {
            uint64_t n = parse_u64("--threads", optarg);
            if (n < 1 || n > MAX_THREADS)
                die(2, "--threads: not in 1..%d: %s", MAX_THREADS, optarg);
            g.nthreads = (unsigned)n;
            break;
        }
        case 'r': g.rate = parse_rate("--rate", optarg); break;
        default: usage();
        }
    }
    if (!g.path || optind != argc || (!g.fill && !g.idle && !g.log))
        usage();
    if (g.bytes < 1 || g.interval_ns < 1000 || g.max_seconds < 1)
        die(2, "--bytes, --interval-us and --max-seconds must be positive");
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() == 1)
        die(1, "parent already gone");

    g.fd = open(g.path, O_RDWR | O_CLOEXEC);
    if (g.fd < 0)
        die(2, "open %s: %s", g.path, strerror(errno));
    struct stat st;
    if (fstat(g.fd, &st))
        die(1, "fstat %s: %s", g.path, strerror(errno));
    g.size = (uint64_t)st.st_size;
    g.npages = g.size / 4096;
    if (g.npages == 0 || g.bytes > g.size)
        die(2, "%s: object of %" PRIu64 " bytes is too small", g.path, g.size);
    g.base = mmap(NULL, g.size, PROT_READ | PROT_WRITE, MAP_SHARED, g.fd, 0);
    if (g.base == MAP_FAILED)
        die(1, "mmap %s (%" PRIu64 " bytes): %s", g.path, g.size, strerror(errno));
    close(g.fd);
    if (g.fill) {
        fill_object();
        printf("filled %" PRIu64 "\n", g.size);
        return fflush(stdout) ? 1 : 0;
    }
    if (g.prefault && madvise(g.base, g.size, MADV_POPULATE_WRITE))
        die(1, "madvise(MADV_POPULATE_WRITE): %s", strerror(errno));
    if (g.probe) {
        g.pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
        if (g.pagemap < 0)
            die(1, "open /proc/self/pagemap: %s", strerror(errno));
    }

    struct sigaction sa = { .sa_handler = on_signal };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    if (g.uffd_sock)
        send_uffd();

    if (g.idle) {
        printf("ready pid=%d\n", (int)getpid());
        fflush(stdout);
        while (!stop)
            pause();
        printf("done ops=0\n");
        return fflush(stdout) ? 1 : 0;
    }

    g.max_intervals = g.max_seconds * 1000000000ULL / g.interval_ns + 1;
    static struct thread threads[MAX_THREADS];
    g.start_ns = now_ns();
    for (unsigned i = 0; i < g.nthreads; i++) {
        threads[i].index = i;
        threads[i].rng = (g.seed * 0x9E3779B97F4A7C15ULL) ^ ((uint64_t)getpid() << 20) ^
                         (i + 1) * 0xC2B2AE3D27D4EB4FULL;
        if (!threads[i].rng)
            threads[i].rng = 1;
        threads[i].intervals = alloc_zeroed(g.max_intervals * sizeof(struct pair));
        threads[i].slow = alloc_zeroed(SLOW_CAP * sizeof(struct pair));
        threads[i].wp = alloc_zeroed(WP_CAP * sizeof(struct pair));
    }
    printf("ready pid=%d\n", (int)getpid());
    fflush(stdout);
    for (unsigned i = 1; i < g.nthreads; i++) {
        int err = pthread_create(&threads[i].tid, NULL, run_thread, &threads[i]);
        if (err)
            die(1, "pthread_create: %s", strerror(err));
    }
    run_thread(&threads[0]);
    stop = 1;
    for (unsigned i = 1; i < g.nthreads; i++)
        pthread_join(threads[i].tid, NULL);
    write_log(threads);
    uint64_t ops = 0;
    for (unsigned i = 0; i < g.nthreads; i++)
        ops += threads[i].ops;
    printf("done ops=%" PRIu64 "\n", ops);
    return fflush(stdout) ? 1 : 0;
}
