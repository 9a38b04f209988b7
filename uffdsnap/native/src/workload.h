/*
 * workload.h — the consistency-checker workload's layout and writer step, shared by the native
 * helpers (writer.c, preforker.c). Header-only: every function is static inline.
 *
 * The layout and the A_i, B_i, stamp formulas must match uffdsnap/workload.py exactly
 * (docs/workload.md). Step k of writer i:
 *   a) read every writer j's published seq into obs[j];
 *   b) fill data page p(k) = (k*A_i + B_i) mod D with stamp(i, k), one aligned u64 store at a
 *      time, front to back;
 *   c) write the counter page's observation entries (value, then step tag) front to back, then
 *      publish seq = k last (release store; x86 TSO keeps the order for other CPUs).
 */
#ifndef UFFDSNAP_WORKLOAD_H
#define UFFDSNAP_WORKLOAD_H

#include <stdint.h>

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

/* Geometry of one workload object; every field in bytes except nwriters and data_pages. */
struct wl_layout {
    uint64_t nwriters, data_pages, page_size;
    uint64_t region; /* one writer's counter page and data pages */
    uint64_t size;   /* the whole object */
};

/* One complete set of pointers a writer works through: header, every counter page, its data. */
struct wl_view {
    volatile uint64_t *hdr;
    volatile uint64_t *ctr[WL_MAX_WRITERS];
    volatile uint64_t *data; /* this writer's D data pages */
};

/* Writer `index`: one or two views (--map-twice alternates steps between them) and its seq. */
struct wl_writer {
    uint64_t index, a, b, seq, ops;
    const struct wl_layout *lay;
    struct wl_view views[2];
    int nviews;
    uint64_t obs[WL_MAX_WRITERS];
};

static inline uint64_t wl_multiplier(uint64_t i, uint64_t d)
{
    return ((((2 * i + 1) * 0x9E3779B97F4A7C15ULL) >> 32) | 1) & (d - 1);
}

static inline uint64_t wl_addend(uint64_t i, uint64_t d)
{
    return (((i + 1) * 0xC2B2AE3D27D4EB4FULL) >> 32) & (d - 1);
}

static inline uint64_t wl_stamp(uint64_t i, uint64_t k)
{
    return WL_STAMP_TAG << 56 | i << WL_STEP_BITS | k;
}

/* Fill `lay` from n, d, ps; return NULL if valid, else what is wrong (a static string). */
static inline const char *wl_layout_init(struct wl_layout *lay, uint64_t n, uint64_t d,
                                         uint64_t ps)
{
    if (ps < 4096 || (ps & (ps - 1)))
        return "page size is not a power of two >= 4096";
    if (d == 0 || (d & (d - 1)))
        return "data pages is not a power of two >= 1";
    if (n == 0 || n > WL_MAX_WRITERS || C_OBS + 2 * n > ps / 8)
        return "writer count does not fit a counter page (1..252)";
    lay->nwriters = n;
    lay->data_pages = d;
    lay->page_size = ps;
    lay->region = (1 + d) * ps;
    lay->size = ps + n * lay->region;
    return NULL;
}

/* Parse header words `h`; return NULL if they describe a valid workload, else the reason. */
static inline const char *wl_layout_from_header(struct wl_layout *lay, const uint64_t *h)
{
    if (h[H_MAGIC] != WL_MAGIC || h[H_VERSION] != WL_VERSION)
        return "not a workload object (bad magic or version)";
    return wl_layout_init(lay, h[H_NWRITERS], h[H_DATA_PAGES], h[H_PAGE_SIZE]);
}

/* Write the header of a fresh object into its mapped first page. */
static inline void wl_write_header(volatile uint64_t *hdr, const struct wl_layout *lay)
{
    hdr[H_MAGIC] = WL_MAGIC;
    hdr[H_VERSION] = WL_VERSION;
    hdr[H_NWRITERS] = lay->nwriters;
    hdr[H_DATA_PAGES] = lay->data_pages;
    hdr[H_PAGE_SIZE] = lay->page_size;
    hdr[H_STOP] = 0;
}

/* A view of writer `index` over a mapping of the whole object starting at `all`. */
static inline void wl_view_of_whole(struct wl_view *v, volatile uint64_t *all,
                                    const struct wl_layout *lay, uint64_t index)
{
    v->hdr = all;
    for (uint64_t j = 0; j < lay->nwriters; j++)
        v->ctr[j] = all + (lay->page_size + j * lay->region) / 8;
    v->data = v->ctr[index] + lay->page_size / 8;
}

/* Set up writer `index` over views already filled in (`nviews` of w->views); resumes from the
 * seq in its counter page and marks the page as a native writer's, owned by `pid`. */
static inline void wl_writer_init(struct wl_writer *w, const struct wl_layout *lay,
                                  uint64_t index, int nviews, uint64_t pid)
{
    w->lay = lay;
    w->index = index;
    w->nviews = nviews;
    w->a = wl_multiplier(index, lay->data_pages);
    w->b = wl_addend(index, lay->data_pages);
    volatile uint64_t *mine = w->views[0].ctr[index];
    w->seq = mine[C_SEQ]; /* resume where a previous writer i left off */
    w->ops = 0;
    mine[C_IMPL] = WL_IMPL_C;
    mine[C_PID] = pid;
}

static inline int wl_stopped(const struct wl_writer *w)
{
    return w->views[0].hdr[H_STOP] != 0;
}

/* Do one step; return 0, or -1 if the step counter is exhausted. */
static inline int wl_step(struct wl_writer *w)
{
    const struct wl_layout *lay = w->lay;
    const uint64_t n = lay->nwriters, words = lay->page_size / 8, k = w->seq + 1;
    if (k > WL_STEP_MAX)
        return -1;
    const struct wl_view *v = &w->views[k % (uint64_t)w->nviews];
    for (uint64_t j = 0; j < n; j++) /* a) */
        w->obs[j] = __atomic_load_n(&v->ctr[j][C_SEQ], __ATOMIC_ACQUIRE);
    volatile uint64_t *page = v->data + ((k * w->a + w->b) & (lay->data_pages - 1)) * words;
    const uint64_t s = wl_stamp(w->index, k); /* b) */
    for (uint64_t x = 0; x < words; x++)
        page[x] = s;
    volatile uint64_t *ctr = v->ctr[w->index]; /* c) */
    for (uint64_t j = 0; j < n; j++) {
        ctr[C_OBS + 2 * j] = w->obs[j];
        ctr[C_OBS + 2 * j + 1] = k;
    }
    __atomic_store_n(&ctr[C_SEQ], k, __ATOMIC_RELEASE);
    w->seq = k;
    w->ops++;
    return 0;
}

#endif
