/*
 * util.h — what every native helper needs: a one-line fatal error, the monotonic clock, an
 * absolute sleep on it, and strict non-negative integer options. Header-only (static inline).
 * Define HELPER_NAME (the error prefix) before including it, and HELPER_INT_BASE (default 0:
 * decimal, or 0x.. hex) for option parsing.
 */
#ifndef UFFDSNAP_UTIL_H
#define UFFDSNAP_UTIL_H

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifndef HELPER_INT_BASE
#define HELPER_INT_BASE 0
#endif

/* Print "HELPER_NAME: <message>" on stderr and exit with `status`. */
static inline void die(int status, const char *fmt, ...)
{
    va_list ap;
    fputs(HELPER_NAME ": ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(status);
}

/* CLOCK_MONOTONIC in ns: the clock uffdsnap and every helper time events with. */
static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Sleep until monotonic time `t` (ns); a signal cuts it short (callers re-check their stop). */
static inline void sleep_until_ns(uint64_t t)
{
    struct timespec ts = { .tv_sec = (time_t)(t / 1000000000ULL),
                           .tv_nsec = (long)(t % 1000000000ULL) };
    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
}

/* Option `opt`'s value `s` as a non-negative integer, or exit 2 naming it. */
static inline uint64_t parse_u64(const char *opt, const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, HELPER_INT_BASE);
    if (errno || end == s || *end || s[0] == '-')
        die(2, "%s: not a non-negative integer: %s", opt, s);
    return v;
}

/* Option `opt`'s value `s` as a non-negative number (e.g. a rate per second), or exit 2. */
static inline double parse_rate(const char *opt, const char *s)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end || !(v >= 0))
        die(2, "%s: not a non-negative number: %s", opt, s);
    return v;
}

#endif
