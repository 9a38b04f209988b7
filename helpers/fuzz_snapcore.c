/*
 * fuzz_snapcore — a differential fuzzer of the native core's input handling (test-only C).
 *
 *   fuzz_snapcore LIBRARY SECONDS SEED
 *
 * LIBRARY is the core as the tests load it (uffdsnap/native/_snapcore*.so; in CI's sanitizer
 * step, a build with AddressSanitizer and UBSan, with libasan preloaded). For SECONDS it feeds the
 * core, through its public API and real sockets, driven in this thread with sc_poll:
 *  - fault-channel byte streams in both directions (the coordinator's end takes `fault` frames,
 *    an agent's end `unprotect` frames): valid frames, mutated ones, truncated ones, garbage,
 *    split anywhere. An independent reference parser (below, not the core's) says whether the
 *    stream is valid; the core must fail the channel (EPROTO) exactly when it is not, answer
 *    every valid fault it reads, and save exactly the pages of valid faults (after T, or at T for
 *    faults held before it), with their content;
 *  - API calls with arbitrary arguments: sc_claim, sc_copy_window, sc_save_page,
 *    sc_take_events, sc_take_fault_saved (ranges past the object, unaligned, wrapping; negative
 *    and tiny `max`; buffers of exactly the size promised, so that a sanitizer sees any
 *    overflow). A model of the saved map must match the core's after every step, and a call
 *    that fails must change nothing.
 * Exit status 0, or 1 with the seed, the step and the input that broke an expectation. The
 * sanitizers report memory errors on their own (abort).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "snapcore.h"

#define PS 4096ULL
#define NPAGES 17 /* the last one partial */
#define OBJ_SIZE ((NPAGES - 1) * PS + 1000)
#define MAX_INPUT 1024
#define FRAME_MAX 64

/* ---- the library, by name ---------------------------------------------------------------- */

static struct {
    int (*abi_version)(void);
    struct sc *(*new_)(int, int, uint64_t, uint64_t, unsigned char *);
    void (*free_)(struct sc *);
    int (*add_channel)(struct sc *, int64_t, int);
    int (*set_forward)(struct sc *, int64_t, int);
    int (*remove)(struct sc *, int64_t);
    void (*go)(struct sc *);
    int (*save_page)(struct sc *, uint64_t);
    int (*claim)(struct sc *, uint64_t, uint64_t, uint64_t *, int);
    int (*copy_window)(struct sc *, uint64_t, uint64_t, unsigned char *, uint64_t *, int);
    int (*take_events)(struct sc *, struct sc_event *, int);
    int (*set_fault_saved_limit)(struct sc *, uint64_t);
    int (*take_fault_saved)(struct sc *, uint64_t *, int);
    int (*poll)(struct sc *, int);
} A;

static void load(const char *path)
{
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "fuzz: cannot load %s: %s\n", path, dlerror());
        exit(2);
    }
#define SYM(field, name)                                                                       \
    do {                                                                                       \
        *(void **)&A.field = dlsym(h, name);                                                   \
        if (!A.field) {                                                                        \
            fprintf(stderr, "fuzz: %s has no %s\n", path, name);                               \
            exit(2);                                                                           \
        }                                                                                      \
    } while (0)
    SYM(abi_version, "sc_abi_version");
    SYM(new_, "sc_new");
    SYM(free_, "sc_free");
    SYM(add_channel, "sc_add_channel");
    SYM(set_forward, "sc_set_forward");
    SYM(remove, "sc_remove");
    SYM(go, "sc_go");
    SYM(save_page, "sc_save_page");
    SYM(claim, "sc_claim");
    SYM(copy_window, "sc_copy_window");
    SYM(take_events, "sc_take_events");
    SYM(set_fault_saved_limit, "sc_set_fault_saved_limit");
    SYM(take_fault_saved, "sc_take_fault_saved");
    SYM(poll, "sc_poll");
    if (A.abi_version() != SC_ABI_VERSION) {
        fprintf(stderr, "fuzz: %s has ABI %d, this harness %d\n", path, A.abi_version(),
                SC_ABI_VERSION);
        exit(2);
    }
}

/* ---- randomness -------------------------------------------------------------------------- */

static uint64_t rng_state;

