/*
 * snapcore — the coordinator's data path in C: a shared library loaded with ctypes by
 * uffdsnap/kernel/snapcore.py, one context per snapshot. Its ABI is snapcore.h.
 *
 * Why native: a fault's service time is what a blocked writer waits, and in Python it is bounded
 * by event-loop and GIL hand-offs (hundreds of µs to ms on a busy machine), while the kernel work
 * (read the fault, pread the page, pwrite it, un-protect) takes tens of µs. Here a pthread that
 * never touches the GIL serves the faults of delegated uffds, and the copy workers' window
 * copies run with the GIL released. Policy stays in Python: phases, who takes part, events
 * (fork, mremap, munmap, MADV_REMOVE), failures.
 *
 * What this library owns, all under one mutex:
 *  - the `saved` map, one byte per page (0 → 1 once, never back); Python reads it directly;
 *  - every write into the image file (pages are written before they are marked saved, or, for
 *    a copy window, read before they are claimed: either way the image gets content at T);
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
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "snapcore.h"

#define UFFDIO_WRITEPROTECT_IOC 0xC018AA06UL
#define UFFDIO_WAKE_IOC 0x8010AA02UL
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
#define HELD_MAX (1u << 20) /* faults held until T, at most */
#define SEND_TIMEOUT_S 10 /* a peer that takes no message for this long is dropped */
#define MSG_SIZE SC_MSG_SIZE
#define READ_BATCH 64
#define ZERO_BLOCK 4096
#define HIST_BUCKETS SC_HIST_BUCKETS
#define EAGAIN_RETRIES 2000

enum { HOLD = 0, SERVE = 1 };

struct span { uint64_t start, len, offset; };
struct range { uint64_t start, len; };
struct wp { struct range range; uint64_t mode; };

struct uf {
    int64_t ident;
    int fd, paused, dead;
    struct span *maps;
    int nmaps;
    unsigned char (*pending)[MSG_SIZE];
    size_t npending, head, cap;
};

/* A fault channel: the coordinator's end (faults in, un-protects out), or the agent's. */
struct chan {
    int64_t ident;
    int fd, dead;
    unsigned char in[4096];
    size_t nin;
};

struct held { int64_t ident; int is_chan; uint64_t offset, seen_ns; };
struct fwd { uint64_t offset, seen_ns; }; /* agent: a forwarded fault awaiting its un-protect */
struct span2 { uint64_t off, len; };

