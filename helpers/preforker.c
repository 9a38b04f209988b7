/*
 * preforker — an unmodified pre-forking "server" whose state lives in anonymous shared memory,
 * laid out as the consistency-checker workload (docs/workload.md, workload.h).
 *
 * Like a database postmaster or a prefork web server, it mmaps MAP_SHARED|MAP_ANONYMOUS memory
 * (with --page-size 2097152, MAP_HUGETLB, as PostgreSQL does with huge_pages=on), writes the
 * workload header, and forks N workers before serving. Worker i is writer i of the workload:
 *   - with --listen PATH, the parent binds a Unix stream socket before forking and every worker
 *     accepts connections on it, one at a time; each byte received on a connection is a request:
 *     the worker does one step and answers 16 bytes, its index and its new seq (u64 each);
 *   - without it, each worker steps continuously (at --rate steps per second, no limit if 0).
 * The memory has no name: other processes reach it as /proc/PID/map_files/START-END.
 *
 * Usage: preforker --workers N [--data-pages D] [--page-size PS] [--rate R] [--listen PATH]
 * Prints, once every worker is up (and the socket listens):
 *   "ready pid=P map=START-END size=BYTES workers=N pids=P0,P1,..."   (hex START/END as in maps)
 * Each worker prints "done index=I pid=P seq=S ops=N" when it stops: when the header's stop word
 * is set (a worker blocked in accept or on an idle connection notices at its next request, EOF
 * or signal) or on SIGTERM/SIGINT to the parent, which passes it on. Workers die with the parent.
 * Exit status: 0 when every worker exited 0, 1 on a runtime error, 2 on bad arguments.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define HELPER_NAME "preforker"
#define HELPER_INT_BASE 10
#include "util.h"

#include "workload.h"

#ifndef MAP_HUGE_SHIFT
#define MAP_HUGE_SHIFT 26
#endif

static volatile sig_atomic_t terminating;
/* In the parent, the workers to pass SIGTERM on to (set before the handler can see them). */
static pid_t *volatile workers;
static volatile uint64_t nforked;

static void on_term(int sig)
{
    (void)sig;
    terminating = 1;
    if (workers) /* the parent: pass it on (kill() is async-signal-safe) */
        for (uint64_t i = 0; i < nforked; i++)
            kill(workers[i], SIGTERM);
}

/* SIGTERM/SIGINT set `terminating` (and in the parent are passed on to every worker forked so
 * far); they interrupt blocking calls (no SA_RESTART). */
static void catch_term(void)
{
    struct sigaction sa = { .sa_handler = on_term };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
}

static int write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR && !terminating)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Serve one connection: a step per byte received, answered with (index, seq). */
static void serve_connection(struct wl_writer *w, int cfd)
{
    char req[64];
    while (!terminating && !wl_stopped(w)) {
        ssize_t n = read(cfd, req, sizeof req);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        for (ssize_t r = 0; r < n && !wl_stopped(w); r++) {
            if (wl_step(w))
                return;
            uint64_t answer[2] = { w->index, w->seq };
            if (write_all(cfd, answer, sizeof answer))
                return;
        }
    }
}

static void worker(struct wl_writer *w, int lfd, double rate)
{
    if (lfd < 0) {
        const uint64_t start = now_ns();
        while (!terminating && !wl_stopped(w)) {
            if (rate > 0) {
                uint64_t t = start + (uint64_t)((double)w->ops * 1e9 / rate);
                struct timespec ts = { .tv_sec = (time_t)(t / 1000000000ULL),
                                       .tv_nsec = (long)(t % 1000000000ULL) };
                if (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
                    continue;
            }
            if (wl_step(w))
                break;
        }
        return;
    }
    while (!terminating && !wl_stopped(w)) {
        int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (cfd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            die(1, "worker %" PRIu64 ": accept: %s", w->index, strerror(errno));
        }
        serve_connection(w, cfd);
        close(cfd);
    }
}

/* A forked worker: become writer `index` over the inherited mapping, tell the parent it is up
 * (a byte on `ready_fd`), serve until stopped, report, exit. */
static void __attribute__((noreturn)) worker_main(volatile uint64_t *mem,
                                                  const struct wl_layout *lay, uint64_t index,
                                                  pid_t parent, int ready_fd, int lfd, double rate)
{
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent)
        _exit(1);
    static struct wl_writer w;
    wl_view_of_whole(&w.views[0], mem, lay, index);
    wl_writer_init(&w, lay, index, 1, (uint64_t)getpid());
    if (write(ready_fd, "r", 1) != 1)
        _exit(1);
    close(ready_fd);
    worker(&w, lfd, rate);
    printf("done index=%" PRIu64 " pid=%d seq=%" PRIu64 " ops=%" PRIu64 "\n", w.index,
           (int)getpid(), w.seq, w.ops);
    _exit(fflush(stdout) ? 1 : 0);
}

