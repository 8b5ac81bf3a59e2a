/* Per-kernel wall-clock timers, off by default. When on, each top-level kernel call
 * adds its duration to its kernel's counter (atomically: two models may run in two
 * Python threads). Read and reset through dlmone._core.profile(). */
#ifndef DLMONE_PROFILE_H
#define DLMONE_PROFILE_H

#include <stdint.h>

typedef enum {
    DL_K_MATMUL,
    DL_K_MATMUL_BF16,
    DL_K_LAYERNORM,
    DL_K_LAYERNORM_BWD,
    DL_K_GELU,
    DL_K_GELU_BWD,
    DL_K_ATTENTION,
    DL_K_ATTENTION_BWD,
    DL_K_DROPOUT,
    DL_K_ACTIVATION,
    DL_K_BIAS,
    DL_K_EMBEDDING,
    DL_K_OPTIMIZER,
    DL_K_LOSS,
    DL_K_DECODE,
    DL_K_SAMPLER,
    DL_K_DISTILL,
    DL_K_COUNT
} DlKernel;

extern const char *const dl_kernel_names[DL_K_COUNT];
extern int dl_profile_on;

uint64_t dl_now_ns(void);
void dl_profile_add(DlKernel k, uint64_t ns);
void dl_profile_read(uint64_t calls[DL_K_COUNT], uint64_t ns[DL_K_COUNT], int reset);

#define DL_PROFILE_BEGIN uint64_t dl_prof_t0_ = dl_profile_on ? dl_now_ns() : 0
#define DL_PROFILE_END(k)                                                 \
    do {                                                                  \
        if (dl_profile_on) dl_profile_add((k), dl_now_ns() - dl_prof_t0_); \
    } while (0)

#endif
