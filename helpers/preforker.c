/*
 * preforker — an unmodified pre-forking "server" whose state lives in anonymous shared memory,
 * laid out as the consistency-checker workload (docs/workload.md, workload.h).
 *
 * Like a database postmaster or a prefork web server, it mmaps MAP_SHARED|MAP_ANONYMOUS memory
 * (with --page-size 2097152, MAP_HUGETLB, as PostgreSQL does with huge_pages=on), writes the
 * workload header, and serves through N writer slots: writer i of the workload is always one
 * process at a time, resuming from the seq in its counter page.
 *   - By default it forks N workers before serving; worker i is writer i:
 *     - with --listen PATH, the parent binds a Unix stream socket before forking and every
 *       worker accepts connections on it, one at a time; each byte received on a connection is
 *       a request: the worker does one step and answers 16 bytes, its index and its new seq
 *       (u64 each);
 *     - without it, each worker steps continuously (at --rate steps per second, no limit if 0).
 *   - With --fork-per-connection (needs --listen; --rate is ignored), it behaves like
 *     PostgreSQL's postmaster: no worker exists in advance; the parent accepts every connection
 *     itself and forks a short-lived child for it, which takes a free slot i (becomes writer i),
 *     serves that connection's requests as above and exits when the connection closes. While
 *     all N slots are busy the parent accepts nothing (new connections wait in the listen
 *     backlog) until a child exits. The parent reaps its children as they exit.
 * The memory has no name: other processes reach it as /proc/PID/map_files/START-END.
 *
 * Usage: preforker --workers N [--data-pages D] [--page-size PS] [--rate R] [--listen PATH]
 *                  [--fork-per-connection]
 * Prints, once every worker is up (and the socket listens):
 *   "ready pid=P map=START-END size=BYTES workers=N pids=P0,P1,..."   (hex START/END as in maps)
 * (with --fork-per-connection: once the socket listens; workers=N is the number of slots and
 * pids= is empty, since no child exists yet).
 * Each worker prints "done index=I pid=P seq=S ops=N start_ns=A end_ns=B" when it stops (A and
 * B: CLOCK_MONOTONIC ns just after it was forked and just before it prints; its mapping lives
 * from before A to after B): when the header's stop word is set (a worker blocked in accept or
 * on an idle connection notices at its next request, EOF or signal) or on SIGTERM/SIGINT to
 * the parent, which passes it on. Workers die with the parent. With --fork-per-connection each
 * connection's child is a worker and prints its line when it exits (its connection closed, or
 * the stop word or SIGTERM as above), so there is one line per connection, in the order the
 * children exit (for a given index, that is the order they held the slot: the last line of an
 * index carries its final seq); ops=N counts that connection's requests. The parent notices
 * the stop word when a connection arrives (it closes it unserved) or a child exits, or stops
 * on SIGTERM/SIGINT; it then accepts nothing more and waits for its children.
 * Exit status: 0 when every worker exited 0, 1 on a runtime error, 2 on bad arguments.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
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
/* In the parent, the workers to pass SIGTERM on to (set before the handler can see them; 0 is a
 * free slot of --fork-per-connection, whose entries change only while the handler cannot run). */
static pid_t *volatile workers;
static volatile uint64_t nforked;

static void on_term(int sig)
{
    (void)sig;
    terminating = 1;
    if (workers) /* the parent: pass it on (kill() is async-signal-safe) */
        for (uint64_t i = 0; i < nforked; i++)
            if (workers[i] > 0)
                kill(workers[i], SIGTERM);
}