static int listen_on(const char *path)
{
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof addr.sun_path)
        die(2, "--listen: path too long: %s", path);
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) || listen(fd, 128))
        die(1, "listen on %s: %s", path, strerror(errno));
    return fd;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "workers", required_argument, NULL, 'w' },
        { "data-pages", required_argument, NULL, 'd' },
        { "page-size", required_argument, NULL, 's' },
        { "rate", required_argument, NULL, 'r' },
        { "listen", required_argument, NULL, 'l' },
        { NULL, 0, NULL, 0 },
    };
    uint64_t nworkers = 0, data_pages = 256, page_size = (uint64_t)sysconf(_SC_PAGESIZE);
    double rate = 0;
    const char *listen_path = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'w': nworkers = parse_u64("--workers", optarg); break;
        case 'd': data_pages = parse_u64("--data-pages", optarg); break;
        case 's': page_size = parse_u64("--page-size", optarg); break;
        case 'l': listen_path = optarg; break;
        case 'r': rate = parse_rate("--rate", optarg); break;
        default:
            fputs("usage: preforker --workers N [--data-pages D] [--page-size PS] [--rate R]"
                  " [--listen PATH]\n", stderr);
            return 2;
        }
    }
    if (optind != argc || nworkers == 0)
        die(2, "--workers N (N >= 1) is required");
    static struct wl_layout lay;
    const char *bad = wl_layout_init(&lay, nworkers, data_pages, page_size);
    if (bad)
        die(2, "bad layout (workers=%" PRIu64 " data-pages=%" PRIu64 " page-size=%" PRIu64
               "): %s", nworkers, data_pages, page_size, bad);

    int flags = MAP_SHARED | MAP_ANONYMOUS;
    if (page_size != (uint64_t)sysconf(_SC_PAGESIZE))
        flags |= MAP_HUGETLB | (__builtin_ctzll(page_size) << MAP_HUGE_SHIFT);
    volatile uint64_t *mem = mmap(NULL, lay.size, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (mem == MAP_FAILED)
        die(1, "mmap %" PRIu64 " bytes of shared anonymous memory (page size %" PRIu64 "): %s",
            lay.size, page_size, strerror(errno));
    wl_write_header(mem, &lay);
    const int lfd = listen_path ? listen_on(listen_path) : -1;

    int ready[2];
    if (pipe2(ready, O_CLOEXEC))
        die(1, "pipe: %s", strerror(errno));
    const pid_t parent = getpid();
    pid_t *pids = calloc(nworkers, sizeof *pids);
    if (!pids)
        die(1, "out of memory");
    workers = pids;
    catch_term();
    fflush(stdout);
    sigset_t term, saved;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    sigaddset(&term, SIGINT);
    for (uint64_t i = 0; i < nworkers; i++) {
        sigprocmask(SIG_BLOCK, &term, &saved); /* no handler runs half-way through a fork */
        pid_t pid = fork();
        if (pid < 0)
            die(1, "fork: %s", strerror(errno));
        if (pid == 0) {
            workers = NULL;
            sigprocmask(SIG_SETMASK, &saved, NULL);
            close(ready[0]);
            worker_main(mem, &lay, i, parent, ready[1], lfd, rate);
        }
        pids[i] = pid;
        nforked = i + 1;
        sigprocmask(SIG_SETMASK, &saved, NULL);
    }
    close(ready[1]);
    if (lfd >= 0)
        close(lfd); /* the workers hold it */
    for (uint64_t up = 0; up < nworkers;) {
        char r;
        ssize_t n = read(ready[0], &r, 1);
        if (n == 1)
            up++;
        else if (!(n < 0 && errno == EINTR))
            die(1, "a worker died before it was ready");
    }
    close(ready[0]);
    printf("ready pid=%d map=%lx-%lx size=%" PRIu64 " workers=%" PRIu64 " pids=", (int)parent,
           (unsigned long)mem, (unsigned long)mem + lay.size, lay.size, nworkers);
    for (uint64_t i = 0; i < nworkers; i++)
        printf("%s%d", i ? "," : "", (int)pids[i]);
    printf("\n");
    fflush(stdout);

    int status = 0;
    for (uint64_t left = nworkers; left > 0;) {
        int ws;
        pid_t pid = waitpid(-1, &ws, 0);
        if (pid > 0) {
            left--;
            if (!WIFEXITED(ws) || WEXITSTATUS(ws) != 0)
                status = 1;
        } else if (errno != EINTR) {
            die(1, "waitpid: %s", strerror(errno));
        }
    }
    if (listen_path)
        unlink(listen_path);
    return status;
}
