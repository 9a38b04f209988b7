/*
 * bench_handler — the native reference snapshot handler of `uffdsnap bench` (docs/benchmarks.md).
 *
 * The least a userfaultfd write-protect snapshot can do, in C, with no messages between
 * processes: the same save + un-protect that uffdsnap does, as the baseline its fault service
 * latency, start pause and copy throughput are measured against in the same run.
 *
 *   bench_handler --listen SOCK --procs N --object PATH --dest FILE [--chunk BYTES]
 *
 * 1. Accepts N bench_writer --uffd-sock SOCK connections; each sends its own userfaultfd
 *    (SCM_RIGHTS) and the address and length of its mapping of the whole object. UFFDIO_API is
 *    negotiated here (WP faults, WP on shmem/hugetlbfs) and "ok" is answered. Prints "ready".
 * 2. Waits for a line on stdin, then: UFFDIO_REGISTER (WP) and UFFDIO_WRITEPROTECT every
 *    process's mapping, back to back (the kernel protect time alone); that instant is T.
 * 3. Two threads until every page is saved:
 *    - faults: poll every uffd, read the faults, claim the page (atomic byte per page); if this
 *      thread claimed it, pread it from the object and pwrite it to FILE; then un-protect it in
 *      every process (UFFDIO_WRITEPROTECT mode 0, which wakes the writer);
 *    - scan: pread CHUNK bytes, claim the pages no fault has claimed, un-protect them
 *      everywhere, pwrite them. A page read before it is claimed is still protected
 *      everywhere, so what was read is its content at T (the rule uffdsnap's coordinator uses).
 * 4. Unregisters everything, prints one JSON object with the timings, exits (closing the uffds,
 *    which would release the writers anyway).
 * The object is never mapped here. Page size is the object's st_blksize (4 KiB shmem, the huge
 * page size on hugetlbfs). Dies with its parent (PR_SET_PDEATHSIG).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define HELPER_NAME "bench_handler"
#include "util.h"

/* Defined here: the system headers on these machines predate some of these names. */
#define UFFD_API 0xAAULL
#define UFFDIO_API_IOC 0xC018AA3FUL
#define UFFDIO_REGISTER_IOC 0xC020AA00UL
#define UFFDIO_UNREGISTER_IOC 0x8010AA01UL
#define UFFDIO_WRITEPROTECT_IOC 0xC018AA06UL
#define UFFDIO_WAKE_IOC 0x8010AA02UL
#define REGISTER_MODE_WP 2ULL
#define WRITEPROTECT_MODE_WP 1ULL
#define FEATURE_PAGEFAULT_FLAG_WP (1ULL << 0)
#define FEATURE_WP_HUGETLBFS_SHMEM (1ULL << 12)
#define EVENT_PAGEFAULT 0x12
#define MSG_SIZE 32
#define MAX_PROCS 256
#define SERVICE_CAP (1u << 20)

struct range { uint64_t start, len; };
struct api { uint64_t api, features, ioctls; };
struct reg { struct range range; uint64_t mode, ioctls; };
struct wp { struct range range; uint64_t mode; };

struct proc {
    int uffd;
    uint64_t base, len, pid, protect_ns;
};

static struct {
    const char *listen, *object, *dest;
    unsigned nprocs;
    uint64_t chunk;
    int obj, out;
    uint64_t size, page_size, npages;
    struct proc procs[MAX_PROCS];
    uint8_t *claimed;
    int done_pipe[2];
    /* fault thread statistics */
    uint64_t faults, saved_by_faults, duplicates, n_service;
    uint64_t *service;
    /* scan thread statistics */
    uint64_t bytes_scanned, t_copied;
} g = { .chunk = 1 << 20, .obj = -1, .out = -1 };

static void xioctl(int fd, unsigned long req, void *arg, const char *what, uint64_t start,
                   uint64_t len)
{
    while (ioctl(fd, req, arg) < 0) {
        if (errno == EINTR || errno == EAGAIN)
            continue;
        die(1, "%s(start=%#" PRIx64 ", len=%#" PRIx64 "): %s", what, start, len, strerror(errno));
    }
}