static uint64_t rnd(void)
{
    uint64_t x = rng_state;
    x ^= x >> 12, x ^= x << 25, x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static uint64_t below(uint64_t n) { return n ? rnd() % n : 0; }

/* An interesting 64-bit value: small, page-ish, near the object's end, near the top. */
static uint64_t any_u64(void)
{
    switch (below(8)) {
    case 0: return below(NPAGES + 2) * PS;
    case 1: return below(NPAGES + 2) * PS + below(3) - 1;
    case 2: return OBJ_SIZE + below(3) - 1;
    case 3: return UINT64_MAX - below(3 * PS);
    case 4: return (1ULL << below(64)) + below(3) - 1;
    case 5: return below(256);
    default: return rnd();
    }
}

/* ---- the reference: frames as docs/protocol.md describes them (written apart from the core) */

static void be64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (56 - 8 * i));
}

static uint64_t rd64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

/* The fixed bytes of each frame, with 0xcf markers before the 8-byte holes. */
static const unsigned char FAULT_T[] = "\x00\x00\x00\x37\x84\xa1t\xa5" "fault\xa6offset\xcf"
                                       "________\xa3tid\xcf________\xa7seen_ns\xcf________";
static const unsigned char UNPROTECT_T[] = "\x00\x00\x00\x28\x82\xa1t\xa9unprotect\xa6ranges"
                                           "\x91\x92\xcf________\xcf________";
#define FAULT_LEN (sizeof FAULT_T - 1)
#define UNPROTECT_LEN (sizeof UNPROTECT_T - 1)

static int holes(const unsigned char *t, size_t n, size_t at[3])
{
    int k = 0;
    for (size_t i = 0; i + 8 < n; i++)
        if (t[i] == 0xcf && t[i + 1] == '_')
            at[k++] = i + 1, i += 8;
    return k;
}

static size_t make_frame(unsigned char *f, int fault, const uint64_t v[3])
{
    const unsigned char *t = fault ? FAULT_T : UNPROTECT_T;
    size_t n = fault ? FAULT_LEN : UNPROTECT_LEN, at[3];
    memcpy(f, t, n);
    int k = holes(t, n, at);
    for (int i = 0; i < k; i++)
        be64(f + at[i], v[i]);
    return n;
}

/* Is this one frame valid for that direction (shape and values)? Its values go to v. */
static int ref_frame(const unsigned char *f, size_t n, int fault, uint64_t v[3])
{
    const unsigned char *t = fault ? FAULT_T : UNPROTECT_T;
    size_t want = fault ? FAULT_LEN : UNPROTECT_LEN, at[3];
    if (n != want)
        return 0;
    int k = holes(t, want, at), h = 0;
    for (size_t i = 0; i < want; i++) {
        if (h < k && i == at[h]) {
            v[h++] = rd64(f + i);
            i += 7;
        } else if (f[i] != t[i]) {
            return 0;
        }
    }
    if (fault)
        return v[0] % PS == 0 && v[0] < NPAGES * PS;
    return v[0] % PS == 0 && v[1] % PS == 0 && v[1] != 0 && v[0] + v[1] >= v[0];
}

enum { REF_OK, REF_BAD };

/* A byte stream: REF_BAD at its first bad frame, else REF_OK (a trailing partial frame is
 * fine). The valid frames before the end or the bad one: their first values go to `offs`. */
static int ref_stream(const unsigned char *b, size_t n, int fault, uint64_t *offs, int *nvalid,
                      uint64_t *lens)
{
    size_t pos = 0;
    *nvalid = 0;
    while (n - pos >= 4) {
        uint64_t len = (uint64_t)b[pos] << 24 | (uint64_t)b[pos + 1] << 16 |
                       (uint64_t)b[pos + 2] << 8 | b[pos + 3];
        if (len + 4 > FRAME_MAX)
            return REF_BAD;
        if (n - pos < len + 4)
            return REF_OK;
        uint64_t v[3];
        if (!ref_frame(b + pos, len + 4, fault, v))
            return REF_BAD;
        if (lens)
            lens[*nvalid] = v[1];
        offs[(*nvalid)++] = v[0];
        pos += len + 4;
    }
    return REF_OK;
}

/* ---- inputs ------------------------------------------------------------------------------- */

