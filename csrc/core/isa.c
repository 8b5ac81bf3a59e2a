/* Which instruction-set level the core runs (see isa.h). Compiled once, for the
 * baseline: it runs inside the ifunc resolvers, before the level is known. */
#include "isa.h"

#include <stdlib.h>
#include <string.h>

const char *const dl_isa_names[DL_ISA_COUNT] = {"baseline", "avx2", "avx512"};

int dl_isa_supported(DlIsa isa) {
#ifdef DLMONE_CPU_LEVELS
    __builtin_cpu_init(); /* the resolvers run before libgcc's constructor does this */
    switch (isa) {
    case DL_ISA_BASELINE: return __builtin_cpu_supports("x86-64-v2") != 0;
    case DL_ISA_AVX2: return __builtin_cpu_supports("x86-64-v3") != 0;
    case DL_ISA_AVX512: return __builtin_cpu_supports("x86-64-v4") != 0;
    default: return 0;
    }
#else
    (void)isa;
    return 0;
#endif
}

/* The level DLMONE_ISA names, DL_ISA_COUNT when unset or empty, -1 when it names none. */
static int requested_level(void) {
    const char *want = getenv("DLMONE_ISA");
    if (!want || !*want) return DL_ISA_COUNT;
    for (int i = 0; i < DL_ISA_COUNT; i++)
        if (strcmp(want, dl_isa_names[i]) == 0) return i;
    return -1;
}

int dl_isa_request_valid(void) { return requested_level() >= 0; }

DlIsa dl_isa_selected(void) {
    static int selected = -1; /* set by the first resolver; they run one at a time */
    if (selected < 0) {
        int cap = requested_level(), best = DL_ISA_BASELINE;
        for (int i = DL_ISA_AVX2; i < DL_ISA_COUNT; i++)
            if (dl_isa_supported((DlIsa)i)) best = i;
        selected = cap >= 0 && cap < best ? cap : best;
    }
    return (DlIsa)selected;
}

int dl_isa_dispatching(void) {
#ifdef DLMONE_DISPATCH
    return 1;
#else
    return 0;
#endif
}

#ifndef DLMONE_ISA_FIXED
#define DLMONE_ISA_FIXED "unspecified" /* built outside setup.py, e.g. by tests/c */
#endif

const char *dl_isa_in_use(void) {
#ifdef DLMONE_DISPATCH
    return dl_isa_names[dl_isa_selected()];
#else
    return DLMONE_ISA_FIXED; /* "native" or "generic", from setup.py */
#endif
}
