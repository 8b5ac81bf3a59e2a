/* bf16 products on AMX tiles (see amx.h). A block of 32 x 32 outputs lives in four
 * 16 x 16 float32 tiles; each step multiplies two 16 x 32 bf16 row tiles of x by two
 * 32 x 16 column tiles of W (stored pre-interleaved in pairs, the layout TDPBF16PS
 * wants) and accumulates. */
#include "amx.h"

#define KB 32 /* inputs per tile step */
#define NB 16 /* outputs per weight tile */
#define MB 32 /* rows per block (two row tiles) */

static size_t round_up(size_t n, size_t k) { return (n + k - 1) / k * k; }

size_t amx_packed_weight_size(size_t out, size_t in) { return round_up(out, 2 * NB) * round_up(in, KB); }
size_t amx_input_size(size_t M, size_t in) { return round_up(M, MB) * round_up(in, KB); }

/* float32 -> bf16, round to nearest even; NaN stays a (quiet) NaN. */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Tile (nb, kb) of W^T: 16 rows of 16 outputs x 2 consecutive inputs. */
void amx_pack_weight(uint16_t *dst, const float *W, size_t out, size_t in) {
    size_t Kp = round_up(in, KB), Np = round_up(out, 2 * NB), kbs = Kp / KB;
#pragma omp parallel for schedule(static) if (Np * Kp > DL_PAR_MIN)
    for (size_t nb = 0; nb < Np / NB; nb++)
        for (size_t kb = 0; kb < kbs; kb++) {
            uint16_t *tile = dst + (nb * kbs + kb) * (KB * NB);
            for (size_t r = 0; r < KB / 2; r++)
                for (size_t n = 0; n < NB; n++)
                    for (size_t p = 0; p < 2; p++) {
                        size_t o = nb * NB + n, i = kb * KB + 2 * r + p;
                        tile[(r * NB + n) * 2 + p] = o < out && i < in ? to_bf16(W[o * in + i]) : 0;
                    }
        }
}

/* A dispatching build has the AMX code in its AVX-512 level only (every AMX CPU has
 * AVX-512), so DLMONE_ISA=baseline or avx2 turns bf16 off with the rest. */
#if defined(DLMONE_HAVE_AMX) && defined(__x86_64__) && \
    (!defined(DLMONE_DISPATCH) || defined(DLMONE_LEVEL_AVX512))
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) TileConfig;

static int amx_probe(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!(d & (1u << 24)) || !(d & (1u << 22))) return 0; /* AMX-TILE, AMX-BF16 */
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

int amx_available(void) {
    static int state = -1; /* a racing first call computes the same answer */
    if (state < 0) state = amx_probe();
    return state;
}

AMX_TARGET static void load_tile_config(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    /* GCC 12's _tile_loadconfig declares an 8-byte read, so the stores above looked dead
     * and were dropped (seen with -march=x86-64-v4): this says all of cfg is read. */
    __asm__ volatile("" : : "m"(cfg));
    _tile_loadconfig(&cfg);
}

/* C[32][32] = rows m0..m0+31 of xb times weight column tiles nb, nb+1. */
AMX_TARGET static void block_product(float *C, const uint16_t *xb, const uint16_t *Wp,
                                     size_t Kp, size_t m0, size_t nb) {
    size_t kbs = Kp / KB, stride = Kp * sizeof(uint16_t), cs = 2 * NB * sizeof(float);
    const uint16_t *x0 = xb + m0 * Kp, *x1 = x0 + 16 * Kp;
    const uint16_t *w0 = Wp + nb * kbs * (KB * NB), *w1 = w0 + kbs * (KB * NB);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (size_t kb = 0; kb < kbs; kb++) {
        _tile_loadd(4, x0 + kb * KB, stride);
        _tile_loadd(5, x1 + kb * KB, stride);
        _tile_loadd(6, w0 + kb * (KB * NB), 64);
        _tile_loadd(7, w1 + kb * (KB * NB), 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, C, cs);
    _tile_stored(1, C + NB, cs);
    _tile_stored(2, C + 16 * 2 * NB, cs);
    _tile_stored(3, C + 16 * 2 * NB + NB, cs);
}

AMX_TARGET static void tile_release(void) { _tile_release(); }

void amx_linear(float *y, const float *x, const uint16_t *Wp, const Epilogue *epi, size_t M,
                size_t in, size_t out, uint16_t *xbuf) {
    DL_PROFILE_BEGIN;
    size_t Kp = round_up(in, KB), Mp = round_up(M, MB), Np = round_up(out, 2 * NB);
#pragma omp parallel for schedule(static) if (Mp * Kp > DL_PAR_MIN)
    for (size_t m = 0; m < Mp; m++) {
        uint16_t *row = xbuf + m * Kp;
        const float *xr = x + m * in;
        size_t valid = m < M ? in : 0;
#pragma omp simd
        for (size_t i = 0; i < valid; i++) row[i] = to_bf16(xr[i]);
        for (size_t i = valid; i < Kp; i++) row[i] = 0;
    }
    size_t mbs = Mp / MB, nbs = Np / (2 * NB);
#pragma omp parallel if (mbs * nbs > 1)
    {
        float C[MB * 2 * NB];
        load_tile_config();
#pragma omp for schedule(static)
        for (size_t blk = 0; blk < mbs * nbs; blk++) {
            size_t m0 = blk / nbs * MB, n0 = blk % nbs * 2 * NB;
            block_product(C, xbuf, Wp, Kp, m0, n0 / NB);
            size_t m1 = m0 + MB < M ? m0 + MB : M, n1 = n0 + 2 * NB < out ? n0 + 2 * NB : out;
            for (size_t m = m0; m < m1; m++)
                memcpy(y + m * out + n0, C + (m - m0) * 2 * NB, (n1 - n0) * sizeof(float));
            if (epi && epi->kind != EPI_NONE && m1 > m0) apply_epilogue(epi, y, out, m0, m1, n0, n1);
        }
        tile_release();
    }
    DL_PROFILE_END(DL_K_MATMUL_BF16);
}

#else

int amx_available(void) { return 0; }

void amx_linear(float *y, const float *x, const uint16_t *Wp, const Epilogue *epi, size_t M,
                size_t in, size_t out, uint16_t *xbuf) {
    (void)y, (void)x, (void)Wp, (void)epi, (void)M, (void)in, (void)out, (void)xbuf;
}

#endif