struct sc {
    pthread_mutex_t mu;
    int obj_fd, img_fd, wake_fd, notify_fd, state, stopping, thread_started;
    uint64_t size, page_size, npages;
    unsigned char *saved;
    pthread_t thread;
    struct uf **ufs;
    size_t nufs, ufs_cap;
    struct held *held;
    size_t nheld, held_cap;
    struct sc_event *events;
    size_t nevents, events_cap;
    struct sc_stats stats;
    uint64_t hist[HIST_BUCKETS];
    unsigned char *page_buf;
    struct chan **chans; /* coordinator: the agents' fault channels */
    size_t nchans, chans_cap;
    struct chan *forward; /* agent: where faults go and un-protects come from */
    struct fwd *fwds;
    size_t nfwds, fwds_cap;
    struct span2 *batch; /* saved ranges not yet un-protected everywhere */
    size_t nbatch, batch_cap;
    uint64_t batch_since;
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

static void push_event(struct sc *c, int64_t ident, int kind, int err, const unsigned char *msg)
{
    if (reserve((void **)&c->events, &c->events_cap, c->nevents + 1, sizeof *c->events) < 0) {
        /* out of memory: the last slot (sc_new reserves some) says so instead */
        kind = SC_FAILED, err = ENOMEM, ident = -1, msg = NULL;
        c->nevents--;
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

static struct uf *find_uf(struct sc *c, int64_t ident)
{
    for (size_t i = 0; i < c->nufs; i++)
        if (c->ufs[i]->ident == ident)
            return c->ufs[i];
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

static void fail(struct sc *c, int64_t ident, int err)
{
    push_event(c, ident, SC_FAILED, err, NULL);
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

static void chan_lost(struct sc *c, struct chan *ch, int err)
{
    if (ch->dead)
        return;
    ch->dead = 1;
    push_event(c, ch->ident, SC_GONE, err, NULL);
}

static void send_frame(struct sc *c, struct chan *ch, const unsigned char *f, size_t n)
{
    while (n && !ch->dead) {
        ssize_t k = send(ch->fd, f, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) { /* EAGAIN here is SO_SNDTIMEO expiring: the peer stopped reading */
            chan_lost(c, ch, k < 0 ? errno : EPIPE);
            return;
        }
        f += k;
        n -= (size_t)k;
    }
}

static void send_unprotect(struct sc *c, struct chan *ch, uint64_t off, uint64_t len)
{
    unsigned char f[FRAME_MAX];
    struct enc e;
    send_frame(c, ch, f, unprotect_frame(f, off, len, &e));
}

/* Read what the channel has and hand each complete frame to `on_frame`. */
static void chan_read(struct sc *c, struct chan *ch,
                      void (*on_frame)(struct sc *, struct chan *, const unsigned char *, size_t))
{
    for (;;) {
        ssize_t k = recv(ch->fd, ch->in + ch->nin, sizeof ch->in - ch->nin, MSG_DONTWAIT);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && errno == EAGAIN)
            return;
        if (k <= 0) {
            chan_lost(c, ch, k < 0 ? errno : 0);
            return;
        }
        ch->nin += (size_t)k;
        size_t pos = 0;
        while (ch->nin - pos >= 4 && !ch->dead) {
            size_t len = (size_t)get_u64((const unsigned char[8]){ 0, 0, 0, 0, ch->in[pos],
                ch->in[pos + 1], ch->in[pos + 2], ch->in[pos + 3] });
            if (len + 4 > FRAME_MAX) {
                ch->dead = 1;
                fail(c, ch->ident, EPROTO);
                return;
            }
            if (ch->nin - pos < len + 4)
                break;
            on_frame(c, ch, ch->in + pos, len + 4);
            pos += len + 4;
        }
        memmove(ch->in, ch->in + pos, ch->nin - pos);
        ch->nin -= pos;
    }
}

static void wake_thread(struct sc *c);
static int drain_messages(struct uf *u);

/* Read whatever messages the uf has into its pending list. Returns how many, or -errno. When
 * called outside the fault thread (an ioctl from a copy worker or Python met EAGAIN), the fault
 * thread is woken to handle what was read. */
static int drain(struct sc *c, struct uf *u)
{
    int got = drain_messages(u);
    if (got > 0 && !(c->thread_started && pthread_equal(pthread_self(), c->thread)))
        wake_thread(c);
    return got;
}

static int drain_messages(struct uf *u)
{
    unsigned char buf[READ_BATCH * MSG_SIZE];
    int total = 0;
    for (;;) {
        ssize_t n = read(u->fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return total;
            return -errno;
        }
        if (n == 0)
            return total;
        size_t k = (size_t)n / MSG_SIZE;
        if (reserve((void **)&u->pending, &u->cap, u->npending + k, MSG_SIZE) < 0)
            return -ENOMEM;
        memcpy(u->pending[u->npending], buf, k * MSG_SIZE);
        u->npending += k;
        total += (int)k;
        if ((size_t)n < sizeof buf)
            return total;
    }
}

static void mark_dead(struct sc *c, struct uf *u, int err)
{
    if (u->dead)
        return;
    u->dead = 1;
    push_event(c, u->ident, SC_GONE, err, NULL);
}

/* One uffd ioctl; EAGAIN (an event is pending) → read the messages, retry. 0 or -errno. */
static int uf_ioctl(struct sc *c, struct uf *u, unsigned long req, void *arg)
{
    for (int i = 0; i < EAGAIN_RETRIES; i++) {
        if (ioctl(u->fd, req, arg) == 0)
            return 0;
        int err = errno;
        if (err != EAGAIN)
            return -err;
        int got = drain(c, u);
        if (got < 0)
            return got;
        if (got == 0)
            usleep(50);
    }
    return -EAGAIN;
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
        if (r == -ESRCH) { /* WRITEPROTECT says so once the process has exited or exec'd */
            mark_dead(c, u, -r);
            return;
        }
        if (r < 0 && r != -ENOENT) {
            fail(c, u->ident, -r);
            return;
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

/* Save one page (not yet saved) from the object into the image and mark it. */
static int save_page(struct sc *c, uint64_t page)
{
    uint64_t off = page * c->page_size, n = clip(c, off, c->page_size);
    int r = pread_full(c->obj_fd, c->page_buf, n, off);
    if (r == 0)
        r = store(c, c->page_buf, n, off);
    if (r < 0)
        return r;
    c->saved[page] = 1;
    c->stats.fault_pages_saved++;
    return 0;
}

static int offset_of(struct uf *u, uint64_t address, uint64_t page_size, uint64_t *off)
{
    for (int i = 0; i < u->nmaps; i++) {
        struct span *m = &u->maps[i];
        if (address >= m->start && address < m->start + m->len) {
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
static void serve_page(struct sc *c, struct uf *u, struct chan *ch, uint64_t off, uint64_t seen)
{
    uint64_t page = off / c->page_size;
    int fresh = !c->saved[page];
    if (fresh && (c->test_flags & SC_TEST_UNPROTECT_BEFORE_SAVE)) {
        /* wrong on purpose (a test's negative control): the writer goes on before its page is
         * saved, and gets a moment to write into it */
        if (u)
            unprotect_in(c, u, off, c->page_size);
        if (ch)
            send_unprotect(c, ch, off, c->page_size);
        struct timespec ts = { 0, 200000 };
        nanosleep(&ts, NULL);
    }
    if (fresh) {
        int r = save_page(c, page);
        if (r < 0) {
            fail(c, u ? u->ident : -1, -r);
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

static int hold(struct sc *c, int64_t ident, int is_chan, uint64_t off, uint64_t seen)
{
    if (c->nheld >= HELD_MAX) { /* more than any real workload blocks: a flooding peer */
        fail(c, ident, EOVERFLOW);
        return -1;
    }
    if (reserve((void **)&c->held, &c->held_cap, c->nheld + 1, sizeof *c->held) < 0) {
        fail(c, ident, ENOMEM);
        return -1;
    }
    c->held[c->nheld++] = (struct held){ ident, is_chan, off, seen };
    return 0;
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
        ch->dead = 1;
        fail(c, ch->ident, EPROTO);
        return;
    }
    c->stats.faults++;
    uint64_t seen = mono_ns();
    if (c->state == HOLD)
        hold(c, ch->ident, 1, v[0], seen);
    else
        serve_page(c, NULL, ch, v[0], seen);
}

/* Agent side: the coordinator saved a range; un-protect it here and note served faults. */
static void on_unprotect_frame(struct sc *c, struct chan *ch, const unsigned char *f, size_t n)
{
    uint64_t v[3];
    if (!parse_frame(f, n, 0, v) || v[0] % c->page_size || v[1] % c->page_size || !v[1] ||
        v[0] + v[1] < v[0]) {
        ch->dead = 1;
        fail(c, ch->ident, EPROTO);
        return;
    }
    for (size_t i = 0; i < c->nufs; i++)
        unprotect_in(c, c->ufs[i], v[0], v[1]);
    uint64_t now = mono_ns();
    for (size_t i = 0; i < c->nfwds;) {
        if (c->fwds[i].offset >= v[0] && c->fwds[i].offset < v[0] + v[1]) {
            record_service(c, now - c->fwds[i].seen_ns);
            c->fwds[i] = c->fwds[--c->nfwds];
        } else {
            i++;
        }
    }
}

static void handle_fault(struct sc *c, struct uf *u, const unsigned char *msg, uint64_t seen)
{
    uint64_t address, off;
    memcpy(&address, msg + 16, 8);
    if (!offset_of(u, address, c->page_size, &off)) {
        /* Messages come in order (a move is read, and handled by Python, before any fault at
         * its new address), so a fault we cannot place means the address table is wrong:
         * tracking is lost. Failing releases (and wakes) everyone. */
        fail(c, u->ident, EFAULT);
        return;
    }
    if (!c->forward && off >= c->npages * c->page_size) {
        /* beyond the object as it was opened (it grew since): not part of the image */
        unprotect_in(c, u, off, c->page_size);
        return;
    }
    c->stats.faults++;
    if (c->forward) {
        uint32_t tid;
        memcpy(&tid, msg + 24, 4);
        forward_fault(c, off, tid, seen);
    } else if (c->state == HOLD) {
        hold(c, u->ident, 0, off, seen);
    } else {
        serve_page(c, u, NULL, off, seen);
    }
}

/* Handle the uf's pending messages in order until one needs Python (the uf is then paused). */
static void process(struct sc *c, struct uf *u, uint64_t seen)
{
    while (!u->paused && !u->dead && u->head < u->npending) {
        unsigned char *msg = u->pending[u->head++];
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

/* What one poll entry is: a delegated uffd, an agent's channel, or (agent) the forward one. */
struct polled { int kind; int64_t ident; };
enum { P_UF, P_CHAN, P_FORWARD };

static struct chan *find_chan(struct sc *c, int64_t ident)
{
    for (size_t i = 0; i < c->nchans; i++)
        if (c->chans[i]->ident == ident)
            return c->chans[i];
    return NULL;
}

static void *fault_loop(void *arg)
{
    struct sc *c = arg;
    /* A writer blocked on a fault waits for the coordinator's thread to be scheduled: ask for a
     * larger CPU share than the copy workers' (best effort: needs CAP_SYS_NICE). Not in agents:
     * with many of them, all raised, a burst of un-protects starves everything else. */
    pthread_mutex_lock(&c->mu);
    int hub = !c->forward;
    pthread_mutex_unlock(&c->mu);
    if (hub && setpriority(PRIO_PROCESS, (id_t)gettid(), FAULT_THREAD_NICE) < 0)
        errno = 0;
    struct pollfd *pfds = NULL;
    struct polled *what = NULL;
    size_t cap = 0, wcap = 0;
    for (;;) {
        pthread_mutex_lock(&c->mu);
        if (c->stopping) {
            pthread_mutex_unlock(&c->mu);
            break;
        }
        size_t want = c->nufs + c->nchans + 2, n = 0;
        if (reserve((void **)&pfds, &cap, want, sizeof *pfds) < 0 ||
            reserve((void **)&what, &wcap, want, sizeof *what) < 0) {
            fail(c, -1, ENOMEM);
            pthread_mutex_unlock(&c->mu);
            break;
        }
        pfds[n++] = (struct pollfd){ .fd = c->wake_fd, .events = POLLIN };
        for (size_t i = 0; i < c->nufs; i++) {
            struct uf *u = c->ufs[i];
            if (!u->paused && !u->dead) {
                what[n] = (struct polled){ P_UF, u->ident };
                pfds[n++] = (struct pollfd){ .fd = u->fd, .events = POLLIN };
            }
        }
        for (size_t i = 0; i < c->nchans; i++) {
            if (!c->chans[i]->dead) {
                what[n] = (struct polled){ P_CHAN, c->chans[i]->ident };
                pfds[n++] = (struct pollfd){ .fd = c->chans[i]->fd, .events = POLLIN };
            }
        }
        if (c->forward && !c->forward->dead) {
            what[n] = (struct polled){ P_FORWARD, c->forward->ident };
            pfds[n++] = (struct pollfd){ .fd = c->forward->fd, .events = POLLIN };
        }
        struct timespec wait = { 0, 0 }, *timeout = NULL;
        if (c->nbatch) { /* wake up in time to flush the batch */
            uint64_t due = c->batch_since + batch_delay(c), now = mono_ns();
            uint64_t left = due > now ? due - now : 0;
            wait = (struct timespec){ (time_t)(left / 1000000000ULL), (long)(left % 1000000000ULL) };
            timeout = &wait;
        }
        pthread_mutex_unlock(&c->mu);

        if (ppoll(pfds, n, timeout, NULL) < 0 && errno != EINTR) {
            pthread_mutex_lock(&c->mu);
            fail(c, -1, errno);
            pthread_mutex_unlock(&c->mu);
            break;
        }
        uint64_t seen = mono_ns();
        if (pfds[0].revents) {
            uint64_t v;
            ssize_t r = read(c->wake_fd, &v, sizeof v);
            (void)r;
        }
        pthread_mutex_lock(&c->mu);
        for (size_t k = 1; k < n; k++) {
            if (!pfds[k].revents)
                continue;
            /* by identity: Python may have removed it (and the fd number been reused) */
            if (what[k].kind == P_UF) {
                struct uf *u = find_uf(c, what[k].ident);
                if (!u || u->dead)
                    continue;
                int r = drain(c, u);
                if (r < 0) { /* not a readable uffd any more: nothing can be served there */
                    u->dead = 1;
                    fail(c, u->ident, -r);
                    continue;
                }
                process(c, u, seen);
            } else if (what[k].kind == P_CHAN) {
                struct chan *ch = find_chan(c, what[k].ident);
                if (ch && !ch->dead)
                    chan_read(c, ch, on_fault_frame);
            } else if (c->forward && c->forward->ident == what[k].ident && !c->forward->dead) {
                chan_read(c, c->forward, on_unprotect_frame);
            }
        }
        process_all(c, seen);
        if (c->nbatch && mono_ns() - c->batch_since >= batch_delay(c))
            flush_batch(c);
        pthread_mutex_unlock(&c->mu);
    }
    free(pfds);
    free(what);
    return NULL;
}

static void wake_thread(struct sc *c)
{
    uint64_t one = 1;
    ssize_t r = write(c->wake_fd, &one, sizeof one);
    (void)r;
}

/* ---- API (see uffdsnap/kernel/snapcore.py) ------------------------------------------------ */

void sc_free(struct sc *c);

struct sc *sc_new(int obj_fd, int img_fd, uint64_t size, uint64_t page_size)
{
    struct sc *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    pthread_mutex_init(&c->mu, NULL);
    c->obj_fd = obj_fd;
    c->img_fd = img_fd;
    c->size = size;
    c->page_size = page_size;
    c->npages = (size + page_size - 1) / page_size; /* the last one may be partial */
    c->state = HOLD;
    c->saved = calloc(obj_fd >= 0 && c->npages ? c->npages : 1, 1); /* an agent saves nothing */
    c->page_buf = malloc(page_size);
    c->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    c->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (reserve((void **)&c->events, &c->events_cap, 64, sizeof *c->events) < 0 || !c->saved || !c->page_buf || c->wake_fd < 0 || c->notify_fd < 0) {
        sc_free(c);
        return NULL;
    }
    return c;
}

int sc_notify_fd(struct sc *c) { return c->notify_fd; }

unsigned char *sc_saved(struct sc *c) { return c->saved; }

/* Start the fault thread (once). 0 or -errno. */
int sc_start(struct sc *c)
{
    pthread_mutex_lock(&c->mu);
    int r = 0;
    if (!c->thread_started) {
        r = -pthread_create(&c->thread, NULL, fault_loop, c);
        c->thread_started = r == 0;
    }
    pthread_mutex_unlock(&c->mu);
    return r;
}

/* Stop the fault thread and wait for it. Idempotent. */
void sc_stop(struct sc *c)
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

static void free_uf(struct uf *u)
{
    for (size_t k = u->head; k < u->npending; k++)
        close_fork_fd(u->pending[k]);
    free(u->maps);
    free(u->pending);
    free(u);
}

void sc_free(struct sc *c)
{
    if (!c)
        return;
    sc_stop(c);
    for (size_t i = 0; i < c->nufs; i++)
        free_uf(c->ufs[i]);
    for (size_t i = 0; i < c->nevents; i++)
        if (c->events[i].kind == SC_EVENT)
            close_fork_fd(c->events[i].msg);
    for (size_t i = 0; i < c->nchans; i++)
        free(c->chans[i]);
    free(c->chans);
    free(c->forward);
    free(c->fwds);
    free(c->batch);
    free(c->ufs);
    free(c->held);
    free(c->events);
    free(c->saved);
    free(c->page_buf);
    if (c->wake_fd >= 0)
        close(c->wake_fd);
    if (c->notify_fd >= 0)
        close(c->notify_fd);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

static int set_maps(struct uf *u, int nmaps, const uint64_t *maps)
{
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

/* Take a delegated uffd (still owned, and closed, by Python; sc_remove it first). */
int sc_add(struct sc *c, int64_t ident, int fd, int nmaps, const uint64_t *maps)
{
    struct uf *u = calloc(1, sizeof *u);
    if (!u)
        return -ENOMEM;
    u->ident = ident;
    u->fd = fd;
    /* drain() reads until EAGAIN: a blocking fd would stall the fault thread with the lock held */
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)) {
        int err = errno;
        free(u);
        return -err;
    }
    pthread_mutex_lock(&c->mu);
    int r = set_maps(u, nmaps, maps);
    if (r == 0)
        r = reserve((void **)&c->ufs, &c->ufs_cap, c->nufs + 1, sizeof *c->ufs);
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

/* Read the uf's messages into its pending list (Python's ioctls met EAGAIN). */
int sc_drain(struct sc *c, int64_t ident)
{
    pthread_mutex_lock(&c->mu);
    struct uf *u = find_uf(c, ident);
    int r = u ? drain(c, u) : -ENOENT;
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
        free(c->chans[i]);
        c->chans[i] = c->chans[--c->nchans];
        r = 0;
    }
    pthread_mutex_unlock(&c->mu);
    wake_thread(c);
    return r;
}

static struct chan *new_chan(int64_t ident, int fd)
{
    struct timeval tv = { .tv_sec = SEND_TIMEOUT_S };
    if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0)
        return NULL;
    struct chan *ch = calloc(1, sizeof *ch);
    if (ch)
        ch->ident = ident, ch->fd = fd;
    return ch;
}

/* Coordinator: serve the faults an agent forwards over `fd` (Python keeps and closes it). */
int sc_add_channel(struct sc *c, int64_t ident, int fd)
{
    struct chan *ch = new_chan(ident, fd);
    if (!ch)
        return -errno;
    pthread_mutex_lock(&c->mu);
    int r = reserve((void **)&c->chans, &c->chans_cap, c->nchans + 1, sizeof *c->chans);
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
    free(c->forward);
    c->forward = ch;
    c->state = SERVE;
    pthread_mutex_unlock(&c->mu);
    wake_thread(c);
    return 0;
}

/* T: serve the faults held since protecting began, then every fault as it comes. */
void sc_go(struct sc *c)
{
    pthread_mutex_lock(&c->mu);
    c->state = SERVE;
    for (size_t i = 0; i < c->nheld; i++) {
        struct held *h = &c->held[i];
        uint64_t wait = mono_ns() - h->seen_ns;
        if (wait > c->stats.held_wait_max_ns)
            c->stats.held_wait_max_ns = wait;
        if (h->is_chan)
            serve_page(c, NULL, find_chan(c, h->ident), h->offset, h->seen_ns);
        else
            serve_page(c, find_uf(c, h->ident), NULL, h->offset, h->seen_ns);
    }
    c->nheld = 0;
    int batched = c->nbatch > 0;
    pthread_mutex_unlock(&c->mu);
    if (batched)
        wake_thread(c);
}

/* Save one page for a fault Python received (agents mode): 1 saved now, 0 saved before,
 * -errno. Un-protected in every delegated uf; Python tells the agents. */
int sc_save_page(struct sc *c, uint64_t page)
{
    if (page >= c->npages)
        return -EINVAL;
    pthread_mutex_lock(&c->mu);
    int r = 0;
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

/* Mark the unsaved pages of [off, off+len) saved, record them as runs (start, end) in `runs`
 * (room for max_runs), un-protect them in every delegated uf. Returns the number of runs. */
static int claim(struct sc *c, uint64_t off, uint64_t len, uint64_t *runs, int max_runs,
                 unsigned char *was)
{
    uint64_t first = off / c->page_size, last = (off + len + c->page_size - 1) / c->page_size;
    int n = 0;
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
        if (n >= max_runs)
            return -E2BIG;
        runs[2 * n] = p * c->page_size;
        runs[2 * n + 1] = q * c->page_size;
        n++;
        p = q;
    }
    return n;
}

static void unprotect_runs(struct sc *c, const uint64_t *runs, int n)
{
    int was_empty = c->nbatch == 0;
    for (int i = 0; i < n; i++)
        batch_unprotect(c, runs[2 * i], runs[2 * i + 1] - runs[2 * i]);
    if (was_empty && c->nbatch)
        wake_thread(c); /* it flushes the batch on time */
}

/* A hole now was a hole at T (zero in the image already): claim its unsaved pages. */
int sc_claim(struct sc *c, uint64_t off, uint64_t len, uint64_t *runs, int max_runs)
{
    pthread_mutex_lock(&c->mu);
    int n = claim(c, off, len, runs, max_runs, NULL);
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
    if (off % c->page_size || off + len > c->size || (len % c->page_size && off + len != c->size))
        return -EINVAL; /* whole pages, or up to the object's end */
    uint64_t npg = (len + c->page_size - 1) / c->page_size;
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

/* Move up to `max` queued events to `out`; returns how many. */
int sc_take_events(struct sc *c, struct sc_event *out, int max)
{
    uint64_t v;
    ssize_t rd = read(c->notify_fd, &v, sizeof v);
    (void)rd;
    pthread_mutex_lock(&c->mu);
    size_t n = c->nevents < (size_t)max ? c->nevents : (size_t)max;
    memcpy(out, c->events, n * sizeof *out);
    memmove(c->events, c->events + n, (c->nevents - n) * sizeof *c->events);
    c->nevents -= n;
    if (c->nevents)
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

void sc_set_test_flags(struct sc *c, int flags)
{
    pthread_mutex_lock(&c->mu);
    c->test_flags = flags;
    pthread_mutex_unlock(&c->mu);
}

void sc_abi_sizes(uint64_t *event_size, uint64_t *stats_size)
{
    *event_size = sizeof(struct sc_event);
    *stats_size = sizeof(struct sc_stats);
}