static size_t gen_stream(unsigned char *b, int fault)
{
    size_t n = 0;
    int pieces = 1 + (int)below(8), clean = below(3) == 0; /* a third: valid frames only */
    for (int p = 0; p < pieces && n < MAX_INPUT - FRAME_MAX * 2; p++) {
        unsigned char f[FRAME_MAX * 2];
        uint64_t v[3] = { below(NPAGES) * PS, rnd(), rnd() };
        if (!fault)
            v[0] = below(NPAGES + 4) * PS, v[1] = (1 + below(4)) * PS;
        size_t k = make_frame(f, fault, v);
        switch (clean ? 9 : below(10)) {
        case 0: /* wrong values */
            for (int i = 0; i < 3; i++)
                v[i] = any_u64();
            k = make_frame(f, fault, v);
            break;
        case 1: /* the other direction's frame */
            k = make_frame(f, !fault, v);
            break;
        case 2: { /* flip, set or drop bytes */
            int m = 1 + (int)below(3);
            for (int i = 0; i < m; i++) {
                size_t at = below(k);
                switch (below(3)) {
                case 0: f[at] ^= (unsigned char)(1u << below(8)); break;
                case 1: f[at] = (unsigned char)rnd(); break;
                default: memmove(f + at, f + at + 1, k - at - 1), k--;
                }
            }
            break;
        }
        case 3: /* truncated (the rest may come as the next piece's start) */
            k = below(k);
            break;
        case 4: /* garbage */
            k = below(sizeof f);
            for (size_t i = 0; i < k; i++)
                f[i] = (unsigned char)rnd();
            break;
        case 5: /* a length prefix of anything, then some of a frame */
            f[0] = (unsigned char)(below(2) ? rnd() : 0), f[1] = (unsigned char)below(2);
            f[2] = (unsigned char)below(2), f[3] = (unsigned char)rnd();
            k = 4 + below(k - 4);
            break;
        default: /* valid */
            break;
        }
        memcpy(b + n, f, k);
        n += k;
    }
    return n;
}

/* ---- checking ------------------------------------------------------------------------------ */

static uint64_t seed, step, refused, valid_faults;
static unsigned char last_input[MAX_INPUT];
static size_t last_len;

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "fuzz: seed %llu step %llu: ", (unsigned long long)seed,
            (unsigned long long)step);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nfuzz: last input (%zu bytes):", last_len);
    for (size_t i = 0; i < last_len; i++)
        fprintf(stderr, "%s%02x", i % 32 ? "" : "\n  ", last_input[i]);
    fprintf(stderr, "\n");
    exit(1);
}

static int unread(int fd)
{
    int n = 0;
    return ioctl(fd, FIONREAD, &n) < 0 ? -1 : n;
}

/* Feed `b` to the core's end through `ours`, then let the core read all of it. */
static void feed(struct sc *c, int ours, int theirs, const unsigned char *b, size_t n)
{
    /* (EPIPE: the core closed the channel already, as the verdict check will expect) */
    if (n && send(ours, b, n, MSG_DONTWAIT | MSG_NOSIGNAL) != (ssize_t)n && errno != EPIPE)
        die("send to the core: %s", strerror(errno));
    for (int i = 0; i < 64 && unread(theirs) > 0; i++)
        if (A.poll(c, 0) < 0)
            die("sc_poll failed");
    int left = unread(theirs);
    if (left > 0) /* (a closed channel is not read: left unread is fine then) */
        A.poll(c, 0);
}

struct evlist { struct sc_event e[64]; int n; };

static void take_all(struct sc *c, struct evlist *out)
{
    out->n = 0;
    for (;;) {
        int got = A.take_events(c, out->e + out->n, 64 - out->n);
        if (got < 0)
            die("sc_take_events: %d", got);
        out->n += got;
        if (got == 0 || out->n == 64)
            return;
    }
}

struct session {
    struct sc *c;
    int obj, img;
    unsigned char content[NPAGES * PS];
    unsigned char *saved; /* ours, passed to sc_new */
    unsigned char model[NPAGES];
    unsigned char zeroed[NPAGES]; /* claimed as a hole (sc_claim): zero in the image */
    uint64_t held[4096];
    int nheld, serving;
    int64_t next_ident;
    uint64_t fsq_limit;
    int fsq_overflowed;
};

static void check_model(struct session *s, const char *after)
{
    for (int p = 0; p < NPAGES; p++)
        if (s->saved[p] != s->model[p])
            die("after %s: page %d saved=%d, expected %d", after, p, s->saved[p], s->model[p]);
}

static void check_image(struct session *s)
{
    unsigned char page[PS];
    for (int p = 0; p < NPAGES; p++) {
        if (!s->model[p])
            continue;
        uint64_t n = (uint64_t)p * PS + PS <= OBJ_SIZE ? PS : OBJ_SIZE - (uint64_t)p * PS;
        if (pread(s->img, page, n, (off_t)((uint64_t)p * PS)) != (ssize_t)n)
            die("image read");
        static const unsigned char zeros[PS];
        if (memcmp(page, s->zeroed[p] ? zeros : s->content + (uint64_t)p * PS, n))
            die("page %d of the image is not the object's%s", p, s->zeroed[p] ? " (zeros)" : "");
    }
}

