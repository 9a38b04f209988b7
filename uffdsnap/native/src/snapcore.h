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

#define SC_ABI_VERSION 3

/* A uffd message as the kernel hands it out (struct uffd_msg). */
#define SC_MSG_SIZE 32
/* Buckets of the fault-service histogram (uffdsnap.stats.LatencyHistogram's). */
#define SC_HIST_BUCKETS 2048

/* What Python is told through sc_take_events. SC_UNPROTECT (only after sc_relay_unprotects):
 * a saved range, coalesced, for agents the core cannot reach itself (msg: offset, length as two
 * native-endian uint64). */
enum { SC_EVENT = 1, SC_GONE = 2, SC_FAILED = 3, SC_UNPROTECT = 4 };

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

struct sc *sc_new(int obj_fd, int img_fd, uint64_t size, uint64_t page_size);
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

#endif
