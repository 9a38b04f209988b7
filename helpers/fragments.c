/*
 * fragments — a workload writer whose every page of the object is a mapping of its own (thousands
 * of separate mappings in one process), for tests of processes with many mappings.
 *
 * usage: fragments --object PATH --index I
 * Maps the header page, every writer's counter page and each of writer I's data pages separately,
 * one page apart in the address space (so the kernel cannot merge them into fewer mappings), then
 * runs workload.h's step through them until the stop word is set. Prints
 * "ready pid=P index=I mappings=M" once mapped, "done pid=P seq=S" at the end.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define HELPER_NAME "fragments"
#define HELPER_INT_BASE 10
#include "util.h"
#include "workload.h"

static char *next_at;
static int fd;
static uint64_t page_size, count;

/* Map one page of the object at the next free slot, leaving a page of gap after it. */
static volatile uint64_t *map_page(uint64_t offset)
{
    void *p = mmap(next_at, page_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd,
                   (off_t)offset);
    if (p == MAP_FAILED)
        die(1, "mmap(offset=%" PRIu64 "): %s", offset, strerror(errno));
    next_at += 2 * page_size;
    count++;
    return p;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "object", required_argument, NULL, 'o' },
        { "index", required_argument, NULL, 'i' },
        { NULL, 0, NULL, 0 },
    };
    const char *path = NULL;
    uint64_t index = UINT64_MAX;
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'o')
            path = optarg;
        else if (c == 'i')
            index = parse_u64("--index", optarg);
        else
            die(2, "usage: fragments --object PATH --index I");
    }
    if (!path || index == UINT64_MAX)
        die(2, "usage: fragments --object PATH --index I");
    fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die(2, "open %s: %s", path, strerror(errno));
    uint64_t h[H_WORDS];
    struct wl_layout lay;
    if (pread(fd, h, sizeof h, 0) != (ssize_t)sizeof h || wl_layout_from_header(&lay, h))
        die(2, "%s: not a workload object", path);
    if (index >= lay.nwriters)
        die(2, "--index out of range");
    page_size = lay.page_size;
    /* one reservation for every slot, so that nothing else lands in the gaps */
    uint64_t slots = 1 + lay.nwriters + lay.data_pages;
    next_at = mmap(NULL, 2 * slots * page_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (next_at == MAP_FAILED)
        die(1, "reserve: %s", strerror(errno));

    volatile uint64_t *hdr = map_page(0);
    volatile uint64_t *ctr[WL_MAX_WRITERS];
    for (uint64_t j = 0; j < lay.nwriters; j++)
        ctr[j] = map_page(lay.page_size + j * lay.region);
    volatile uint64_t **data = calloc(lay.data_pages, sizeof *data);
    if (!data)
        die(1, "out of memory");
    for (uint64_t p = 0; p < lay.data_pages; p++)
        data[p] = map_page(lay.page_size + index * lay.region + (1 + p) * lay.page_size);

    const uint64_t n = lay.nwriters, words = lay.page_size / 8;
    const uint64_t a = wl_multiplier(index, lay.data_pages), b = wl_addend(index, lay.data_pages);
    uint64_t seq = ctr[index][C_SEQ], obs[WL_MAX_WRITERS];
    ctr[index][C_IMPL] = WL_IMPL_C;
    ctr[index][C_PID] = (uint64_t)getpid();
    printf("ready pid=%d index=%" PRIu64 " mappings=%" PRIu64 "\n", getpid(), index, count);
    fflush(stdout);
    while (!hdr[H_STOP] && seq < WL_STEP_MAX) { /* workload.h's wl_step, through page pointers */
        uint64_t k = seq + 1;
        for (uint64_t j = 0; j < n; j++)
            obs[j] = __atomic_load_n(&ctr[j][C_SEQ], __ATOMIC_ACQUIRE);
        volatile uint64_t *page = data[(k * a + b) & (lay.data_pages - 1)];
        const uint64_t s = wl_stamp(index, k);
        for (uint64_t x = 0; x < words; x++)
            page[x] = s;
        for (uint64_t j = 0; j < n; j++) {
            ctr[index][C_OBS + 2 * j] = obs[j];
            ctr[index][C_OBS + 2 * j + 1] = k;
        }
        __atomic_store_n(&ctr[index][C_SEQ], k, __ATOMIC_RELEASE);
        seq = k;
    }
    printf("done pid=%d seq=%" PRIu64 "\n", getpid(), seq);
    return fflush(stdout) ? 1 : 0;
}
