/* Per-kernel timers (see profile.h). */
#include "profile.h"
#include "kernels.h"

#include <time.h>

const char *const dl_kernel_names[DL_K_COUNT] = {
    "matmul",    "matmul_bf16", "layernorm", "layernorm_backward", "gelu",      "gelu_backward",
    "attention", "attention_backward", "dropout",   "activation", "bias",
    "embedding", "optimizer", "loss",               "decode",     "sampler",
    "distill"};

int dl_profile_on = 0;

/* kernels.h's mixed-precision switch: global data of the core lives in files compiled
 * once, so that every ISA level shares it. */
_Thread_local Bf16Products *dl_bf16_products = NULL;
static uint64_t calls_[DL_K_COUNT], ns_[DL_K_COUNT];

uint64_t dl_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

void dl_profile_add(DlKernel k, uint64_t ns) {
    __atomic_fetch_add(&calls_[k], 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&ns_[k], ns, __ATOMIC_RELAXED);
}

void dl_profile_read(uint64_t calls[DL_K_COUNT], uint64_t ns[DL_K_COUNT], int reset) {
    for (int k = 0; k < DL_K_COUNT; k++) {
        calls[k] = reset ? __atomic_exchange_n(&calls_[k], 0, __ATOMIC_RELAXED)
                         : __atomic_load_n(&calls_[k], __ATOMIC_RELAXED);
        ns[k] = reset ? __atomic_exchange_n(&ns_[k], 0, __ATOMIC_RELAXED)
                      : __atomic_load_n(&ns_[k], __ATOMIC_RELAXED);
    }
}
