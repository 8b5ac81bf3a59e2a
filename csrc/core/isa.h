/* Run-time choice of instruction set. A default build compiles csrc/core once per x86-64
 * level below (setup.py, ISA_LEVELS) with each entry point renamed name__<level>, and
 * links all of them; a generated file routes every entry point, when the extension
 * loads, to the build for dl_isa_selected(): the best level the CPU supports, capped by
 * the environment variable DLMONE_ISA. Everything else is compiled for the baseline.
 * A DLMONE_NATIVE=1 build (-march=native) has one build of the core and no dispatch. */
#ifndef DLMONE_ISA_H
#define DLMONE_ISA_H

/* The order of setup.py's ISA_LEVELS. */
typedef enum {
    DL_ISA_BASELINE, /* x86-64-v2: SSE4.2 (2009 on) */
    DL_ISA_AVX2,     /* x86-64-v3: AVX2 + FMA (2013 on) */
    DL_ISA_AVX512,   /* x86-64-v4: AVX-512 F/BW/CD/DQ/VL */
    DL_ISA_COUNT
} DlIsa;

extern const char *const dl_isa_names[DL_ISA_COUNT];

/* 1 when the CPU and the OS support the level (0 off x86-64). */
int dl_isa_supported(DlIsa isa);
/* The level the core runs: the best supported one, no higher than DLMONE_ISA. */
DlIsa dl_isa_selected(void);
/* 1 when DLMONE_ISA is unset or names a level, 0 when it names none. */
int dl_isa_request_valid(void);
/* 1 when this build dispatches (DLMONE_DISPATCH), 0 for a single build of the core. */
int dl_isa_dispatching(void);
/* The name of the code in use: a level's name, or "native" / "generic" for a build
 * without dispatch (-march=native, or no x86-64 level support in the toolchain). */
const char *dl_isa_in_use(void);

/* Defines `name` (hidden) as an ifunc over name__baseline, name__avx2, name__avx512.
 * Hidden matters: the loader then runs the resolvers last, after every other relocation
 * of the extension (so dl_isa_selected may call getenv). The prototype is a stand-in:
 * the symbol only has to resolve to the right code. */
typedef void (*DlEntry)(void);
#define DL_DISPATCH(name)                                                                 \
    void name##__baseline(void), name##__avx2(void), name##__avx512(void);                 \
    static DlEntry name##__resolve(void) {                                                 \
        DlIsa isa = dl_isa_selected();                                                     \
        return isa == DL_ISA_AVX512 ? name##__avx512 : isa == DL_ISA_AVX2 ? name##__avx2   \
                                                                          : name##__baseline; \
    }                                                                                      \
    __attribute__((visibility("hidden"), ifunc(#name "__resolve"))) void name(void);

#endif