static void session_open(struct session *s)
{
    memset(s, 0, sizeof *s);
    s->obj = memfd_create("fuzz-obj", MFD_CLOEXEC);
    s->img = memfd_create("fuzz-img", MFD_CLOEXEC);
    for (uint64_t i = 0; i < OBJ_SIZE; i++)
        s->content[i] = below(4) ? 0 : (unsigned char)rnd(); /* zero blocks too: holes */
    if (s->obj < 0 || s->img < 0 || pwrite(s->obj, s->content, OBJ_SIZE, 0) != OBJ_SIZE ||
        ftruncate(s->img, OBJ_SIZE) < 0)
        die("memfd");
    s->saved = calloc(NPAGES, 1);
    s->c = A.new_(s->obj, s->img, OBJ_SIZE, PS, s->saved);
    if (!s->c || !s->saved)
        die("sc_new");
    s->next_ident = 1;
    s->serving = below(2);
    if (s->serving)
        A.go(s->c);
    if (below(2)) {
        s->fsq_limit = 1 + below(8);
        A.set_fault_saved_limit(s->c, s->fsq_limit);
    }
}

static void session_close(struct session *s)
{
    A.free_(s->c);
    close(s->obj);
    close(s->img);
    free(s->saved);
}

/* One channel, one stream: the coordinator's end. */
static void fuzz_coordinator_channel(struct session *s)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        die("socketpair");
    int64_t ident = s->next_ident++;
    if (A.add_channel(s->c, ident, sv[1]) < 0)
        die("sc_add_channel");
    unsigned char b[MAX_INPUT];
    size_t n = gen_stream(b, 1);
    memcpy(last_input, b, n), last_len = n;
    uint64_t offs[MAX_INPUT / 4];
    int nvalid = 0, verdict = ref_stream(b, n, 1, offs, &nvalid, NULL);
    /* sent in pieces, split anywhere: the verdict must not depend on where reads end */
    size_t split = below(n + 1);
    feed(s->c, sv[0], sv[1], b, split);
    feed(s->c, sv[0], sv[1], b + split, n - split);
    struct evlist ev;
    take_all(s->c, &ev);
    int failed = 0;
    for (int i = 0; i < ev.n; i++) {
        struct sc_event *e = &ev.e[i];
        if (e->kind == SC_FAILED && e->ident == ident && e->err == EPROTO)
            failed++;
        else if (e->kind == SC_FAILED && e->ident == -1 && e->err == ENOBUFS && s->fsq_limit)
            s->fsq_overflowed = 1;
        else if (e->kind != SC_SAVED)
            die("unexpected event kind %d ident %lld err %d", e->kind, (long long)e->ident,
                e->err);
    }
    refused += failed;
    valid_faults += (uint64_t)nvalid;
    if (failed != (verdict == REF_BAD))
        die("the core %s the channel; the reference says the stream is %s",
            failed ? "failed" : "kept", verdict == REF_BAD ? "invalid" : "valid");
    for (int i = 0; i < nvalid; i++) {
        if (s->serving)
            s->model[offs[i] / PS] = 1;
        else if (s->nheld < 4096) {
            s->held[s->nheld++] = offs[i];
        }
    }
    /* every valid fault read after T is answered on its channel (batches may add more) */
    unsigned char r[1 << 16];
    ssize_t got = recv(sv[0], r, sizeof r, MSG_DONTWAIT);
    size_t have = got > 0 ? (size_t)got : 0;
    static uint64_t roffs[sizeof r / 4], rlens[sizeof r / 4];
    int nr = 0;
    if (ref_stream(r, have, 0, roffs, &nr, rlens) != REF_OK || (have && nr == 0))
        die("the core answered with something other than unprotect frames");
    if (s->serving) /* (answers that overlap or touch may come merged into one) */
        for (int i = 0; i < nvalid; i++) {
            int covered = 0;
            for (int k = 0; k < nr && !covered; k++)
                covered = offs[i] >= roffs[k] && offs[i] - roffs[k] < rlens[k];
            if (!covered)
                die("the valid fault at %#llx was not answered", (unsigned long long)offs[i]);
        }
    A.remove(s->c, ident);
    close(sv[0]);
    close(sv[1]);
    check_model(s, "a channel's stream");
}

