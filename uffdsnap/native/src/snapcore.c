/*
 * snapcore — the coordinator's data path in C: a shared library loaded with ctypes by
 * uffdsnap/native/core.py, one context per snapshot. Its ABI is snapcore.h.
 *
 * Why native: a fault's service time is what a blocked writer waits, and in Python it is bounded
 * by event-loop and GIL hand-offs (hundreds of µs to ms on a busy machine), while the kernel work
 * (read the fault, pread the page, pwrite it, un-protect) takes tens of µs. Here a pthread that
 * never touches the GIL serves the faults of delegated uffds, and the copy workers' window
 * copies run with the GIL released. Policy stays in Python: phases, who takes part, events
 * (fork, mremap, munmap, MADV_REMOVE), failures.
 *
 * What this library owns, all under one mutex:
 *  - the `saved` map, one byte per page (0 → 1 once, never back); Python reads it directly (the
 *    memory is Python's when it passes it to sc_new, so its views outlive the context);
 *  - every write into the image file (pages are written before they are marked saved, or, for
 *    a copy window, read before they are claimed: either way the image gets content at T).
 *    A fault's page goes to the deferred ring (memory) rather than the image: the copy worker's
 *    window writes hold the image's inode lock for milliseconds on a busy machine, and a
 *    fault's 4 KiB pwrite queued behind them was the tail of fault service (p99 ~2.8 ms of
 *    store alone, measured on 2 vCPUs). The page is saved once its content at T is in the ring;
 *    the copy workers write the ring to the image before each window's image reads, and
 *    sc_stop writes what is left, before anything reads or publishes the image;
 *  - the delegated uffds ("ufs"), each with its mappings (address, length, object offset):
 *    it reads their messages, holds faults until T (sc_go), then serves them, and un-protects
 *    every page it saves in every uf.
 * Fault channels (agents mode, where the agents keep their uffds): each agent's core reads its
 * process's uffd and forwards faults over a socketpair it handed to the coordinator; the
 * coordinator's core saves the page and sends the un-protects back over every channel (the
 * faulting one first); the agent's core applies them. Both ends speak the wire protocol's
 * `fault` and `unprotect` messages (docs/protocol.md) in one fixed encoding, so no Python runs
 * between a write fault and its wake-up in either mode.
 *
 * A message other than a page fault pauses its uf (its later messages wait in the uf's pending
 * list) and is queued for Python, woken through an eventfd; Python handles it, updates the uf's
 * mappings (sc_set_maps) and resumes it (sc_resume). ioctls that meet EAGAIN (an event pending)
 * read the uf's messages into its pending list and retry; Python's own ioctls on a delegated uf
 * do the same through sc_drain, so this library is the only reader of a delegated uffd.
 *
 * Peers are not trusted to be well-behaved, and Python needs the mutex for every call (stop on
 * the release path included), so nothing a peer does may keep the mutex held:
 *  - no call made with the mutex held waits for a peer. Frames go out with MSG_DONTWAIT, and what
 *    the socket does not take waits in the channel's bounded outbox, which the fault thread
 *    flushes when the socket has room; a peer that leaves a frame there longer than the fault
 *    deadline, or fills the outbox, is dropped and the run fails (which releases everyone).
 *    uffds are read with RWF_NOWAIT, whatever the peer that shares the file description did
 *    to its flags. An ioctl that keeps meeting EAGAIN is retried on a later round, not slept on;
 *  - reads are budgeted: one recv per channel and one batch of messages per uffd per round, and
 *    the mutex is released between them, so a flooding peer cannot monopolize it;
 *  - a peer past a limit (malformed frame, too many held faults, outbox full or stale) is closed,
 *    not kept reading; each source reports one failure. Every queue is bounded, and what cannot
 *    be queued is accounted for (a failure Python takes), never silently dropped.
 * The fault thread blocks every signal (they are the interpreter's).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "snapcore.h"

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

#define UFFDIO_WRITEPROTECT_IOC 0xC018AA06UL
#define EVENT_PAGEFAULT 0x12
#define EVENT_FORK 0x13
#define FRAME_MAX 64
#define FAULT_THREAD_NICE -10
/* Saved ranges reach the processes other than a fault's own in batches: at most this late or
 * this many ranges at once (one wake-up per agent per batch instead of one per fault and one
 * per window); the delay grows with the number of agents, up to 4x. Measured with 64 agents on
 * 2 vCPUs: un-batched, copy 9 MiB/s; 1 ms, 13 MiB/s; 5 ms, 48-82 MiB/s; 20 ms, 273 MiB/s (the
 * faulting process is always un-protected at once). */
#define BATCH_DELAY_NS 5000000ULL
#define BATCH_AGENTS_PER_STEP 16
#define BATCH_MAX 512
#define HELD_MAX (1u << 20)           /* faults held until T, at most */
#define HELD_PER_SOURCE_MAX (1u << 16) /* ... from one uffd or channel (a flooding peer) */
#define HELD_BUDGET 256               /* held faults served per round after T */
#define OUTBOX_MAX 4096               /* frames waiting for one peer, at most */
#define SEND_IOV 64                   /* frames per sendmsg */
#define CHAN_IN 4096                  /* a channel's input buffer: one recv per round */
#define MSG_SIZE SC_MSG_SIZE
#define READ_BATCH 64                 /* uffd messages read per round per uffd */
#define PENDING_MAX (1u << 16)        /* messages read but not handled, per uffd */
#define EVENTS_MAX (1u << 18)         /* events queued for Python */
#define RETRY_MAX 4096                /* un-protects waiting for an EAGAIN to clear, per uffd */
#define RETRY_INTERVAL_NS 100000ULL
#define IOCTL_TRIES 8
#define EINTR_TRIES 16
#define LATE_NS 200000ULL             /* SC_TEST_UNPROTECT_BEFORE_SAVE: save this much later */
#define DEADLINE_MAX_MS 3600000ULL
#define ZERO_BLOCK 4096
#define DEFER_BYTES (2u << 20)       /* faulted pages waiting in memory for the image, at most */
#define DEFER_PAGE_MAX (64u << 10)    /* larger pages (hugetlb) are stored at once */
#define HIST_BUCKETS SC_HIST_BUCKETS

enum { HOLD = 0, SERVE = 1 };

struct span { uint64_t start, len, offset; };
struct range { uint64_t start, len; };
struct wp { struct range range; uint64_t mode; };
struct span2 { uint64_t off, len; };

struct uf {
    int64_t ident;
    int fd, paused, dead, failed, plain_read;
    struct span *maps;
    int nmaps;
    unsigned char (*pending)[MSG_SIZE];
    size_t npending, head, cap;
    struct span2 *retry; /* object ranges whose un-protect met EAGAIN: retried next round */
    size_t nretry, retry_cap;
    uint64_t retry_since;
    size_t nheld;
};

/* A frame waiting for its peer to read: sent in order, MSG_DONTWAIT. */
struct oframe { uint64_t queued_ns; uint32_t len; unsigned char b[FRAME_MAX]; };

/* A fault channel: the coordinator's end (faults in, un-protects out), or the agent's. */
struct chan {
    int64_t ident;
    int fd, dead;
    unsigned char in[CHAN_IN];
    size_t nin;
    struct oframe *out; /* frames [ohead, oend) not taken by the socket yet */
    size_t ohead, oend, ocap, osent; /* osent: bytes of out[ohead] already sent */
    int dirty; /* frames queued while corked: flush at uncork */
    int tail_unprotect; /* out[oend - 1] is un-protect [tail_off, tail_off + tail_len) */
    uint64_t tail_off, tail_len;
    size_t nheld;
};

struct held { int64_t ident; int is_chan; uint64_t offset, seen_ns; };
struct fwd { uint64_t offset, seen_ns; }; /* agent: a forwarded fault awaiting its un-protect */
struct late { int64_t uident, cident; uint64_t offset, seen_ns, due_ns; };
struct pollbuf { struct pollfd *pfds; struct polled *what; size_t cap, wcap; };

struct sc {
    pthread_mutex_t mu; /* the fault thread releases it between units of work and while it waits:
                         * a flooding peer gets one unit per round, API calls get in between */
    int obj_fd, img_fd, wake_fd, notify_fd, state, stopping, thread_started, saved_owned;
    uint64_t size, page_size, npages, deadline_ns;
    unsigned char *saved;
    unsigned char *written; /* sc_track_writes: pages a fault was served for (NULL: off) */
    pthread_t thread;
    pthread_t fault_self; /* the fault thread, as it sees itself (valid while fault_self_set) */
    atomic_int fault_self_set;
    struct uf **ufs;
    size_t nufs, ufs_cap;
    struct held *held, *serving; /* held until T; handed to the fault thread at T */
    size_t nheld, held_cap, nserving, serving_pos;
    struct sc_event *events; /* [ehead, nevents) */
    size_t ehead, nevents, events_cap;
    int events_lost_err, run_failed;
    struct sc_stats stats;
    uint64_t hist[HIST_BUCKETS];
    unsigned char *page_buf;
    /* The deferred ring: pages saved by faults, not in the image yet. Slots [dhead, dtail)
     * (counters; slot = counter % dcap) hold them; only save_page fills one (at dtail, under
     * mu) and only a flusher (under flush_mu) writes them out and then advances dhead (under
     * mu), so a flusher reads its slots without mu. dcap 0: off. Lock order: flush_mu, mu. */
    pthread_mutex_t flush_mu;
    unsigned char *dbuf;
    uint64_t *dpage;
    size_t dcap, dhead, dtail;
    struct chan **chans; /* coordinator: the agents' fault channels */
    size_t nchans, chans_cap;
    struct chan *forward; /* agent: where faults go and un-protects come from */
    struct fwd *fwds;
    size_t nfwds, fwds_cap;
    struct span2 *batch; /* saved ranges not yet un-protected everywhere */
    size_t nbatch, batch_cap;
    uint64_t batch_since;
    struct late *late;
    size_t nlate, late_cap;
    uint64_t *fsq; /* pages saved because of faults, for sc_take_fault_saved (a ring) */
    size_t fsq_head, fsq_count, fsq_cap;
    uint64_t fsq_limit;
    int fsq_overflow;
    int corked; /* the fault thread handles a batch of input: queue frames, send at uncork */
    int test_flags; /* SC_TEST_*: never set in normal use */
    int relay; /* hand un-protected ranges to Python too (sc_relay_unprotects) */
};

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Grow a dynamic array so that it holds `need` elements of `elem` bytes. */
static int reserve(void **items, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t ncap = *cap ? *cap * 2 : 16;
    while (ncap < need)
        ncap *= 2;
    void *p = realloc(*items, ncap * elem);
    if (!p)
        return -ENOMEM;
    *items = p;
    *cap = ncap;
    return 0;
}