static void unprotect_everywhere(uint64_t off, uint64_t len)
{
    for (unsigned i = 0; i < g.nprocs; i++) {
        struct wp w = { { g.procs[i].base + off, len }, 0 };
        xioctl(g.procs[i].uffd, UFFDIO_WRITEPROTECT_IOC, &w, "UFFDIO_WRITEPROTECT",
               w.range.start, len);
    }
}

static void pread_all(void *buf, uint64_t len, uint64_t off)
{
    uint64_t done = 0;
    while (done < len) {
        ssize_t n = pread(g.obj, (char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die(1, "pread %s at %" PRIu64 ": %s", g.object, off + done, strerror(errno));
        if (n == 0) { /* the object shrank: zeros beyond its end */
            memset((char *)buf + done, 0, len - done);
            return;
        }
        done += (uint64_t)n;
    }
}

static void pwrite_all(const void *buf, uint64_t len, uint64_t off)
{
    uint64_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(g.out, (const char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die(1, "pwrite %s at %" PRIu64 ": %s", g.dest, off + done, strerror(errno));
        done += (uint64_t)n;
    }
}

static int claim(uint64_t page)
{
    return __atomic_exchange_n(&g.claimed[page], 1, __ATOMIC_ACQ_REL) == 0;
}

static void *scan_thread(void *arg)
{
    (void)arg;
    char *buf = aligned_alloc(4096, g.chunk);
    if (!buf)
        die(1, "out of memory for a %" PRIu64 "-byte chunk", g.chunk);
    for (uint64_t off = 0; off < g.size; off += g.chunk) {
        uint64_t len = g.size - off < g.chunk ? g.size - off : g.chunk;
        pread_all(buf, len, off);
        uint64_t first = off / g.page_size, last = (off + len) / g.page_size;
        uint64_t p = first;
        while (p < last) {
            while (p < last && !claim(p)) /* claimed by a fault already */
                p++;
            if (p == last)
                break;
            uint64_t end = p + 1; /* [p, end) is ours */
            while (end < last && claim(end))
                end++;
            uint64_t a = p * g.page_size, b = end * g.page_size;
            unprotect_everywhere(a, b - a);
            pwrite_all(buf + (a - off), b - a, a);
            p = end + 1; /* `end` was claimed by a fault (or is past the chunk) */
        }
        g.bytes_scanned += len;
    }
    g.t_copied = now_ns();
    free(buf);
    if (write(g.done_pipe[1], "x", 1) != 1)
        die(1, "write to pipe: %s", strerror(errno));
    return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void handle_faults(unsigned i, char *pagebuf)
{
    struct proc *pr = &g.procs[i];
    char msgs[MSG_SIZE * 64];
    for (;;) {
        ssize_t n = read(pr->uffd, msgs, sizeof msgs);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (n < 0)
            die(1, "read uffd of pid %" PRIu64 ": %s", pr->pid, strerror(errno));
        uint64_t t_read = now_ns();
        for (ssize_t m = 0; m + MSG_SIZE <= n; m += MSG_SIZE) {
            const char *msg = msgs + m;
            if ((uint8_t)msg[0] != EVENT_PAGEFAULT)
                continue;
            uint64_t addr;
            memcpy(&addr, msg + 16, sizeof addr);
            g.faults++;
            if (addr < pr->base || addr >= pr->base + pr->len) {
                uint64_t page = addr & ~(g.page_size - 1);
                struct range r = { page, g.page_size };
                xioctl(pr->uffd, UFFDIO_WAKE_IOC, &r, "UFFDIO_WAKE", page, g.page_size);
                continue;
            }
            uint64_t page = (addr - pr->base) / g.page_size;
            uint64_t off = page * g.page_size;
            if (claim(page)) {
                pread_all(pagebuf, g.page_size, off);
                pwrite_all(pagebuf, g.page_size, off);
                g.saved_by_faults++;
            } else {
                g.duplicates++; /* saved already, or being saved by the scan from its buffer */
            }
            unprotect_everywhere(off, g.page_size);
            if (g.n_service < SERVICE_CAP)
                g.service[g.n_service++] = now_ns() - t_read;
        }
    }
}

static void accept_writers(void)
{
    int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (strlen(g.listen) >= sizeof addr.sun_path)
        die(1, "--listen path too long: %s", g.listen);
    strcpy(addr.sun_path, g.listen);
    if (ls < 0 || bind(ls, (struct sockaddr *)&addr, sizeof addr) || listen(ls, MAX_PROCS))
        die(1, "listen on %s: %s", g.listen, strerror(errno));
    printf("listening\n");
    fflush(stdout);
    for (unsigned i = 0; i < g.nprocs; i++) {
        int s = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (s < 0)
            die(1, "accept: %s", strerror(errno));
        uint64_t msg[3];
        char cbuf[CMSG_SPACE(sizeof(int))];
        struct iovec iov = { msg, sizeof msg };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                             .msg_controllen = sizeof cbuf };
        if (recvmsg(s, &mh, MSG_CMSG_CLOEXEC | MSG_WAITALL) != (ssize_t)sizeof msg)
            die(1, "recvmsg from a writer: %s", strerror(errno));
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        if (!c || c->cmsg_type != SCM_RIGHTS)
            die(1, "a writer sent no userfaultfd");
        struct proc *pr = &g.procs[i];
        memcpy(&pr->uffd, CMSG_DATA(c), sizeof(int));
        pr->base = msg[0];
        pr->len = msg[1];
        pr->pid = msg[2];
        if (pr->len < g.size)
            die(1, "writer %" PRIu64 " maps %" PRIu64 " bytes of a %" PRIu64 "-byte object",
                pr->pid, pr->len, g.size);
        struct api a = { UFFD_API, FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_HUGETLBFS_SHMEM, 0 };
        xioctl(pr->uffd, UFFDIO_API_IOC, &a, "UFFDIO_API", 0, 0);
        if (write(s, "ok\n", 3) != 3)
            die(1, "answering writer %" PRIu64 ": %s", pr->pid, strerror(errno));
        close(s);
    }
    close(ls);
    unlink(g.listen);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "listen", required_argument, NULL, 'l' },
        { "procs", required_argument, NULL, 'n' },
        { "object", required_argument, NULL, 'o' },
        { "dest", required_argument, NULL, 'd' },
        { "chunk", required_argument, NULL, 'c' },
        { NULL, 0, NULL, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'l': g.listen = optarg; break;
        case 'o': g.object = optarg; break;
        case 'd': g.dest = optarg; break;
        case 'c': g.chunk = parse_u64("--chunk", optarg); break;
        case 'n': {
            uint64_t n = parse_u64("--procs", optarg);
            if (n < 1 || n > MAX_PROCS)
                die(1, "--procs: not in 1..%d", MAX_PROCS);
            g.nprocs = (unsigned)n;
            break;
        }
        default:
            fputs("usage: bench_handler --listen SOCK --procs N --object PATH --dest FILE"
                  " [--chunk BYTES]\n", stderr);
            return 2;
        }
    }
    if (!g.listen || !g.object || !g.dest || !g.nprocs || optind != argc)
        die(1, "--listen, --procs, --object and --dest are required");
    prctl(PR_SET_PDEATHSIG, SIGTERM);

    g.obj = open(g.object, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (g.obj < 0 || fstat(g.obj, &st))
        die(1, "open %s: %s", g.object, strerror(errno));
    g.size = (uint64_t)st.st_size;
    g.page_size = (uint64_t)st.st_blksize;
    if (g.page_size < 4096 || (g.page_size & (g.page_size - 1)) || g.size % g.page_size)
        die(1, "%s: size %" PRIu64 " is not whole %" PRIu64 "-byte pages", g.object, g.size,
            g.page_size);
    if (g.chunk < g.page_size || g.chunk % g.page_size)
        g.chunk = (g.chunk / g.page_size + 1) * g.page_size;
    g.npages = g.size / g.page_size;
    g.claimed = calloc(g.npages, 1);
    g.service = malloc(SERVICE_CAP * sizeof *g.service);
    char *pagebuf = aligned_alloc(4096, g.page_size);
    if (!g.claimed || !g.service || !pagebuf || pipe2(g.done_pipe, O_CLOEXEC))
        die(1, "setup: %s", strerror(errno));
    g.out = open(g.dest, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (g.out < 0 || ftruncate(g.out, (off_t)g.size))
        die(1, "create %s: %s", g.dest, strerror(errno));

    accept_writers();
    printf("ready\n");
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin))
        return 0; /* told nothing: closing the uffds releases the writers */

    const uint64_t t_go = now_ns();
    for (unsigned i = 0; i < g.nprocs; i++) {
        struct proc *pr = &g.procs[i];
        uint64_t t0 = now_ns();
        struct reg r = { { pr->base, g.size }, REGISTER_MODE_WP, 0 };
        xioctl(pr->uffd, UFFDIO_REGISTER_IOC, &r, "UFFDIO_REGISTER", pr->base, g.size);
        struct wp w = { { pr->base, g.size }, WRITEPROTECT_MODE_WP };
        xioctl(pr->uffd, UFFDIO_WRITEPROTECT_IOC, &w, "UFFDIO_WRITEPROTECT", pr->base, g.size);
        pr->protect_ns = now_ns() - t0;
    }
    const uint64_t t_protected = now_ns(); /* T */

    pthread_t scan;
    int err = pthread_create(&scan, NULL, scan_thread, NULL);
    if (err)
        die(1, "pthread_create: %s", strerror(err));
    struct pollfd pfd[MAX_PROCS + 1];
    for (unsigned i = 0; i < g.nprocs; i++)
        pfd[i] = (struct pollfd){ .fd = g.procs[i].uffd, .events = POLLIN };
    pfd[g.nprocs] = (struct pollfd){ .fd = g.done_pipe[0], .events = POLLIN };
    for (int scanning = 1; scanning;) {
        if (poll(pfd, g.nprocs + 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            die(1, "poll: %s", strerror(errno));
        }
        for (unsigned i = 0; i < g.nprocs; i++)
            if (pfd[i].revents & POLLIN)
                handle_faults(i, pagebuf);
        if (pfd[g.nprocs].revents & POLLIN)
            scanning = 0;
    }
    pthread_join(scan, NULL);
    for (unsigned i = 0; i < g.nprocs; i++) /* faults read after the scan's last un-protect */
        handle_faults(i, pagebuf);
    for (unsigned i = 0; i < g.nprocs; i++) {
        struct range r = { g.procs[i].base, g.size };
        xioctl(g.procs[i].uffd, UFFDIO_UNREGISTER_IOC, &r, "UFFDIO_UNREGISTER", r.start, r.len);
    }
    const uint64_t t_done = now_ns();

    qsort(g.service, g.n_service, sizeof *g.service, cmp_u64);
    uint64_t p50 = 0, p99 = 0, max = 0;
    if (g.n_service) {
        p50 = g.service[(g.n_service - 1) / 2];
        p99 = g.service[(g.n_service * 99 + 99) / 100 - 1];
        max = g.service[g.n_service - 1];
    }
    printf("{\"t_go_ns\": %" PRIu64 ", \"t_protected_ns\": %" PRIu64 ", \"t_copied_ns\": %" PRIu64
           ", \"t_done_ns\": %" PRIu64 ", \"page_size\": %" PRIu64 ", \"object_size\": %" PRIu64
           ", \"bytes_scanned\": %" PRIu64 ", \"faults\": %" PRIu64
           ", \"pages_saved_by_faults\": %" PRIu64 ", \"duplicate_faults\": %" PRIu64
           ", \"service\": {\"count\": %" PRIu64 ", \"p50_ns\": %" PRIu64 ", \"p99_ns\": %" PRIu64
           ", \"max_ns\": %" PRIu64 "}, \"protect_ns\": [",
           t_go, t_protected, g.t_copied, t_done, g.page_size, g.size, g.bytes_scanned, g.faults,
           g.saved_by_faults, g.duplicates, g.n_service, p50, p99, max);
    for (unsigned i = 0; i < g.nprocs; i++)
        printf("%s%" PRIu64, i ? ", " : "", g.procs[i].protect_ns);
    printf("]}\n");
    return fflush(stdout) ? 1 : 0;
}