/* An agent's end: unprotect frames in (there is no uffd to apply them to). */
static void fuzz_agent_channel(void)
{
    struct sc *c = A.new_(-1, -1, 0, PS, NULL);
    int sv[2];
    if (!c || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        die("agent core");
    if (A.set_forward(c, 0, sv[1]) < 0)
        die("sc_set_forward");
    unsigned char b[MAX_INPUT];
    size_t n = gen_stream(b, 0);
    memcpy(last_input, b, n), last_len = n;
    uint64_t offs[MAX_INPUT / 4];
    int nvalid, verdict = ref_stream(b, n, 0, offs, &nvalid, NULL);
    size_t split = below(n + 1);
    feed(c, sv[0], sv[1], b, split);
    feed(c, sv[0], sv[1], b + split, n - split);
    struct evlist ev;
    take_all(c, &ev);
    int failed = ev.n == 1 && ev.e[0].kind == SC_FAILED && ev.e[0].ident == 0 &&
                 ev.e[0].err == EPROTO;
    if (ev.n > 1 || (ev.n && !failed))
        die("agent: unexpected events (%d, first kind %d)", ev.n, ev.e[0].kind);
    if (failed != (verdict == REF_BAD))
        die("agent: the core %s the channel; the reference says %s", failed ? "failed" : "kept",
            verdict == REF_BAD ? "invalid" : "valid");
    A.free_(c);
    close(sv[0]);
    close(sv[1]);
}

/* The API with arbitrary arguments, against the model. */
static void fuzz_api(struct session *s)
{
    last_len = 0;
    unsigned char before[NPAGES];
    memcpy(before, s->saved, NPAGES);
    switch (below(5)) {
    case 0: { /* sc_claim */
        uint64_t off = any_u64(), len = below(2) ? below(NPAGES + 2) * PS : any_u64();
        int max = (int)below(6) - 1;
        uint64_t *runs = malloc(sizeof *runs * 2 * (size_t)(max > 0 ? max : 1));
        int r = A.claim(s->c, off, len, max > 0 ? runs : NULL, max);
        int bad = max < 0 || off % PS || len > UINT64_MAX - off || off + len > NPAGES * PS;
        if (bad != (r == -EINVAL))
            die("claim(%#llx, %#llx, max %d) = %d", (unsigned long long)off,
                (unsigned long long)len, max, r);
        if (!bad) {
            int want = 0;
            uint64_t first = off / PS, last = first + len / PS + (len % PS != 0);
            for (uint64_t p = first; p < last; p++)
                if (!before[p] && (p == first || before[p - 1]))
                    want++;
            if (want > max ? r != -E2BIG : r != want)
                die("claim(%#llx, %#llx, max %d) = %d, expected %d runs",
                    (unsigned long long)off, (unsigned long long)len, max, r, want);
            if (r >= 0)
                for (uint64_t p = first; p < last; p++) {
                    s->zeroed[p] |= !s->model[p]; /* a hole at T, the caller says */
                    s->model[p] = 1;
                }
            for (int i = 0; i < r; i++)
                if (runs[2 * i] % PS || runs[2 * i + 1] <= runs[2 * i] ||
                    runs[2 * i + 1] > last * PS || runs[2 * i] < first * PS)
                    die("claim: run %d is [%#llx, %#llx)", i, (unsigned long long)runs[2 * i],
                        (unsigned long long)runs[2 * i + 1]);
        }
        free(runs);
        check_model(s, r == -E2BIG ? "a claim refused with E2BIG" : "a claim");
        break;
    }
    case 1: { /* sc_copy_window */
        uint64_t off = below(3) ? below(NPAGES + 1) * PS : any_u64();
        uint64_t len = below(3) ? below(NPAGES + 1) * PS : any_u64();
        if (below(4) == 0 && off < OBJ_SIZE)
            len = OBJ_SIZE - off; /* to the object's end */
        int max = (int)below(NPAGES) - 1;
        int bad = max < 0 || off % PS || len > OBJ_SIZE || off > OBJ_SIZE - len ||
                  (len % PS && off + len != OBJ_SIZE);
        size_t blen = bad ? 1 : (size_t)len;
        unsigned char *buf = malloc(blen ? blen : 1);
        uint64_t *runs = malloc(sizeof *runs * 2 * (size_t)(max > 0 ? max : 1));
        int r = A.copy_window(s->c, off, len, buf, max > 0 ? runs : NULL, max);
        if (bad != (r == -EINVAL))
            die("copy_window(%#llx, %#llx, max %d) = %d", (unsigned long long)off,
                (unsigned long long)len, max, r);
        if (!bad && r != -E2BIG) {
            if (r < 0)
                die("copy_window = %d", r);
            static const unsigned char zeros[PS];
            for (uint64_t a = off; a < off + len; a += PS) {
                uint64_t n = off + len - a < PS ? off + len - a : PS;
                if (memcmp(buf + (a - off), s->zeroed[a / PS] ? zeros : s->content + a, n))
                    die("copy_window: page %llu is not its content at T",
                        (unsigned long long)(a / PS));
            }
            for (uint64_t p = off / PS; p < (off + len + PS - 1) / PS; p++)
                s->model[p] = 1;
        }
        free(buf);
        free(runs);
        check_model(s, "a copy window");
        break;
    }
    case 2: { /* sc_save_page */
        uint64_t page = below(2) ? below(NPAGES + 2) : any_u64();
        int r = A.save_page(s->c, page);
        if (page >= NPAGES ? r != -EINVAL : r != !before[page])
            die("save_page(%llu) = %d", (unsigned long long)page, r);
        if (page < NPAGES)
            s->model[page] = 1;
        check_model(s, "save_page");
        break;
    }
    case 3: { /* sc_take_events with any max */
        int max = (int)below(6) - 3;
        struct sc_event *out = malloc(sizeof *out * (size_t)(max > 0 ? max : 1));
        int r = A.take_events(s->c, max > 0 ? out : NULL, max);
        if (max < 0 ? r != -EINVAL : r < 0 || r > max)
            die("take_events(max %d) = %d", max, r);
        free(out);
        break;
    }
    default: { /* sc_take_fault_saved with any max */
        int max = (int)below(6) - 3;
        uint64_t *out = malloc(sizeof *out * (size_t)(max > 0 ? max : 1));
        int r = A.take_fault_saved(s->c, max > 0 ? out : NULL, max);
        if (max < 0 ? r != -EINVAL : (r < 0 && r != -ENOBUFS) || r > max)
            die("take_fault_saved(max %d) = %d", max, r);
        if (r == -ENOBUFS && !s->fsq_limit)
            die("take_fault_saved: ENOBUFS with no limit set");
        for (int i = 0; i < r; i++)
            if (out[i] >= NPAGES || !s->model[out[i]])
                die("take_fault_saved: page %llu was not saved", (unsigned long long)out[i]);
        free(out);
    }
    }
}

/* T, in a session that held faults: every held page gets saved (by the polling thread: us). */
static void declare_t(struct session *s)
{
    if (s->serving)
        return;
    A.go(s->c);
    s->serving = 1;
    for (int i = 0; i < 64; i++)
        A.poll(s->c, 0);
    for (int i = 0; i < s->nheld; i++)
        s->model[s->held[i] / PS] = 1;
    s->nheld = 0;
    check_model(s, "T (held faults served)");
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: fuzz_snapcore LIBRARY SECONDS SEED\n");
        return 2;
    }
    load(argv[1]);
    double seconds = atof(argv[2]);
    seed = strtoull(argv[3], NULL, 0);
    rng_state = seed * 2654435761ULL + 0x9E3779B97F4A7C15ULL;
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint64_t sessions = 0, streams = 0, agents = 0, calls = 0;
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((double)(now.tv_sec - t0.tv_sec) + (now.tv_nsec - t0.tv_nsec) / 1e9 >= seconds)
            break;
        struct session *s = malloc(sizeof *s);
        if (!s)
            die("out of memory");
        session_open(s);
        sessions++;
        int steps = 1 + (int)below(60);
        for (int i = 0; i < steps; i++, step++) {
            uint64_t what = below(10);
            if (what < 5) {
                fuzz_coordinator_channel(s);
                streams++;
            } else if (what < 7) {
                fuzz_agent_channel();
                agents++;
            } else if (what < 9) {
                fuzz_api(s);
                calls++;
            } else {
                declare_t(s);
            }
        }
        declare_t(s);
        check_image(s);
        session_close(s);
        free(s);
    }
    printf("fuzz: seed %llu: %llu sessions, %llu coordinator streams (%llu refused, %llu valid "
           "faults), %llu agent streams, %llu API calls: ok\n", (unsigned long long)seed,
           (unsigned long long)sessions, (unsigned long long)streams,
           (unsigned long long)refused, (unsigned long long)valid_faults,
           (unsigned long long)agents, (unsigned long long)calls);
    return 0;
}
