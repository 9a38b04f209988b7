/*
 * snapcore.h — the native core's ABI: everything uffdsnap/native/core.py (ctypes) relies on.
 *
 * Change anything here (a signature, a struct, a constant) and bump SC_ABI_VERSION: the binding
 * refuses a library whose version or struct sizes differ from its own, so a stale build fails
 * at load with one line instead of corrupting memory.
 */
#ifndef UFFDSNAP_SNAPCORE_H
#define UFFDSNAP_SNAPCORE_H

#include <stdint.h>

#define SC_ABI_VERSION 5

/* A uffd message as the kernel hands it out (struct uffd_msg). */
#define SC_MSG_SIZE 32
/* Buckets of the fault-service histogram (uffdsnap.stats.LatencyHistogram's). */
#define SC_HIST_BUCKETS 2048

/* Un-protects queued for a peer that takes none for this long (sc_set_fault_deadline): the
 * peer is dropped and the run fails (SC_FAILED, ETIMEDOUT), which releases everyone. */
#define SC_FAULT_DEADLINE_MS 2000

/* What Python is told through sc_take_events. SC_UNPROTECT (only after sc_relay_unprotects):
 * a saved range, coalesced, for agents the core cannot reach itself (msg: offset, length as two
 * native-endian uint64). SC_SAVED (no payload): sc_take_fault_saved has pages again (pushed
 * when its queue goes from empty to non-empty). SC_FAILED with ident -1: the run as a whole
 * (an image write failed, events or saved pages could not be queued, ...). */
enum { SC_EVENT = 1, SC_GONE = 2, SC_FAILED = 3, SC_UNPROTECT = 4, SC_SAVED = 5 };

struct sc_event {
    int64_t ident;
    int32_t kind, err;
    unsigned char msg[SC_MSG_SIZE];
};

struct sc_stats {
    uint64_t faults, duplicates, fault_pages_saved, held_wait_max_ns, service_count,
        service_max_ns;
};

/* Test flags (sc_set_test_flags): deliberately wrong behaviours for negative controls. */
#define SC_TEST_UNPROTECT_BEFORE_SAVE 1

struct sc;

int sc_abi_version(void);
/* sizeof(struct sc_event), sizeof(struct sc_stats): checked against the binding's at load. */
void sc_abi_sizes(uint64_t *event_size, uint64_t *stats_size);

/* `saved`: the caller's zeroed map of ceil(size / page_size) bytes, which must outlive the
 * context (so that views of it stay valid after sc_free), or NULL for one the core owns.
 * NULL with errno EINVAL (page_size not a power of two from 512 to 1 GiB) or ENOMEM. */
struct sc *sc_new(int obj_fd, int img_fd, uint64_t size, uint64_t page_size,
                  unsigned char *saved);
void sc_free(struct sc *c);
int sc_notify_fd(struct sc *c);
unsigned char *sc_saved(struct sc *c);
int sc_start(struct sc *c);
void sc_stop(struct sc *c);
int sc_add(struct sc *c, int64_t ident, int fd, int nmaps, const uint64_t *maps);
int sc_set_maps(struct sc *c, int64_t ident, int nmaps, const uint64_t *maps);
int sc_resume(struct sc *c, int64_t ident);
int sc_drain(struct sc *c, int64_t ident);
int sc_remove(struct sc *c, int64_t ident);
int sc_add_channel(struct sc *c, int64_t ident, int fd);
int sc_set_forward(struct sc *c, int64_t ident, int fd);
void sc_go(struct sc *c);
int sc_save_page(struct sc *c, uint64_t page);
int sc_claim(struct sc *c, uint64_t off, uint64_t len, uint64_t *runs, int max_runs);
int sc_copy_window(struct sc *c, uint64_t off, uint64_t len, unsigned char *buf, uint64_t *runs,
                   int max_runs);
int sc_take_pending(struct sc *c, int64_t ident, unsigned char *out, int max);
int sc_take_events(struct sc *c, struct sc_event *out, int max);
void sc_stats(struct sc *c, struct sc_stats *out, uint64_t *hist);
int sc_hist_buckets(void);
void sc_set_test_flags(struct sc *c, int flags);
/* From now on, also hand every range un-protected everywhere to Python (SC_UNPROTECT): the one
 * batcher serves agents without a fault channel too. Starts the fault thread if needed. */
int sc_relay_unprotects(struct sc *c);
/* How long un-protects may wait for a peer that does not read them (default
 * SC_FAULT_DEADLINE_MS); 0 or -EINVAL (0 ms, or more than an hour). */
int sc_set_fault_deadline(struct sc *c, uint64_t ms);
/* Record the pages saved because of faults (delegated uffds, fault channels, sc_save_page), at
 * most `n` waiting to be taken; 0 (the default) turns recording off and drops what is queued.
 * One more page than `n` fails the run (SC_FAILED, ENOBUFS) and stops recording. */
int sc_set_fault_saved_limit(struct sc *c, uint64_t n);
/* Move up to `max` recorded page numbers, in the order they were saved, to `pages`; returns
 * how many, -ENOBUFS once all that was recorded before an overflow is taken, -EINVAL. */
int sc_take_fault_saved(struct sc *c, uint64_t *pages, int max);
/* Run one round of the fault thread's work in the caller's thread, waiting at most
 * `timeout_ms` (0: not at all) for something to do: for programs that drive the core
 * themselves (the fuzzing harness). -EBUSY while the fault thread runs. */
int sc_poll(struct sc *c, int timeout_ms);
/* Write tracking (incremental snapshots): from now on the scan's saves keep their pages
 * protected (only a write may un-protect a page, so the protection left after the run records
 * what is written next), and every page a fault is served for gets a 1 in `written` (the
 * caller's map of ceil(size / page_size) bytes, which must outlive the context). 0, -EINVAL. */
int sc_track_writes(struct sc *c, unsigned char *written);

#endif