/* SIGCHLD in the --fork-per-connection parent: only to interrupt its ppoll(). */
static void on_child(int sig)
{
    (void)sig;
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

static struct wl_writer the_writer;
static uint64_t started_ns;

/* In a just-forked worker: die with the parent, become writer `index` over the inherited
 * mapping (resuming its seq). */
static struct wl_writer *become_writer(volatile uint64_t *mem, const struct wl_layout *lay,
                                       uint64_t index, pid_t parent)
{
    started_ns = now_ns();
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent)
        _exit(1);
    wl_view_of_whole(&the_writer.views[0], mem, lay, index);
    wl_writer_init(&the_writer, lay, index, 1, (uint64_t)getpid());
    return &the_writer;
}

static void __attribute__((noreturn)) report_and_exit(const struct wl_writer *w)
{
    printf("done index=%" PRIu64 " pid=%d seq=%" PRIu64 " ops=%" PRIu64 " start_ns=%" PRIu64
           " end_ns=%" PRIu64 "\n", w->index, (int)getpid(), w->seq, w->ops, started_ns,
           now_ns());
    _exit(fflush(stdout) ? 1 : 0);
}

/* A pre-forked worker: become writer `index`, tell the parent it is up (a byte on
 * `ready_fd`), serve until stopped, report, exit. */
static void __attribute__((noreturn)) worker_main(volatile uint64_t *mem,
                                                  const struct wl_layout *lay, uint64_t index,
                                                  pid_t parent, int ready_fd, int lfd, double rate)
{
    struct wl_writer *w = become_writer(mem, lay, index, parent);
    if (write(ready_fd, "r", 1) != 1)
        _exit(1);
    close(ready_fd);
    worker(w, lfd, rate);
    report_and_exit(w);
}

/* Reap every child that has exited, freeing its slot; a child that did not exit 0 sets
 * *status to 1. Returns how many slots were freed. Call with SIGTERM/SIGINT blocked. */
static uint64_t reap(pid_t *slots, uint64_t n, int *status)
{
    uint64_t freed = 0;
    for (;;) {
        int ws;
        pid_t pid = waitpid(-1, &ws, WNOHANG);
        if (pid == 0 || (pid < 0 && errno == ECHILD))
            return freed;
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            die(1, "waitpid: %s", strerror(errno));
        }
        if (!WIFEXITED(ws) || WEXITSTATUS(ws) != 0)
            *status = 1;
        for (uint64_t i = 0; i < n; i++)
            if (slots[i] == pid) {
                slots[i] = 0;
                freed++;
            }
    }
}

static int stop_word_set(volatile uint64_t *mem)
{
    return __atomic_load_n(&mem[H_STOP], __ATOMIC_ACQUIRE) != 0;
}

/* --fork-per-connection: the parent's loop. `slots` (n entries, all 0) are the children
 * serving each writer index, 0 when free. Accepts a connection only while a slot is free and
 * forks a child for it that becomes that slot's writer; reaps children as they exit. Ends on
 * SIGTERM/SIGINT or the stop word (seen when a connection arrives or a child exits), then
 * waits for every child. The parent's signals stay blocked except inside ppoll(), so a signal
 * cannot slip in between a check and the wait, and `slots` only changes while the SIGTERM
 * handler (which reads it) cannot run. Returns the exit status. */
