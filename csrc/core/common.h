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

/* The largest dimension or leading dimension a BLAS with 32-bit integers takes; the
 * bindings refuse larger sizes before anything reaches a (blasint) cast. */
#define DL_BLAS_MAX ((size_t)INT32_MAX)

/* *out = a*b; 1 when that overflows size_t (then *out is not to be used). Every size
 * that reaches malloc goes through it. */
static inline int dl_mul_overflows(size_t a, size_t b, size_t *out) {
    return __builtin_mul_overflow(a, b, out);
}

/* The splitmix64 finaliser: the hash behind dropout masks, Gaussian noise and
 * parameter initialisation. */
static inline uint64_t dl_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

#endif