static void notify(struct sc *c)
{
    uint64_t one = 1;
    ssize_t r = write(c->notify_fd, &one, sizeof one);
    (void)r; /* a full counter already says "look" */
}

/* Is the caller the context's fault thread? (Not thread-local storage in this library: dlopen'd
 * TLS crashes LeakSanitizer's tracer.) */
static int on_fault_thread(struct sc *c)
{
    return atomic_load_explicit(&c->fault_self_set, memory_order_acquire) &&
        pthread_equal(pthread_self(), c->fault_self);
}

/* Make the fault thread start a new round (it recomputes what it polls and for how long). Not
 * from the fault thread itself: it does at the start of every round anyway, and a write here
 * would cost a fault being served a system call and the thread an empty round. */
static void wake_thread(struct sc *c)
{
    if (on_fault_thread(c))
        return;
    uint64_t one = 1;
    ssize_t r = write(c->wake_fd, &one, sizeof one);
    (void)r;
}

/* A fork message nobody handled carries the child's uffd, installed in this process: close it,
 * or the child would stay write-protected with no one to serve it. Closing the last reference
 * releases the child. */
static void close_fork_fd(const unsigned char *msg)
{
    if (msg[0] == EVENT_FORK) {
        uint32_t fd;
        memcpy(&fd, msg + 8, 4);
        close((int)fd);
    }
}

/* Queue an event for Python. One that cannot be queued (EVENTS_MAX, or out of memory) is not
 * lost silently: sc_take_events ends with a failure of the run that says so, and a fork's uffd
 * is closed (its child released). */
static void push_event(struct sc *c, int64_t ident, int kind, int err, const unsigned char *msg)
{
    if (c->nevents == c->events_cap && c->ehead) {
        memmove(c->events, c->events + c->ehead, (c->nevents - c->ehead) * sizeof *c->events);
        c->nevents -= c->ehead;
        c->ehead = 0;
    }
    int full = c->nevents - c->ehead >= EVENTS_MAX;
    if (full || reserve((void **)&c->events, &c->events_cap, c->nevents + 1,
                        sizeof *c->events) < 0) {
        if (!c->events_lost_err)
            c->events_lost_err = full ? ENOBUFS : ENOMEM;
        if (kind == SC_EVENT && msg)
            close_fork_fd(msg);
        notify(c);
        return;
    }
    struct sc_event *e = &c->events[c->nevents++];
    memset(e, 0, sizeof *e);
    e->ident = ident;
    e->kind = kind;
    e->err = err;
    if (msg)
        memcpy(e->msg, msg, MSG_SIZE);
    notify(c);
}

/* The run as a whole cannot be proven (reported once; the first reason wins). */
static void fail_run(struct sc *c, int err)
{
    if (c->run_failed)
        return;
    c->run_failed = 1;
    push_event(c, -1, SC_FAILED, err, NULL);
}

/* One uf's failure (reported once). */
static void fail_uf(struct sc *c, struct uf *u, int err)
{
    if (u->failed)
        return;
    u->failed = 1;
    push_event(c, u->ident, SC_FAILED, err, NULL);
}

/* A uf we cannot go on reading: fail it and stop polling it (its writers wait for the
 * release, which the failure brings). */
static void kill_uf(struct sc *c, struct uf *u, int err)
{
    u->dead = 1;
    fail_uf(c, u, err);
}

static void free_outbox(struct chan *ch)
{
    free(ch->out);
    ch->out = NULL;
    ch->ohead = ch->oend = ch->ocap = ch->osent = 0;
}

static int flush_out(struct chan *ch);

/* A channel past a limit (malformed frame, too many held faults, outbox full or stale): closed
 * for good, both ways (what was queued for it goes first, if its socket takes it now), and one
 * failure reported. Python still owns and closes the fd. */
static void fail_chan(struct sc *c, struct chan *ch, int err)
{
    if (ch->dead)
        return;
    flush_out(ch);
    ch->dead = 1;
    shutdown(ch->fd, SHUT_RDWR);
    free_outbox(ch);
    push_event(c, ch->ident, SC_FAILED, err, NULL);
}

/* The peer closed its end (or the socket broke): Python decides whether that matters. */
static void chan_lost(struct sc *c, struct chan *ch, int err)
{
    if (ch->dead)
        return;
    ch->dead = 1;
    free_outbox(ch);
    push_event(c, ch->ident, SC_GONE, err, NULL);
}

static void record_service(struct sc *c, uint64_t ns)
{
    int b = ns <= 1 ? 0 : (int)(log((double)ns) / log(1.02));
    if (b >= HIST_BUCKETS)
        b = HIST_BUCKETS - 1;
    c->hist[b]++;
    c->stats.service_count++;
    if (ns > c->stats.service_max_ns)
        c->stats.service_max_ns = ns;
}

/* A page saved because of a fault, for sc_take_fault_saved (if recording is on). */
static void record_fault_saved(struct sc *c, uint64_t page)
{
    if (!c->fsq_limit || c->fsq_overflow)
        return;
    if (c->fsq_count >= c->fsq_limit) {
        c->fsq_overflow = 1;
        fail_run(c, ENOBUFS);
        return;
    }
    if (c->fsq_count == c->fsq_cap) { /* grow (up to the limit), in order from index 0 */
        size_t ncap = c->fsq_cap ? c->fsq_cap * 2 : 64;
        if (ncap > c->fsq_limit)
            ncap = (size_t)c->fsq_limit;
        uint64_t *q = malloc(ncap * sizeof *q);
        if (!q) {
            c->fsq_overflow = 1;
            fail_run(c, ENOMEM);
            return;
        }
        for (size_t i = 0; i < c->fsq_count; i++)
            q[i] = c->fsq[(c->fsq_head + i) % c->fsq_cap];
        free(c->fsq);
        c->fsq = q;
        c->fsq_cap = ncap;
        c->fsq_head = 0;
    }
    c->fsq[(c->fsq_head + c->fsq_count) % c->fsq_cap] = page;
    if (c->fsq_count++ == 0)
        push_event(c, -1, SC_SAVED, 0, NULL);
}

static struct uf *find_uf(struct sc *c, int64_t ident)
{
    for (size_t i = 0; i < c->nufs; i++)
        if (c->ufs[i]->ident == ident)
            return c->ufs[i];
    return NULL;
}

static struct chan *find_chan(struct sc *c, int64_t ident)
{
    for (size_t i = 0; i < c->nchans; i++)
        if (c->chans[i]->ident == ident)
            return c->chans[i];
    return NULL;
}

static int pread_full(int fd, unsigned char *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0) { /* the object shrank: beyond its end reads as zeros */
            memset(buf + done, 0, len - done);
            break;
        }
        done += (size_t)n;
    }
    return 0;
}