static int serve_forking(volatile uint64_t *mem, const struct wl_layout *lay, int lfd,
                         pid_t *slots, uint64_t n, const char *map_line)
{
    const pid_t parent = getpid();
    sigset_t blocked, open;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGTERM);
    sigaddset(&blocked, SIGINT);
    sigaddset(&blocked, SIGCHLD);
    sigprocmask(SIG_BLOCK, &blocked, &open);
    sigdelset(&open, SIGTERM);
    sigdelset(&open, SIGINT);
    sigdelset(&open, SIGCHLD);
    struct sigaction sa = { .sa_handler = on_child };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGCHLD, &sa, NULL);
    if (fcntl(lfd, F_SETFL, fcntl(lfd, F_GETFL) | O_NONBLOCK))
        die(1, "fcntl: %s", strerror(errno));
    printf("%s pids=\n", map_line);
    fflush(stdout);

    int status = 0;
    uint64_t busy = 0;
    for (;;) {
        busy -= reap(slots, n, &status);
        if (terminating || stop_word_set(mem))
            break;
        uint64_t slot = 0;
        while (slot < n && slots[slot])
            slot++;
        struct pollfd pfd = { .fd = lfd, .events = POLLIN };
        /* all slots busy: wait for a signal alone (SIGCHLD frees one) */
        int r = ppoll(&pfd, slot < n ? 1 : 0, NULL, &open);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            die(1, "ppoll: %s", strerror(errno));
        if (r == 0 || slot == n)
            continue;
        int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (cfd < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ||
                errno == ECONNABORTED)
                continue;
            die(1, "accept: %s", strerror(errno));
        }
        if (stop_word_set(mem)) { /* stopping: close it unserved */
            close(cfd);
            break;
        }
        fflush(stdout);
        pid_t pid = fork();
        if (pid < 0)
            die(1, "fork: %s", strerror(errno));
        if (pid == 0) {
            workers = NULL;
            close(lfd);
            struct sigaction dfl = { .sa_handler = SIG_DFL };
            sigemptyset(&dfl.sa_mask);
            sigaction(SIGCHLD, &dfl, NULL);
            struct wl_writer *w = become_writer(mem, lay, slot, parent);
            sigprocmask(SIG_SETMASK, &open, NULL); /* a SIGTERM already pending lands here */
            serve_connection(w, cfd);
            close(cfd);
            report_and_exit(w);
        }
        slots[slot] = pid;
        busy++;
        close(cfd);
    }
    close(lfd); /* new connections are refused from now on */
    while (busy > 0) {
        busy -= reap(slots, n, &status);
        if (busy > 0 && ppoll(NULL, 0, NULL, &open) < 0 && errno != EINTR)
            die(1, "ppoll: %s", strerror(errno));
    }
    return status;
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
        { "fork-per-connection", no_argument, NULL, 'f' },
        { NULL, 0, NULL, 0 },
    };
    uint64_t nworkers = 0, data_pages = 256, page_size = (uint64_t)sysconf(_SC_PAGESIZE);
    double rate = 0;
    const char *listen_path = NULL;
    int fork_per_connection = 0, c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'w': nworkers = parse_u64("--workers", optarg); break;
        case 'd': data_pages = parse_u64("--data-pages", optarg); break;
        case 's': page_size = parse_u64("--page-size", optarg); break;
        case 'l': listen_path = optarg; break;
        case 'r': rate = parse_rate("--rate", optarg); break;
        case 'f': fork_per_connection = 1; break;
        default:
            fputs("usage: preforker --workers N [--data-pages D] [--page-size PS] [--rate R]"
                  " [--listen PATH] [--fork-per-connection]\n", stderr);
            return 2;
        }
    }
    if (optind != argc || nworkers == 0)
        die(2, "--workers N (N >= 1) is required");
    if (fork_per_connection && !listen_path)
        die(2, "--fork-per-connection needs --listen PATH");
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

    const pid_t parent = getpid();
    pid_t *pids = calloc(nworkers, sizeof *pids);
    if (!pids)
        die(1, "out of memory");
    workers = pids;
    catch_term();
    fflush(stdout);
    char map_line[160];
    snprintf(map_line, sizeof map_line, "ready pid=%d map=%lx-%lx size=%" PRIu64
             " workers=%" PRIu64, (int)parent, (unsigned long)mem, (unsigned long)mem + lay.size,
             lay.size, nworkers);
    if (fork_per_connection) {
        nforked = nworkers; /* the slots, all free */
        int status = serve_forking(mem, &lay, lfd, pids, nworkers, map_line);
        unlink(listen_path);
        return status;
    }
    int ready[2];
    if (pipe2(ready, O_CLOEXEC))
        die(1, "pipe: %s", strerror(errno));
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
    printf("%s pids=", map_line);
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
