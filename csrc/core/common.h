/* Shared includes and helpers for the dlmone C core. */
#ifndef DLMONE_COMMON_H
#define DLMONE_COMMON_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cblas.h"
#include "profile.h"

/* Below this many elements a loop runs on one thread: forking a team costs more,
 * and on a loaded machine a barrier waiting for a descheduled thread costs far more. */
#define DL_PAR_MIN ((size_t)32768)

/* scipy-openblas32 prefixes every symbol with scipy_. */
#define SGEMM scipy_cblas_sgemm

static inline int dl_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static inline int dl_thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* a*b with overflow detection; returns 0 on overflow. */
static inline int dl_mul(size_t a, size_t b, size_t *out) {
    return !__builtin_mul_overflow(a, b, out);
}

#endif