static int pwrite_full(int fd, const unsigned char *buf, size_t len, uint64_t off)
{
    while (len) {
        ssize_t n = pwrite(fd, buf, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        buf += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

/* How many of the `len` bytes at `off` lie inside the object (its last page may be partial). */
static uint64_t clip(const struct sc *c, uint64_t off, uint64_t len)
{
    return off >= c->size ? 0 : (len < c->size - off ? len : c->size - off);
}

static int all_zero(const unsigned char *p, size_t n)
{
    static const unsigned char zeros[ZERO_BLOCK];
    while (n) {
        size_t k = n < ZERO_BLOCK ? n : ZERO_BLOCK;
        if (memcmp(p, zeros, k))
            return 0;
        p += k;
        n -= k;
    }
    return 1;
}

/* Write buf (object bytes at `off`) into the image, leaving all-zero blocks as holes. */
static int store(struct sc *c, const unsigned char *buf, size_t len, uint64_t off)
{
    size_t i = 0;
    while (i < len) {
        while (i < len && all_zero(buf + i, len - i < ZERO_BLOCK ? len - i : ZERO_BLOCK))
            i += ZERO_BLOCK;
        if (i >= len)
            break;
        size_t j = i;
        while (j < len && !all_zero(buf + j, len - j < ZERO_BLOCK ? len - j : ZERO_BLOCK))
            j += ZERO_BLOCK;
        if (j > len)
            j = len;
        int r = pwrite_full(c->img_fd, buf + i, j - i, off + i);
        if (r < 0)
            return r;
        i = j;
    }
    return 0;
}

/* ---- fault-channel frames: the wire protocol's framing (4-byte big-endian length, msgpack map)
 * with every integer as a uint64 (0xcf). Received frames must match this encoding exactly. */

struct enc { unsigned char *p; size_t vals[3]; int nvals; };

static void put_str(struct enc *e, const char *str)
{
    size_t n = strlen(str);
    *e->p++ = (unsigned char)(0xa0 | n);
    memcpy(e->p, str, n);
    e->p += n;
}

static void put_u64(struct enc *e, unsigned char *frame, uint64_t v)
{
    *e->p++ = 0xcf;
    e->vals[e->nvals++] = (size_t)(e->p - frame);
    for (int i = 0; i < 8; i++)
        *e->p++ = (unsigned char)(v >> (56 - 8 * i));
}

static uint64_t get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static size_t finish(struct enc *e, unsigned char *frame)
{
    size_t n = (size_t)(e->p - frame) - 4;
    frame[0] = 0, frame[1] = 0, frame[2] = (unsigned char)(n >> 8), frame[3] = (unsigned char)n;
    return n + 4;
}

/* {"t": "fault", "offset": O, "tid": T, "seen_ns": S} */
static size_t fault_frame(unsigned char *f, uint64_t off, uint64_t tid, uint64_t seen,
                          struct enc *e)
{
    *e = (struct enc){ .p = f + 4 };
    *e->p++ = 0x84;
    put_str(e, "t"), put_str(e, "fault");
    put_str(e, "offset"), put_u64(e, f, off);
    put_str(e, "tid"), put_u64(e, f, tid);
    put_str(e, "seen_ns"), put_u64(e, f, seen);
    return finish(e, f);
}

/* {"t": "unprotect", "ranges": [[O, L]]} */
static size_t unprotect_frame(unsigned char *f, uint64_t off, uint64_t len, struct enc *e)
{
    *e = (struct enc){ .p = f + 4 };
    *e->p++ = 0x82;
    put_str(e, "t"), put_str(e, "unprotect");
    put_str(e, "ranges");
    *e->p++ = 0x91, *e->p++ = 0x92;
    put_u64(e, f, off), put_u64(e, f, len);
    return finish(e, f);
}

/* Does `frame` (n bytes, with its header) have the shape `build` makes? Its values go to v. */
static int parse_frame(const unsigned char *frame, size_t n, int is_fault, uint64_t v[3])
{
    unsigned char t[FRAME_MAX];
    struct enc e;
    size_t want = is_fault ? fault_frame(t, 0, 0, 0, &e) : unprotect_frame(t, 0, 0, &e);
    if (n != want)
        return 0;
    for (int i = 0; i < e.nvals; i++)
        v[i] = get_u64(frame + e.vals[i]);
    if (is_fault)
        fault_frame(t, v[0], v[1], v[2], &e);
    else
        unprotect_frame(t, v[0], v[1], &e);
    return memcmp(t, frame, n) == 0;
}

/* ---- sending: MSG_DONTWAIT, a bounded outbox, a deadline ------------------------------------ */

/* Hand the socket what it takes of the outbox, without waiting. 0, or -errno: the peer is
 * gone. */
static int flush_out(struct chan *ch)
{
    int eintr = 0;
    while (ch->ohead < ch->oend) {
        struct iovec iov[SEND_IOV];
        int k = 0;
        for (size_t i = ch->ohead; i < ch->oend && k < SEND_IOV; i++, k++) {
            size_t skip = i == ch->ohead ? ch->osent : 0;
            iov[k] = (struct iovec){ ch->out[i].b + skip, ch->out[i].len - skip };
        }
        struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)k };
        ssize_t n = sendmsg(ch->fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR && ++eintr < EINTR_TRIES)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (n <= 0)
            return n < 0 ? -errno : -EPIPE;
        for (size_t left = (size_t)n; left;) {
            size_t rest = ch->out[ch->ohead].len - ch->osent;
            if (left < rest) {
                ch->osent += left;
                break;
            }
            left -= rest;
            ch->ohead++;
            ch->osent = 0;
        }
    }
    if (ch->ohead == ch->oend)
        ch->ohead = ch->oend = 0;
    return 0;
}

static void chan_flush(struct sc *c, struct chan *ch)
{
    if (ch->dead)
        return;
    int r = flush_out(ch);
    if (r < 0)
        chan_lost(c, ch, -r);
}

/* Flush, then drop the peer if its oldest waiting frame is past the deadline. */
static void chan_check(struct sc *c, struct chan *ch, uint64_t now)
{
    if (ch->dead || ch->ohead == ch->oend)
        return;
    chan_flush(c, ch);
    if (ch->dead || ch->ohead == ch->oend)
        return;
    uint64_t queued = ch->out[ch->ohead].queued_ns; /* (may be later than `now`) */
    if (now > queued && now - queued >= c->deadline_ns)
        fail_chan(c, ch, ETIMEDOUT); /* it stopped reading: un-protects cannot reach it */
}

/* Send a frame now if nothing waits before it and the socket takes it; else queue it. While
 * corked, queue it: the answers to a batch of input leave together (one sendmsg, one skb,
 * instead of one each: a peer's socket buffer holds many times more of them). Returns whether
 * it was queued (it is then out[oend - 1]). */
static int send_frame(struct sc *c, struct chan *ch, const unsigned char *f, size_t n)
{
    if (ch->dead)
        return 0;
    ch->tail_unprotect = 0;
    size_t sent = 0;
    if (c->corked)
        ch->dirty = 1;
    else if (ch->ohead == ch->oend) {
        for (int i = 0; i < EINTR_TRIES; i++) {
            ssize_t k = send(ch->fd, f, n, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (k < 0 && errno == EINTR)
                continue;
            if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            if (k <= 0) {
                chan_lost(c, ch, k < 0 ? errno : EPIPE);
                return 0;
            }
            sent = (size_t)k;
            break;
        }
        if (sent == n)
            return 0;
    }
    uint64_t now = mono_ns();
    if (ch->oend - ch->ohead >= OUTBOX_MAX) {
        fail_chan(c, ch, ENOBUFS); /* it takes un-protects slower than we make them */
        return 0;
    }
    if (ch->oend == ch->ocap && ch->ohead) {
        memmove(ch->out, ch->out + ch->ohead, (ch->oend - ch->ohead) * sizeof *ch->out);
        ch->oend -= ch->ohead;
        ch->ohead = 0;
    }
    if (reserve((void **)&ch->out, &ch->ocap, ch->oend + 1, sizeof *ch->out) < 0) {
        fail_chan(c, ch, ENOMEM);
        return 0;
    }
    int was_empty = ch->ohead == ch->oend;
    struct oframe *o = &ch->out[ch->oend++];
    o->queued_ns = now;
    o->len = (uint32_t)n;
    memcpy(o->b, f, n);
    if (was_empty)
        ch->osent = sent;
    if (c->corked)
        return 1;
    if (was_empty)
        wake_thread(c); /* to poll for room and watch the deadline */
    else
        chan_check(c, ch, now);
    return !ch->dead && ch->oend > ch->ohead;
}

static void cork(struct sc *c) { c->corked = 1; }

/* Send what was queued while corked (what the sockets take; the rest waits for room). */
static void uncork(struct sc *c)
{
    c->corked = 0;
    uint64_t now = mono_ns();
    for (size_t i = 0; i <= c->nchans; i++) {
        struct chan *ch = i < c->nchans ? c->chans[i] : c->forward;
        if (ch && ch->dirty) {
            ch->dirty = 0;
            chan_check(c, ch, now);
        }
    }
}

/* An un-protect for the peer. One that overlaps or touches the last one queued (and not yet
 * begun) is merged into it: the union of saved ranges is saved, and it arrives in the same
 * place in the stream. A flood of duplicates then costs one frame, not one each. */
static void send_unprotect(struct sc *c, struct chan *ch, uint64_t off, uint64_t len)
{
    unsigned char f[FRAME_MAX];
    struct enc e;
    if (ch->dead)
        return;
    size_t t = ch->oend - 1;
    if (ch->tail_unprotect && ch->oend > ch->ohead && !(t == ch->ohead && ch->osent) &&
        off <= ch->tail_off + ch->tail_len && ch->tail_off <= off + len) {
        uint64_t lo = off < ch->tail_off ? off : ch->tail_off;
        uint64_t a = off + len, b = ch->tail_off + ch->tail_len, hi = a > b ? a : b;
        ch->out[t].len = (uint32_t)unprotect_frame(ch->out[t].b, lo, hi - lo, &e);
        ch->tail_off = lo;
        ch->tail_len = hi - lo;
        return;
    }
    if (send_frame(c, ch, f, unprotect_frame(f, off, len, &e))) {
        ch->tail_unprotect = 1;
        ch->tail_off = off;
        ch->tail_len = len;
    }
}

/* Read what one recv brings (the round's budget for this channel) and hand each complete frame
 * to `on_frame`; a partial frame waits for the next round. */
static void chan_read(struct sc *c, struct chan *ch,
                      void (*on_frame)(struct sc *, struct chan *, const unsigned char *, size_t))
{
    if (ch->dead)
        return;
    ssize_t k;
    int tries = 0;
    do
        k = recv(ch->fd, ch->in + ch->nin, sizeof ch->in - ch->nin, MSG_DONTWAIT);
    while (k < 0 && errno == EINTR && ++tries < EINTR_TRIES);
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (k <= 0) {
        chan_lost(c, ch, k < 0 ? errno : 0);
        return;
    }
    ch->nin += (size_t)k;
    size_t pos = 0;
    while (ch->nin - pos >= 4 && !ch->dead) {
        const unsigned char *h = ch->in + pos;
        uint64_t len = (uint64_t)h[0] << 24 | (uint64_t)h[1] << 16 | (uint64_t)h[2] << 8 | h[3];
        if (len + 4 > FRAME_MAX) {
            fail_chan(c, ch, EPROTO);
            return;
        }
        if (ch->nin - pos < len + 4)
            break;
        on_frame(c, ch, h, (size_t)len + 4);
        pos += (size_t)len + 4;
    }
    if (ch->dead)
        return;
    memmove(ch->in, ch->in + pos, ch->nin - pos);
    ch->nin -= pos;
}

/* ---- delegated uffds ------------------------------------------------------------------------ */

/* Read one batch of the uf's messages into its pending list, without waiting whatever the
 * flags of the file description (a peer that shares it may have cleared O_NONBLOCK): the
 * round's budget for this uf. Returns how many, or -errno. Room is made before reading, so a
 * message read is never dropped. */
static int read_uf(struct uf *u)
{
    if (u->npending - u->head >= PENDING_MAX)
        return -EOVERFLOW;
    if (u->head == u->npending) {
        u->head = u->npending = 0;
    } else if (u->head && u->npending + READ_BATCH > u->cap) {
        memmove(u->pending, u->pending + u->head, (u->npending - u->head) * MSG_SIZE);
        u->npending -= u->head;
        u->head = 0;
    }
    if (reserve((void **)&u->pending, &u->cap, u->npending + READ_BATCH, MSG_SIZE) < 0)
        return -ENOMEM;
    struct iovec iov = { u->pending[u->npending], READ_BATCH * MSG_SIZE };
    ssize_t n = -1;
    for (int i = 0; i < EINTR_TRIES; i++) {
        if (!u->plain_read) {
            n = preadv2(u->fd, &iov, 1, -1, RWF_NOWAIT);
            if (n < 0 && errno == EOPNOTSUPP) {
                /* a kernel without RWF_NOWAIT for uffds: O_NONBLOCK it is, set before every
                 * read, which a peer sharing the description could still clear in between
                 * (documented) */
                int fl = fcntl(u->fd, F_GETFL);
                if (fl < 0 || fcntl(u->fd, F_SETFL, fl | O_NONBLOCK) < 0)
                    return -errno;
                u->plain_read = 1;
                continue;
            }
        } else { /* (set again each time: a peer may have cleared it since) */
            int fl = fcntl(u->fd, F_GETFL);
            if (fl >= 0 && !(fl & O_NONBLOCK))
                fcntl(u->fd, F_SETFL, fl | O_NONBLOCK);
            n = read(u->fd, iov.iov_base, iov.iov_len);
        }
        if (!(n < 0 && errno == EINTR))
            break;
    }
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -errno;
    size_t k = (size_t)n / MSG_SIZE;
    u->npending += k;
    return (int)k;
}

/* A uffd whose file description lost O_NONBLOCK (a peer that shares it cleared it) polls as
 * an error at once, forever: we read with RWF_NOWAIT anyway, but set the flag again so that
 * polling it means something (a peer that keeps clearing it only costs us rounds). */
static void renew_nonblock(struct uf *u)
{
    int fl = fcntl(u->fd, F_GETFL);
    if (fl >= 0 && !(fl & O_NONBLOCK) && fcntl(u->fd, F_SETFL, fl | O_NONBLOCK) < 0)
        errno = 0;
}

/* Read the uf's next batch (see read_uf). When called outside the fault thread (an ioctl
 * from a copy worker or Python met EAGAIN), the fault thread is woken to handle what was
 * read. */
static int drain(struct sc *c, struct uf *u)
{
    int got = read_uf(u);
    if (got > 0)
        wake_thread(c);
    return got;
}

static void mark_dead(struct sc *c, struct uf *u, int err)
{
    if (u->dead)
        return;
    u->dead = 1;
    push_event(c, u->ident, SC_GONE, err, NULL);
}

/* One uffd ioctl; EINTR → retry; EAGAIN (an event is pending) → read the messages, retry.
 * -EAGAIN when the event is not readable yet (its process is still making it): the caller
 * retries on a later round instead of sleeping here. 0 or -errno. */
static int uf_ioctl(struct sc *c, struct uf *u, unsigned long req, void *arg)
{
    int eintr = 0;
    for (int i = 0; i < IOCTL_TRIES;) {
        if (ioctl(u->fd, req, arg) == 0)
            return 0;
        int err = errno;
        if (err == EINTR && ++eintr < EINTR_TRIES)
            continue;
        if (err != EAGAIN)
            return -err;
        int got = drain(c, u);
        if (got <= 0)
            return got < 0 ? got : -EAGAIN;
        i++;
    }
    return -EAGAIN;
}

static void defer_unprotect(struct sc *c, struct uf *u, uint64_t off, uint64_t len)
{
    if (u->nretry >= RETRY_MAX ||
        reserve((void **)&u->retry, &u->retry_cap, u->nretry + 1, sizeof *u->retry) < 0) {
        kill_uf(c, u, EAGAIN);
        return;
    }
    if (!u->nretry) {
        u->retry_since = mono_ns();
        wake_thread(c);
    }
    u->retry[u->nretry++] = (struct span2){ off, len };
}

/* Un-protect object range [off, off+len) in one uf, waking its waiters. ENOENT: the range is no
 * longer mapped there (an unread mremap/munmap): moved pages keep their protection and fault
 * again at their new address, so skipping is safe. A gone process is reported, not fatal. */
static void unprotect_in(struct sc *c, struct uf *u, uint64_t off, uint64_t len)
{
    if (u->dead)
        return;
    uint64_t end = off + len;
    for (int i = 0; i < u->nmaps; i++) {
        struct span *m = &u->maps[i];
        uint64_t lo = off > m->offset ? off : m->offset;
        uint64_t hi = end < m->offset + m->len ? end : m->offset + m->len;
        if (lo >= hi)
            continue;
        struct wp w = { { m->start + lo - m->offset, hi - lo }, 0 };
        int r = uf_ioctl(c, u, UFFDIO_WRITEPROTECT_IOC, &w);
        if (r == -EAGAIN) {
            defer_unprotect(c, u, lo, hi - lo);
            if (u->dead)
                return;
            continue;
        }
        if (r == -ESRCH) { /* WRITEPROTECT says so once the process has exited or exec'd */
            mark_dead(c, u, -r);
            return;
        }
        if (r < 0 && r != -ENOENT) {
            kill_uf(c, u, -r);
            return;
        }
    }
}

/* Retry the un-protects that met EAGAIN; give up on a uf whose EAGAIN outlasts the deadline. */
static void retry_unprotects(struct sc *c, uint64_t now)
{
    for (size_t i = 0; i < c->nufs; i++) {
        struct uf *u = c->ufs[i];
        if (!u->nretry)
            continue;
        if (u->dead) {
            u->nretry = 0;
            continue;
        }
        struct span2 *list = u->retry;
        size_t n = u->nretry;
        uint64_t since = u->retry_since;
        u->retry = NULL;
        u->nretry = u->retry_cap = 0;
        for (size_t k = 0; k < n && !u->dead; k++)
            unprotect_in(c, u, list[k].off, list[k].len);
        free(list);
        if (u->nretry) {
            u->retry_since = since;
            if (now > since && now - since >= c->deadline_ns)
                kill_uf(c, u, EAGAIN); /* an event that never becomes readable */
        }
    }
}

static void unprotect_everywhere(struct sc *c, uint64_t off, uint64_t len)
{
    for (size_t i = 0; i < c->nufs; i++)
        unprotect_in(c, c->ufs[i], off, len);
    for (size_t i = 0; i < c->nchans; i++)
        send_unprotect(c, c->chans[i], off, len);
    if (c->relay) { /* and to Python, for agents on the main connection */
        unsigned char msg[MSG_SIZE] = { 0 };
        memcpy(msg, &off, 8);
        memcpy(msg + 8, &len, 8);
        push_event(c, -1, SC_UNPROTECT, 0, msg);
    }
}

/* Can a fault's page wait in the deferred ring? Only while the fault thread runs (a program
 * that drives the core with sc_poll gets every page in the image at once); not once stopping
 * (nothing flushes after sc_stop), nor while Python takes faulted pages from the image
 * (sc_take_fault_saved). */
static int can_defer(const struct sc *c)
{
    return c->dcap && c->thread_started && !c->stopping && !c->fsq_limit &&
        c->dtail - c->dhead < c->dcap;
}

/* Save one page (not yet saved) from the object into the deferred ring or else the image, and
 * mark it: for faults only. */
static int save_page(struct sc *c, uint64_t page)
{
    uint64_t off = page * c->page_size, n = clip(c, off, c->page_size);
    if (can_defer(c)) {
        size_t slot = c->dtail % c->dcap;
        unsigned char *b = c->dbuf + slot * c->page_size;
        int r = pread_full(c->obj_fd, b, n, off);
        if (r < 0)
            return r;
        memset(b + n, 0, c->page_size - n);
        c->dpage[slot] = page;
        c->dtail++;
        c->saved[page] = 1;
        c->stats.fault_pages_saved++;
        return 0;
    }
    int r = pread_full(c->obj_fd, c->page_buf, n, off);
    if (r == 0)
        r = store(c, c->page_buf, n, off);
    if (r < 0)
        return r;
    c->saved[page] = 1;
    c->stats.fault_pages_saved++;
    record_fault_saved(c, page);
    return 0;
}

/* Write the deferred ring to the image (outside mu: the fault thread goes on meanwhile). Every
 * page saved before the call is in the image when it returns. 0, or -errno (the run fails). */
static int flush_deferred(struct sc *c)
{
    if (!c->dcap)
        return 0;
    pthread_mutex_lock(&c->flush_mu);
    pthread_mutex_lock(&c->mu);
    size_t from = c->dhead, to = c->dtail;
    pthread_mutex_unlock(&c->mu);
    int r = 0;
    for (size_t i = from; i < to && r == 0; i++) {
        size_t slot = i % c->dcap;
        uint64_t off = c->dpage[slot] * c->page_size;
        r = store(c, c->dbuf + slot * c->page_size, clip(c, off, c->page_size), off);
    }
    pthread_mutex_lock(&c->mu);
    c->dhead = to;
    if (r < 0)
        fail_run(c, -r);
    pthread_mutex_unlock(&c->mu);
    pthread_mutex_unlock(&c->flush_mu);
    return r;
}

static int offset_of(struct uf *u, uint64_t address, uint64_t page_size, uint64_t *off)
{
    for (int i = 0; i < u->nmaps; i++) {
        struct span *m = &u->maps[i];
        if (address >= m->start && address - m->start < m->len) {
            uint64_t o = m->offset + (address - m->start);
            *off = o - o % page_size;
            return 1;
        }
    }
    return 0;
}

static uint64_t batch_delay(const struct sc *c)
{
    size_t steps = c->nchans / BATCH_AGENTS_PER_STEP;
    return BATCH_DELAY_NS * (steps < 1 ? 1 : steps > 4 ? 4 : steps);
}

static int cmp_span(const void *a, const void *b)
{
    const struct span2 *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

/* Un-protect the batched ranges everywhere, coalesced. */
static void flush_batch(struct sc *c)
{
    if (!c->nbatch)
        return;
    qsort(c->batch, c->nbatch, sizeof *c->batch, cmp_span);
    size_t n = 0;
    for (size_t i = 0; i < c->nbatch; i++) {
        struct span2 *last = n ? &c->batch[n - 1] : NULL;
        if (last && c->batch[i].off <= last->off + last->len) {
            uint64_t end = c->batch[i].off + c->batch[i].len;
            if (end > last->off + last->len)
                last->len = end - last->off;
        } else {
            c->batch[n++] = c->batch[i];
        }
    }
    c->nbatch = 0;
    for (size_t i = 0; i < n; i++)
        unprotect_everywhere(c, c->batch[i].off, c->batch[i].len);
}

/* Queue a saved range for un-protecting everywhere (by the fault thread, within
 * BATCH_DELAY_NS). Safe to delay: a write to a saved page that is still protected faults
 * again and is answered at once from the saved map. */
static void batch_unprotect(struct sc *c, uint64_t off, uint64_t len)
{
    if (reserve((void **)&c->batch, &c->batch_cap, c->nbatch + 1, sizeof *c->batch) < 0) {
        unprotect_everywhere(c, off, len); /* no room: do it now */
        return;
    }
    if (!c->nbatch) {
        c->batch_since = mono_ns();
        wake_thread(c); /* to wait no longer than the batch delay (it may sit in an endless poll) */
    }
    c->batch[c->nbatch++] = (struct span2){ off, len };
    if (c->nbatch >= BATCH_MAX)
        flush_batch(c);
}

/* Save (if needed) and un-protect one faulting page: where it came from (a delegated uf or an
 * agent's channel) at once, everywhere else with the next batch. */
static void serve_page(struct sc *c, struct uf *u, struct chan *ch, uint64_t off, uint64_t seen,
                       int hooks)
{
    uint64_t page = off / c->page_size;
    int fresh = !c->saved[page];
    if (c->written)
        c->written[page] = 1; /* written after T: for the next incremental snapshot */
    if (fresh && hooks && (c->test_flags & SC_TEST_UNPROTECT_BEFORE_SAVE) && c->thread_started) {
        /* wrong on purpose (a test's negative control): the writer goes on before its page is
         * saved, and gets a moment to write into it (the save comes LATE_NS later, from the
         * fault thread: the lock is not held meanwhile) */
        if (u)
            unprotect_in(c, u, off, c->page_size);
        if (ch)
            send_unprotect(c, ch, off, c->page_size);
        if (reserve((void **)&c->late, &c->late_cap, c->nlate + 1, sizeof *c->late) == 0) {
            c->late[c->nlate++] = (struct late){ u ? u->ident : INT64_MIN,
                ch ? ch->ident : INT64_MIN, off, seen, mono_ns() + LATE_NS };
            wake_thread(c);
            return;
        }
    }
    if (fresh) {
        int r = save_page(c, page);
        if (r < 0) {
            if (u)
                fail_uf(c, u, -r);
            else
                fail_run(c, -r);
            return; /* the failure releases everyone */
        }
    } else {
        c->stats.duplicates++; /* saved before: its un-protect is batched or done already */
    }
    if (u)
        unprotect_in(c, u, off, c->page_size);
    if (ch)
        send_unprotect(c, ch, off, c->page_size);
    if (fresh || !(u || ch)) /* (a held fault whose source is gone: everyone, to be sure) */
        batch_unprotect(c, off, c->page_size);
    if (u) /* an agent measures its own faults, from its read to its un-protect */
        record_service(c, mono_ns() - seen);
}

/* SC_TEST_UNPROTECT_BEFORE_SAVE: the saves that are due. */
static void serve_late(struct sc *c, uint64_t now)
{
    for (size_t i = 0; i < c->nlate;) {
        struct late l = c->late[i];
        if (l.due_ns > now) {
            i++;
            continue;
        }
        c->late[i] = c->late[--c->nlate];
        struct uf *u = l.uident == INT64_MIN ? NULL : find_uf(c, l.uident);
        struct chan *ch = l.cident == INT64_MIN ? NULL : find_chan(c, l.cident);
        serve_page(c, u, ch, l.offset, l.seen_ns, 0);
    }
}

static void hold(struct sc *c, struct uf *u, struct chan *ch, uint64_t off, uint64_t seen)
{
    size_t *mine = u ? &u->nheld : &ch->nheld;
    int err = 0;
    if (c->nheld >= HELD_MAX || *mine >= HELD_PER_SOURCE_MAX)
        err = EOVERFLOW; /* more than any real workload blocks: a flooding peer */
    else if (reserve((void **)&c->held, &c->held_cap, c->nheld + 1, sizeof *c->held) < 0)
        err = ENOMEM;
    if (err) { /* stop reading it: its writers wait for the release the failure brings */
        if (u)
            kill_uf(c, u, err);
        else
            fail_chan(c, ch, err);
        return;
    }
    (*mine)++;
    c->held[c->nheld++] = (struct held){ u ? u->ident : ch->ident, !u, off, seen };
}

/* After T: serve up to `budget` of the faults held until then. Returns how many are left. */
static size_t serve_held(struct sc *c, size_t budget)
{
    uint64_t now = mono_ns();
    while (budget-- && c->serving_pos < c->nserving) {
        struct held h = c->serving[c->serving_pos++];
        uint64_t wait = now - h.seen_ns;
        if (now > h.seen_ns && wait > c->stats.held_wait_max_ns)
            c->stats.held_wait_max_ns = wait;
        if (h.is_chan) {
            struct chan *ch = find_chan(c, h.ident);
            serve_page(c, NULL, ch && !ch->dead ? ch : NULL, h.offset, h.seen_ns, 1);
        } else {
            struct uf *u = find_uf(c, h.ident);
            serve_page(c, u && !u->dead ? u : NULL, NULL, h.offset, h.seen_ns, 1);
        }
    }
    if (c->serving_pos == c->nserving) {
        free(c->serving);
        c->serving = NULL;
        c->nserving = c->serving_pos = 0;
    }
    return c->nserving - c->serving_pos;
}

/* Agent side: send the fault to the coordinator; remember when we read it. */
static void forward_fault(struct sc *c, uint64_t off, uint64_t tid, uint64_t seen)
{
    unsigned char f[FRAME_MAX];
    struct enc e;
    send_frame(c, c->forward, f, fault_frame(f, off, tid, seen, &e));
    for (size_t i = 0; i < c->nfwds; i++)
        if (c->fwds[i].offset == off)
            return; /* a repeat (after a signal): the first read counts */
    if (reserve((void **)&c->fwds, &c->fwds_cap, c->nfwds + 1, sizeof *c->fwds) == 0)
        c->fwds[c->nfwds++] = (struct fwd){ off, seen };
}

/* Coordinator side: a fault an agent forwarded. */
static void on_fault_frame(struct sc *c, struct chan *ch, const unsigned char *f, size_t n)
{
    uint64_t v[3];
    if (!parse_frame(f, n, 1, v) || v[0] % c->page_size || v[0] >= c->npages * c->page_size) {
        fail_chan(c, ch, EPROTO);
        return;
    }
    c->stats.faults++;
    uint64_t seen = mono_ns();
    if (c->state == HOLD)
        hold(c, NULL, ch, v[0], seen);
    else
        serve_page(c, NULL, ch, v[0], seen, 1);
}

/* Agent side: the coordinator saved a range; un-protect it here and note served faults. */
static void on_unprotect_frame(struct sc *c, struct chan *ch, const unsigned char *f, size_t n)
{
    uint64_t v[3];
    if (!parse_frame(f, n, 0, v) || v[0] % c->page_size || v[1] % c->page_size || !v[1] ||
        v[0] + v[1] < v[0]) {
        fail_chan(c, ch, EPROTO);
        return;
    }
    for (size_t i = 0; i < c->nufs; i++)
        unprotect_in(c, c->ufs[i], v[0], v[1]);
    uint64_t now = mono_ns();
    for (size_t i = 0; i < c->nfwds;) {
        if (c->fwds[i].offset >= v[0] && c->fwds[i].offset - v[0] < v[1]) {
            record_service(c, now - c->fwds[i].seen_ns);
            c->fwds[i] = c->fwds[--c->nfwds];
        } else {
            i++;
        }
    }
}

/* `msg` is the caller's copy: the pending list may move while the fault is handled (an
 * ioctl that meets EAGAIN reads more messages into it). */
static void handle_fault(struct sc *c, struct uf *u, const unsigned char *msg, uint64_t seen)
{
    uint64_t address, off;
    uint32_t tid;
    memcpy(&address, msg + 16, 8);
    memcpy(&tid, msg + 24, 4);
    if (!offset_of(u, address, c->page_size, &off)) {
        /* Messages come in order (a move is read, and handled by Python, before any fault at
         * its new address), so a fault we cannot place means the address table is wrong:
         * tracking is lost. Failing releases (and wakes) everyone. */
        fail_uf(c, u, EFAULT);
        return;
    }
    if (!c->forward && off >= c->npages * c->page_size) {
        /* beyond the object as it was opened (it grew since): not part of the image */
        unprotect_in(c, u, off, c->page_size);
        return;
    }
    c->stats.faults++;
    if (c->forward)
        forward_fault(c, off, tid, seen);
    else if (c->state == HOLD)
        hold(c, u, NULL, off, seen);
    else
        serve_page(c, u, NULL, off, seen, 1);
}

/* Handle the uf's pending messages in order until one needs Python (the uf is then paused). */
static void process(struct sc *c, struct uf *u, uint64_t seen)
{
    while (!u->paused && !u->dead && u->head < u->npending) {
        unsigned char msg[MSG_SIZE];
        memcpy(msg, u->pending[u->head++], MSG_SIZE);
        if (msg[0] == EVENT_PAGEFAULT) {
            handle_fault(c, u, msg, seen);
        } else {
            u->paused = 1;
            push_event(c, u->ident, SC_EVENT, 0, msg);
        }
    }
    if (u->head == u->npending)
        u->head = u->npending = 0;
}

/* Handle every uf that has processable messages (an ioctl may have drained another's). */
static void process_all(struct sc *c, uint64_t seen)
{
    int again = 1;
    while (again) {
        again = 0;
        for (size_t i = 0; i < c->nufs; i++) {
            struct uf *u = c->ufs[i];
            if (!u->paused && !u->dead && u->head < u->npending) {
                process(c, u, seen);
                again = 1;
            }
        }
    }
}

/* ---- the fault thread's rounds ---------------------------------------------------------- */

/* What one poll entry is: a delegated uffd, an agent's channel, or (agent) the forward one. */
struct polled { int kind; int64_t ident; };
enum { P_UF, P_CHAN, P_FORWARD };

static uint64_t earlier(uint64_t a, uint64_t b) { return a < b ? a : b; }

/* One round: wait (at most until the next thing due, and at most `max_wait_ns` unless that is
 * UINT64_MAX) for something to do, then do a budgeted share of it for every source. The mutex
 * is released while waiting and between sources. 1 once stopping, 0, or -errno. */
static int round_once(struct sc *c, struct pollbuf *pb, uint64_t max_wait_ns)
{
    pthread_mutex_lock(&c->mu);
    if (c->stopping) {
        pthread_mutex_unlock(&c->mu);
        return 1;
    }
    size_t want = c->nufs + c->nchans + 2, n = 0;
    if (reserve((void **)&pb->pfds, &pb->cap, want, sizeof *pb->pfds) < 0 ||
        reserve((void **)&pb->what, &pb->wcap, want, sizeof *pb->what) < 0) {
        fail_run(c, ENOMEM);
        pthread_mutex_unlock(&c->mu);
        return -ENOMEM;
    }
    uint64_t now = mono_ns(), due = UINT64_MAX;
    pb->pfds[n++] = (struct pollfd){ .fd = c->wake_fd, .events = POLLIN };
    for (size_t i = 0; i < c->nufs; i++) {
        struct uf *u = c->ufs[i];
        if (!u->paused && !u->dead) {
            pb->what[n] = (struct polled){ P_UF, u->ident };
            pb->pfds[n++] = (struct pollfd){ .fd = u->fd, .events = POLLIN };
        }
        if (u->nretry && !u->dead)
            due = earlier(due, now + RETRY_INTERVAL_NS);
    }
    for (size_t i = 0; i <= c->nchans; i++) {
        struct chan *ch = i < c->nchans ? c->chans[i] : c->forward;
        if (!ch || ch->dead)
            continue;
        short ev = POLLIN;
        if (ch->ohead < ch->oend) {
            ev |= POLLOUT;
            due = earlier(due, ch->out[ch->ohead].queued_ns + c->deadline_ns);
        }
        pb->what[n] = (struct polled){ i < c->nchans ? P_CHAN : P_FORWARD, ch->ident };
        pb->pfds[n++] = (struct pollfd){ .fd = ch->fd, .events = ev };
    }
    if (c->nbatch) /* wake up in time to flush the batch */
        due = earlier(due, c->batch_since + batch_delay(c));
    for (size_t i = 0; i < c->nlate; i++)
        due = earlier(due, c->late[i].due_ns);
    if (c->serving_pos < c->nserving)
        due = now;
    pthread_mutex_unlock(&c->mu);

    struct timespec wait, *timeout = NULL;
    uint64_t left = due == UINT64_MAX ? UINT64_MAX : due > now ? due - now : 0;
    left = earlier(left, max_wait_ns);
    if (left != UINT64_MAX) {
        wait = (struct timespec){ (time_t)(left / 1000000000ULL), (long)(left % 1000000000ULL) };
        timeout = &wait;
    }
    if (ppoll(pb->pfds, n, timeout, NULL) < 0 && errno != EINTR) {
        int err = errno;
        pthread_mutex_lock(&c->mu);
        fail_run(c, err);
        pthread_mutex_unlock(&c->mu);
        return -err;
    }
    uint64_t seen = mono_ns();
    if (pb->pfds[0].revents) {
        uint64_t v;
        ssize_t r = read(c->wake_fd, &v, sizeof v);
        (void)r;
    }
    /* Each source is one unit of work, corked (its answers leave together); the mutex is
     * released between units, and held from the wake-up through the first (a lone fault
     * waits for no one else's turn). */
    pthread_mutex_lock(&c->mu);
    int units = 0;
    if (c->serving_pos < c->nserving) {
        cork(c);
        serve_held(c, HELD_BUDGET);
        uncork(c);
        units++;
    }
    for (size_t k = 1; k < n; k++) {
        short rev = pb->pfds[k].revents;
        if (!rev)
            continue;
        if (units++) {
            pthread_mutex_unlock(&c->mu);
            pthread_mutex_lock(&c->mu);
        }
        cork(c);
        /* by identity: Python may have removed it (and the fd number been reused) */
        if (pb->what[k].kind == P_UF) {
            struct uf *u = find_uf(c, pb->what[k].ident);
            if (u && !u->dead) {
                int r = drain(c, u);
                if (r < 0) /* not a readable uffd any more, or a flood: nothing to serve */
                    kill_uf(c, u, -r);
                else
                    process(c, u, seen);
                if (r == 0 && (rev & POLLERR))
                    renew_nonblock(u);
            }
        } else {
            int fwd = pb->what[k].kind == P_FORWARD;
            struct chan *ch = fwd ? c->forward : find_chan(c, pb->what[k].ident);
            if (ch && ch->ident == pb->what[k].ident && !ch->dead) {
                if (rev & (POLLOUT | POLLERR))
                    chan_flush(c, ch);
                if (rev & (POLLIN | POLLHUP | POLLERR))
                    chan_read(c, ch, fwd ? on_unprotect_frame : on_fault_frame);
            }
        }
        uncork(c);
    }
    if (units > 1) {
        pthread_mutex_unlock(&c->mu);
        pthread_mutex_lock(&c->mu);
    }
    now = mono_ns();
    cork(c);
    process_all(c, seen);
    retry_unprotects(c, now);
    serve_late(c, now);
    if (c->nbatch && now > c->batch_since && now - c->batch_since >= batch_delay(c))
        flush_batch(c);
    uncork(c);
    for (size_t i = 0; i < c->nchans; i++)
        chan_check(c, c->chans[i], now);
    if (c->forward)
        chan_check(c, c->forward, now);
    pthread_mutex_unlock(&c->mu);
    return 0;
}

static void *fault_loop(void *arg)
{
    struct sc *c = arg;
    c->fault_self = pthread_self();
    atomic_store_explicit(&c->fault_self_set, 1, memory_order_release);
    pthread_setname_np(pthread_self(), "snapcore");
    /* A writer blocked on a fault waits for the coordinator's thread to be scheduled: ask for a
     * larger CPU share than the copy workers' (best effort: needs CAP_SYS_NICE). Not in agents:
     * with many of them, all raised, a burst of un-protects starves everything else. */
    pthread_mutex_lock(&c->mu);
    int hub = !c->forward;
    pthread_mutex_unlock(&c->mu);
    if (hub && setpriority(PRIO_PROCESS, (id_t)gettid(), FAULT_THREAD_NICE) < 0)
        errno = 0;
    struct pollbuf pb = { 0 };
    while (round_once(c, &pb, UINT64_MAX) == 0)
        ;
    atomic_store_explicit(&c->fault_self_set, 0, memory_order_release);
    free(pb.pfds);
    free(pb.what);
    return NULL;
}

/* ---- API (see uffdsnap/native/core.py) ------------------------------------------------- */

void sc_free(struct sc *c);

struct sc *sc_new(int obj_fd, int img_fd, uint64_t size, uint64_t page_size,
                  unsigned char *saved)
{
    if (page_size < 512 || page_size > (1ULL << 30) || (page_size & (page_size - 1)) ||
        size > UINT64_MAX - page_size) {
        errno = EINVAL;
        return NULL;
    }
    struct sc *c = calloc(1, sizeof *c);
    if (!c) {
        errno = ENOMEM;
        return NULL;
    }
    c->wake_fd = c->notify_fd = -1;
    pthread_mutex_init(&c->mu, NULL);
    c->obj_fd = obj_fd;
    c->img_fd = img_fd;
    c->size = size;
    c->page_size = page_size;
    c->npages = size / page_size + (size % page_size != 0); /* the last one may be partial */
    c->deadline_ns = SC_FAULT_DEADLINE_MS * 1000000ULL;
    c->state = HOLD;
    if (saved) {
        c->saved = saved;
    } else { /* an agent saves nothing */
        c->saved = calloc(obj_fd >= 0 && c->npages ? c->npages : 1, 1);
        c->saved_owned = 1;
    }
    c->page_buf = malloc(page_size);
    pthread_mutex_init(&c->flush_mu, NULL);
    if (obj_fd >= 0 && page_size <= DEFER_PAGE_MAX) { /* (without it: every save is a store) */
        c->dcap = DEFER_BYTES / page_size;
        c->dbuf = malloc(c->dcap * page_size);
        c->dpage = malloc(c->dcap * sizeof *c->dpage);
        if (!c->dbuf || !c->dpage)
            c->dcap = 0;
    }
    c->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    c->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (reserve((void **)&c->events, &c->events_cap, 64, sizeof *c->events) < 0 || !c->saved ||
        !c->page_buf || c->wake_fd < 0 || c->notify_fd < 0) {
        int err = c->wake_fd < 0 || c->notify_fd < 0 ? errno : ENOMEM;
        sc_free(c);
        errno = err;
        return NULL;
    }
    return c;
}

int sc_notify_fd(struct sc *c) { return c->notify_fd; }

unsigned char *sc_saved(struct sc *c) { return c->saved; }

/* Start the fault thread (once), with every signal blocked. 0 or -errno. */
int sc_start(struct sc *c)
{
    pthread_mutex_lock(&c->mu);
    int r = 0;
    if (!c->thread_started && !c->stopping) {
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        r = -pthread_create(&c->thread, NULL, fault_loop, c);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        c->thread_started = r == 0;
    }
    pthread_mutex_unlock(&c->mu);
    return r;
}

/* Stop the fault thread and wait for it (a round is short: nothing in it waits on a peer). */
static void stop_thread(struct sc *c)
{
    pthread_mutex_lock(&c->mu);
    c->stopping = 1;
    int started = c->thread_started;
    c->thread_started = 0;
    pthread_mutex_unlock(&c->mu);
    if (started) {
        wake_thread(c);
        pthread_join(c->thread, NULL);
    }
}

/* Stop, then write the deferred pages to the image (a failure is an SC_FAILED event): the
 * image is complete once this returns. Idempotent. */
void sc_stop(struct sc *c)
{
    stop_thread(c);
    flush_deferred(c);
}

static void free_uf(struct uf *u)
{
    for (size_t k = u->head; k < u->npending; k++)
        close_fork_fd(u->pending[k]);
    free(u->maps);
    free(u->pending);
    free(u->retry);
    free(u);
}

static void free_chan(struct chan *ch)
{
    if (ch)
        free(ch->out);
    free(ch);
}

void sc_free(struct sc *c)
{
    if (!c)
        return;
    stop_thread(c); /* not sc_stop: the image fd may be closed by now (sc_stop came first) */
    for (size_t i = 0; i < c->nufs; i++)
        free_uf(c->ufs[i]);
    for (size_t i = c->ehead; i < c->nevents; i++)
        if (c->events[i].kind == SC_EVENT)
            close_fork_fd(c->events[i].msg);
    for (size_t i = 0; i < c->nchans; i++)
        free_chan(c->chans[i]);
    free(c->chans);
    free_chan(c->forward);
    free(c->fwds);
    free(c->batch);
    free(c->ufs);
    free(c->held);
    free(c->serving);
    free(c->late);
    free(c->fsq);
    free(c->events);
    if (c->saved_owned)
        free(c->saved);
    free(c->page_buf);
    free(c->dbuf);
    free(c->dpage);
    pthread_mutex_destroy(&c->flush_mu);
    if (c->wake_fd >= 0)
        close(c->wake_fd);
    if (c->notify_fd >= 0)
        close(c->notify_fd);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

static int check_maps(int nmaps, const uint64_t *maps)
{
    if (nmaps < 0 || (nmaps && !maps))
        return -EINVAL;
    for (int i = 0; i < nmaps; i++) {
        uint64_t start = maps[3 * i], len = maps[3 * i + 1], off = maps[3 * i + 2];
        if (!len || start + len < start || off + len < off)
            return -EINVAL;
    }
    return 0;
}

static int set_maps(struct uf *u, int nmaps, const uint64_t *maps)
{
    int r = check_maps(nmaps, maps);
    if (r < 0)
        return r;
    struct span *m = malloc((nmaps ? (size_t)nmaps : 1) * sizeof *m);
    if (!m)
        return -ENOMEM;
    for (int i = 0; i < nmaps; i++)
        m[i] = (struct span){ maps[3 * i], maps[3 * i + 1], maps[3 * i + 2] };
    free(u->maps);
    u->maps = m;
    u->nmaps = nmaps;
    return 0;
}

/* Take a delegated uffd (still owned, and closed, by Python; sc_remove it first). Its file
 * description is left as it is: it is read with RWF_NOWAIT. */
int sc_add(struct sc *c, int64_t ident, int fd, int nmaps, const uint64_t *maps)
{
    if (fd < 0)
        return -EBADF;
    struct uf *u = calloc(1, sizeof *u);
    if (!u)
        return -ENOMEM;
    u->ident = ident;
    u->fd = fd;
    pthread_mutex_lock(&c->mu);
    int r = find_uf(c, ident) ? -EEXIST : set_maps(u, nmaps, maps);
    if (r == 0)
        r = reserve((void **)&c->ufs, &c->ufs_cap, c->nufs + 1, sizeof *c->ufs);
    if (r == 0) /* room for its events ahead of need: fewer ways to run out of memory later */
        r = reserve((void **)&c->events, &c->events_cap, c->nevents + 2 * (c->nufs + 1) + 16,
                    sizeof *c->events);
    if (r == 0)
        c->ufs[c->nufs++] = u;
    pthread_mutex_unlock(&c->mu);
    if (r < 0) {
        free(u->maps);
        free(u);
        return r;
    }
    wake_thread(c);
    return 0;
}

int sc_set_maps(struct sc *c, int64_t ident, int nmaps, const uint64_t *maps)
{
    pthread_mutex_lock(&c->mu);
    struct uf *u = find_uf(c, ident);
    int r = u ? set_maps(u, nmaps, maps) : -ENOENT;
    pthread_mutex_unlock(&c->mu);
    return r;
}

/* Python has handled the event that paused the uf: carry on with its pending messages. */
int sc_resume(struct sc *c, int64_t ident)
{
    pthread_mutex_lock(&c->mu);
    struct uf *u = find_uf(c, ident);
    if (u) {
        u->paused = 0;
        process(c, u, mono_ns());
        process_all(c, mono_ns());
    }
    pthread_mutex_unlock(&c->mu);
    if (u)
        wake_thread(c);
    return u ? 0 : -ENOENT;
}

/* Read a batch of the uf's messages into its pending list (Python's ioctls met EAGAIN). */
int sc_drain(struct sc *c, int64_t ident)
{
    pthread_mutex_lock(&c->mu);
    struct uf *u = find_uf(c, ident);
    int r = u ? drain(c, u) : -ENOENT;
    if (r < 0 && u)
        kill_uf(c, u, -r);
    pthread_mutex_unlock(&c->mu);
    if (r > 0)
        wake_thread(c);
    return r;
}

/* Forget a uf or a channel; afterwards Python may close its fd. */
int sc_remove(struct sc *c, int64_t ident)
{
    pthread_mutex_lock(&c->mu);
    int r = -ENOENT;
    for (size_t i = 0; i < c->nufs; i++) {
        struct uf *u = c->ufs[i];
        if (u->ident != ident)
            continue;
        c->ufs[i] = c->ufs[--c->nufs];
        free_uf(u);
        r = 0;
        break;
    }
    for (size_t i = 0; r && i < c->nchans; i++) {
        if (c->chans[i]->ident != ident)
            continue;
        free_chan(c->chans[i]);
        c->chans[i] = c->chans[--c->nchans];
        r = 0;
    }
    pthread_mutex_unlock(&c->mu);
    wake_thread(c);
    return r;
}

static struct chan *new_chan(int64_t ident, int fd)
{
    if (fd < 0) {
        errno = EBADF;
        return NULL;
    }
    struct chan *ch = calloc(1, sizeof *ch);
    if (ch)
        ch->ident = ident, ch->fd = fd;
    else
        errno = ENOMEM;
    return ch;
}

/* Coordinator: serve the faults an agent forwards over `fd` (Python keeps and closes it). */
int sc_add_channel(struct sc *c, int64_t ident, int fd)
{
    struct chan *ch = new_chan(ident, fd);
    if (!ch)
        return -errno;
    pthread_mutex_lock(&c->mu);
    int r = find_chan(c, ident) ? -EEXIST : 0;
    if (r == 0)
        r = reserve((void **)&c->chans, &c->chans_cap, c->nchans + 1, sizeof *c->chans);
    if (r == 0)
        r = reserve((void **)&c->events, &c->events_cap, c->nevents + 2 * (c->nchans + 1) + 16,
                    sizeof *c->events);
    if (r == 0)
        c->chans[c->nchans++] = ch;
    pthread_mutex_unlock(&c->mu);
    if (r < 0)
        free(ch);
    else
        wake_thread(c);
    return r;
}

/* Agent: forward faults over `fd`, apply the un-protects that come back (never save pages). */
int sc_set_forward(struct sc *c, int64_t ident, int fd)
{
    struct chan *ch = new_chan(ident, fd);
    if (!ch)
        return -errno;
    pthread_mutex_lock(&c->mu);
    free_chan(c->forward);
    c->forward = ch;
    c->state = SERVE;
    pthread_mutex_unlock(&c->mu);
    wake_thread(c);
    return 0;
}

/* T: serve the faults held since protecting began (the fault thread does, a budget per round;
 * without one, this call does), then every fault as it comes. */
void sc_go(struct sc *c)
{
    pthread_mutex_lock(&c->mu);
    if (c->state == SERVE) {
        pthread_mutex_unlock(&c->mu);
        return;
    }
    c->state = SERVE;
    c->serving = c->held;
    c->nserving = c->nheld;
    c->serving_pos = 0;
    c->held = NULL;
    c->nheld = c->held_cap = 0;
    for (size_t i = 0; i < c->nufs; i++)
        c->ufs[i]->nheld = 0;
    for (size_t i = 0; i < c->nchans; i++)
        c->chans[i]->nheld = 0;
    int threaded = c->thread_started;
    pthread_mutex_unlock(&c->mu);
    if (threaded) {
        wake_thread(c);
        return;
    }
    for (size_t left = 1; left;) {
        pthread_mutex_lock(&c->mu);
        left = serve_held(c, HELD_BUDGET);
        pthread_mutex_unlock(&c->mu);
    }
}

/* Save one page for a fault Python received (agents mode): 1 saved now, 0 saved before,
 * -errno. Un-protected in every delegated uf; Python tells the agents. */
int sc_save_page(struct sc *c, uint64_t page)
{
    if (page >= c->npages || c->obj_fd < 0)
        return -EINVAL;
    pthread_mutex_lock(&c->mu);
    int r = 0;
    if (c->written)
        c->written[page] = 1;
    if (!c->saved[page]) {
        r = save_page(c, page);
        if (r == 0) {
            unprotect_everywhere(c, page * c->page_size, c->page_size);
            r = 1;
        }
    }
    pthread_mutex_unlock(&c->mu);
    return r;
}

/* [off, off+len) starts on a page and ends inside the object's last page: 0 or -EINVAL. */
static int check_range(const struct sc *c, uint64_t off, uint64_t len)
{
    if (off % c->page_size || len > UINT64_MAX - off || off + len > c->npages * c->page_size)
        return -EINVAL;
    return 0;
}

/* Mark the unsaved pages of [off, off+len) (checked) saved and record them as runs (start,
 * end) in `runs` (room for max_runs): the number of runs, or -E2BIG with nothing marked. `was`
 * (if any) gets each page's saved byte from before. */
static int claim(struct sc *c, uint64_t off, uint64_t len, uint64_t *runs, int max_runs,
                 unsigned char *was)
{
    uint64_t first = off / c->page_size, last = first + len / c->page_size +
        (len % c->page_size != 0);
    int n = 0;
    for (uint64_t p = first; p < last; p++)
        if (!c->saved[p] && (p == first || c->saved[p - 1]))
            n++;
    if (n > max_runs)
        return -E2BIG;
    n = 0;
    for (uint64_t p = first; p < last;) {
        if (was)
            was[p - first] = c->saved[p];
        if (c->saved[p]) {
            p++;
            continue;
        }
        uint64_t q = p;
        while (q < last && !c->saved[q]) {
            if (was)
                was[q - first] = 0;
            c->saved[q++] = 1;
        }
        runs[2 * n] = p * c->page_size;
        runs[2 * n + 1] = q * c->page_size;
        n++;
        p = q;
    }
    return n;
}

static void unprotect_runs(struct sc *c, const uint64_t *runs, int n)
{
    if (c->written)
        return; /* tracking writes: a page saved by the scan stays protected until written */
    int was_empty = c->nbatch == 0;
    for (int i = 0; i < n; i++)
        batch_unprotect(c, runs[2 * i], runs[2 * i + 1] - runs[2 * i]);
    if (was_empty && c->nbatch)
        wake_thread(c); /* it flushes the batch on time */
}

/* A hole now was a hole at T (zero in the image already): claim its unsaved pages. The range
 * must start on a page and end inside the object's last page (-EINVAL); -E2BIG (nothing
 * claimed) if `runs` has no room for them all. */
int sc_claim(struct sc *c, uint64_t off, uint64_t len, uint64_t *runs, int max_runs)
{
    if (max_runs < 0 || c->obj_fd < 0)
        return -EINVAL;
    pthread_mutex_lock(&c->mu);
    int n = check_range(c, off, len);
    if (n == 0)
        n = claim(c, off, len, runs, max_runs, NULL);
    if (n > 0)
        unprotect_runs(c, runs, n);
    pthread_mutex_unlock(&c->mu);
    return n;
}

/* Copy window [off, off+len) into `buf` as it was at T and store what was not saved yet:
 * read it (the pages still unsaved at the claim were protected everywhere during the read, so
 * what was read is their content at T), claim the unsaved pages, take the pages saved earlier
 * (by faults) from the image, store the claimed runs, un-protect them. `buf` ends up holding
 * the window's content at T (Python checksums it). Returns the number of claimed runs. */
int sc_copy_window(struct sc *c, uint64_t off, uint64_t len, unsigned char *buf, uint64_t *runs,
                   int max_runs)
{
    if (c->obj_fd < 0 || max_runs < 0 || off % c->page_size || len > c->size ||
        off > c->size - len || (len % c->page_size && off + len != c->size))
        return -EINVAL; /* whole pages, or up to the object's end */
    uint64_t npg = len / c->page_size + (len % c->page_size != 0);
    unsigned char *was = malloc(npg ? npg : 1);
    if (!was)
        return -ENOMEM;
    int r = pread_full(c->obj_fd, buf, len, off);
    if (r < 0)
        goto out;
    pthread_mutex_lock(&c->mu);
    r = claim(c, off, len, runs, max_runs, was);
    pthread_mutex_unlock(&c->mu);
    if (r < 0)
        goto out;
    int e0 = flush_deferred(c); /* pages saved before the claim: in the image now */
    if (e0 < 0) {
        r = e0;
        goto out;
    }
    for (uint64_t p = 0; p < npg;) {
        if (!was[p]) {
            p++;
            continue;
        }
        uint64_t q = p;
        while (q < npg && was[q])
            q++;
        uint64_t a = p * c->page_size, b = q * c->page_size < len ? q * c->page_size : len;
        int e = pread_full(c->img_fd, buf + a, b - a, off + a);
        if (e < 0) {
            r = e;
            goto out;
        }
        p = q;
    }
    for (int i = 0; i < r; i++) {
        uint64_t a = runs[2 * i];
        int e = store(c, buf + (a - off), clip(c, a, runs[2 * i + 1] - a), a);
        if (e < 0) {
            r = e;
            goto out;
        }
    }
    pthread_mutex_lock(&c->mu);
    unprotect_runs(c, runs, r);
    pthread_mutex_unlock(&c->mu);
out:
    free(was);
    return r;
}

/* After sc_stop: hand the uf's unhandled messages back (up to `max`; returns how many), so
 * that the caller, reading the uffd itself again, handles them in order. */
int sc_take_pending(struct sc *c, int64_t ident, unsigned char *out, int max)
{
    if (max < 0)
        return -EINVAL;
    pthread_mutex_lock(&c->mu);
    struct uf *u = find_uf(c, ident);
    int n = 0;
    if (u) {
        while (u->head < u->npending && n < max)
            memcpy(out + MSG_SIZE * n++, u->pending[u->head++], MSG_SIZE);
    }
    pthread_mutex_unlock(&c->mu);
    return n;
}

/* Move up to `max` queued events to `out`, in order; returns how many. After the last one, a
 * failure of the run (ident -1) if some event could not be queued. */
int sc_take_events(struct sc *c, struct sc_event *out, int max)
{
    if (max < 0)
        return -EINVAL;
    uint64_t v;
    ssize_t rd = read(c->notify_fd, &v, sizeof v);
    (void)rd;
    pthread_mutex_lock(&c->mu);
    size_t queued = c->nevents - c->ehead;
    size_t n = queued < (size_t)max ? queued : (size_t)max;
    if (n)
        memcpy(out, c->events + c->ehead, n * sizeof *out);
    c->ehead += n;
    if (c->ehead == c->nevents)
        c->ehead = c->nevents = 0;
    if (n < (size_t)max && c->nevents == 0 && c->events_lost_err) {
        out[n++] = (struct sc_event){ .ident = -1, .kind = SC_FAILED,
                                      .err = c->events_lost_err };
        c->events_lost_err = 0;
        c->run_failed = 1;
    }
    if (c->nevents || c->events_lost_err)
        notify(c);
    pthread_mutex_unlock(&c->mu);
    return (int)n;
}

void sc_stats(struct sc *c, struct sc_stats *out, uint64_t *hist)
{
    pthread_mutex_lock(&c->mu);
    *out = c->stats;
    memcpy(hist, c->hist, sizeof c->hist);
    pthread_mutex_unlock(&c->mu);
}

int sc_hist_buckets(void) { return HIST_BUCKETS; }

int sc_abi_version(void) { return SC_ABI_VERSION; }

int sc_relay_unprotects(struct sc *c)
{
    pthread_mutex_lock(&c->mu);
    c->relay = 1;
    pthread_mutex_unlock(&c->mu);
    return sc_start(c); /* its thread flushes batches */
}

int sc_track_writes(struct sc *c, unsigned char *written)
{
    if (!written || c->obj_fd < 0)
        return -EINVAL;
    pthread_mutex_lock(&c->mu);
    c->written = written;
    pthread_mutex_unlock(&c->mu);
    return 0;
}

void sc_set_test_flags(struct sc *c, int flags)
{
    pthread_mutex_lock(&c->mu);
    c->test_flags = flags;
    pthread_mutex_unlock(&c->mu);
}

int sc_set_fault_deadline(struct sc *c, uint64_t ms)
{
    if (!ms || ms > DEADLINE_MAX_MS)
        return -EINVAL;
    pthread_mutex_lock(&c->mu);
    c->deadline_ns = ms * 1000000ULL;
    pthread_mutex_unlock(&c->mu);
    wake_thread(c); /* outboxes may be due sooner now */
    return 0;
}

int sc_set_fault_saved_limit(struct sc *c, uint64_t n)
{
    pthread_mutex_lock(&c->mu);
    c->fsq_limit = n;
    if (!n) {
        free(c->fsq);
        c->fsq = NULL;
        c->fsq_head = c->fsq_count = c->fsq_cap = 0;
        c->fsq_overflow = 0;
    }
    pthread_mutex_unlock(&c->mu);
    return 0;
}

int sc_take_fault_saved(struct sc *c, uint64_t *pages, int max)
{
    if (max < 0)
        return -EINVAL;
    flush_deferred(c); /* (none while recording: see can_defer) */
    pthread_mutex_lock(&c->mu);
    size_t n = c->fsq_count < (size_t)max ? c->fsq_count : (size_t)max;
    for (size_t i = 0; i < n; i++)
        pages[i] = c->fsq[(c->fsq_head + i) % c->fsq_cap];
    if (n) {
        c->fsq_head = (c->fsq_head + n) % c->fsq_cap;
        c->fsq_count -= n;
    }
    int r = !n && max && c->fsq_overflow ? -ENOBUFS : (int)n;
    pthread_mutex_unlock(&c->mu);
    return r;
}

int sc_poll(struct sc *c, int timeout_ms)
{
    pthread_mutex_lock(&c->mu);
    int busy = c->thread_started;
    pthread_mutex_unlock(&c->mu);
    if (busy)
        return -EBUSY;
    struct pollbuf pb = { 0 };
    int r = round_once(c, &pb, timeout_ms < 0 ? UINT64_MAX : (uint64_t)timeout_ms * 1000000ULL);
    free(pb.pfds);
    free(pb.what);
    return r < 0 ? r : 0;
}

void sc_abi_sizes(uint64_t *event_size, uint64_t *stats_size)
{
    *event_size = sizeof(struct sc_event);
    *stats_size = sizeof(struct sc_stats);
}
