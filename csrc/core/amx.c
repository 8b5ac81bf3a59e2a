/* bf16 products on AMX tiles (see amx.h). A block of 32 x 32 outputs lives in four
 * 16 x 16 float32 tiles; each step multiplies two 16 x 32 bf16 row tiles of x by two
 * 32 x 16 column tiles of W (stored pre-interleaved in pairs, the layout TDPBF16PS
 * wants) and accumulates. */
#include "amx.h"

#define KB 32 /* inputs per tile step */
#define NB 16 /* outputs per weight tile */
#define MB 32 /* rows per block (two row tiles) */

static size_t round_up(size_t n, size_t k) { return (n + k - 1) / k * k; }
/* Packed rows of A are Kp + KB bf16 apart: a stride of a multiple of 4 KiB (Kp = 2048)
 * would put all 16 rows of a tile load in one L1 set (measured: 2x slower at 2048^3). */
static size_t a_stride(size_t Kp) { return Kp + KB; }

size_t amx_packed_weight_size(size_t out, size_t in) { return round_up(out, 2 * NB) * round_up(in, KB); }
size_t amx_input_size(size_t M, size_t in) { return round_up(M, MB) * a_stride(round_up(in, KB)); }
size_t amx_matmul_scratch(size_t M, size_t N, size_t K) {
    return amx_input_size(M, K) + round_up(N, 2 * NB) * round_up(K, KB);
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

/* C[32][32] (row stride ldc floats) = rows m0..m0+31 of xb times weight column tiles
 * nb, nb+1, plus C's previous values when accumulate. */
AMX_TARGET static void block_product(float *C, size_t ldc, int accumulate, const uint16_t *xb,
                                     const uint16_t *Wp, size_t Kp, size_t m0, size_t nb) {
    size_t kbs = Kp / KB, as = a_stride(Kp), stride = as * sizeof(uint16_t), cs = ldc * sizeof(float);
    const uint16_t *x0 = xb + m0 * as, *x1 = x0 + 16 * as;
    const uint16_t *w0 = Wp + nb * kbs * (KB * NB), *w1 = w0 + kbs * (KB * NB);
    if (accumulate) {
        _tile_loadd(0, C, cs);
        _tile_loadd(1, C + NB, cs);
        _tile_loadd(2, C + 16 * ldc, cs);
        _tile_loadd(3, C + 16 * ldc + NB, cs);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
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
    _tile_stored(2, C + 16 * ldc, cs);
    _tile_stored(3, C + 16 * ldc + NB, cs);
}

AMX_TARGET static void tile_release(void) { _tile_release(); }

/* The packers use AVX512-BF16 (every AMX-BF16 CPU has it): VCVTNE2PS2BF16 rounds to
 * nearest even and, like TDPBF16PS itself, treats subnormal inputs as zero. */
#define PACK_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

/* Mask of the first n (<= 16) of 16 lanes. */
static inline __mmask16 lanes(size_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

/* 16 floats from p, the first n of them (0 <= n; the rest zero). */
PACK_TARGET static inline __m512 load16(const float *p, size_t n) {
    return n ? _mm512_maskz_loadu_ps(lanes(n), p) : _mm512_setzero_ps();
}

/* Dword i = (bf16(a[i]), bf16(b[i])): a pair of consecutive k as TDPBF16PS reads it. */
PACK_TARGET static inline __m512i bf16_pairs(__m512 a, __m512 b) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(b, a));
}

/* Rows of op(A) (M x K) as bf16 rows of Kp (a_stride(Kp) apart), zero-padded to Mp rows. */
PACK_TARGET static void pack_rows(uint16_t *dst, int ta, const float *A, size_t lda, size_t M,
                                  size_t K, size_t Mp, size_t Kp) {
    if (!ta) {
#pragma omp parallel for schedule(static) if (Mp * Kp > DL_PAR_MIN)
        for (size_t m = 0; m < Mp; m++) {
            const float *ar = A + m * lda;
            size_t valid = m < M ? K : 0;
            for (size_t k = 0; k < Kp; k += 32) {
                size_t n = valid > k ? valid - k : 0;
                __m512 lo = load16(ar + k, n), hi = load16(ar + k + 16, n > 16 ? n - 16 : 0);
                _mm512_storeu_si512(dst + m * a_stride(Kp) + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            }
        }
        return;
    }
    /* op(A)[m][k] = A[k][m]: rows k, k+1 over 16 m give 16 pairs, scattered to 16 rows */
    size_t kps = Kp / 2, row_dwords = a_stride(Kp) / 2;
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32((int)row_dwords));
#pragma omp parallel for schedule(static) if (Mp * Kp > DL_PAR_MIN)
    for (size_t m0 = 0; m0 < Mp; m0 += 16) {
        size_t nm = M > m0 ? M - m0 : 0;
        uint32_t *out = (uint32_t *)dst + m0 * row_dwords;
        for (size_t kp = 0; kp < kps; kp++) {
            size_t k = 2 * kp;
            __m512 a = load16(A + k * lda + m0, k < K ? nm : 0);
            __m512 b = load16(A + (k + 1) * lda + m0, k + 1 < K ? nm : 0);
            _mm512_i32scatter_epi32(out + kp, rows, bf16_pairs(a, b), 4);
        }
    }
}

/* op(B) (K x N) as weight tiles: tile (nb, kb) holds 16 rows r of 16 columns n, each a
 * pair (k, k+1) = (kb*32 + 2r, +1), as dwords at r*16 + n. */
PACK_TARGET static void pack_tiles(uint16_t *dst, int tb, const float *B, size_t ldb, size_t K,
                                   size_t N, size_t Kp, size_t Np) {
    size_t kbs = Kp / KB;
    const __m512i tile_rows = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(NB));
#pragma omp parallel for schedule(static) if (Np * Kp > DL_PAR_MIN)
    for (size_t nb = 0; nb < Np / NB; nb++) {
        size_t n0 = nb * NB, nn = N > n0 ? N - n0 : 0;
        for (size_t kb = 0; kb < kbs; kb++) {
            uint32_t *tile = (uint32_t *)(dst + (nb * kbs + kb) * (KB * NB));
            size_t k0 = kb * KB;
            if (!tb) { /* op(B)[k][n] = B[k][n]: two rows of 16 columns make a tile row */
                for (size_t r = 0; r < KB / 2; r++) {
                    size_t k = k0 + 2 * r;
                    __m512 a = load16(B + k * ldb + n0, k < K ? nn : 0);
                    __m512 b = load16(B + (k + 1) * ldb + n0, k + 1 < K ? nn : 0);
                    _mm512_storeu_si512(tile + r * NB, bf16_pairs(a, b));
                }
            } else { /* op(B)[k][n] = B[n][k]: 32 k of column n are 16 pairs, one per tile row */
                size_t nk = K > k0 ? K - k0 : 0;
                for (size_t n = 0; n < NB; n++) {
                    const float *col = B + (n0 + n) * ldb + k0;
                    size_t valid = n < nn ? nk : 0;
                    __m512 lo = load16(col, valid), hi = load16(col + 16, valid > 16 ? valid - 16 : 0);
                    _mm512_i32scatter_epi32(tile + n, tile_rows, (__m512i)_mm512_cvtne2ps_pbh(hi, lo), 4);
                }
            }
        }
    }
}

void amx_pack_weight(uint16_t *dst, const float *W, size_t out, size_t in) {
    pack_tiles(dst, 1, W, in, in, out, round_up(in, KB), round_up(out, 2 * NB));
}

void amx_pack_a(uint16_t *dst, int ta, const float *A, size_t lda, size_t M, size_t K) {
    pack_rows(dst, ta, A, lda, M, K, round_up(M, MB), round_up(K, KB));
}

void amx_pack_b(uint16_t *dst, int tb, const float *B, size_t ldb, size_t K, size_t N) {
    pack_tiles(dst, tb, B, ldb, K, N, round_up(K, KB), round_up(N, 2 * NB));
}

/* Column blocks of 32 per panel: a thread sweeps the row blocks of one panel, whose
 * packed B (PANEL x 32 columns x Kp) stays in its L2. */
#define PANEL 8

/* C = alpha Ap Bp + beta C (+ epilogue) over packed operands, in 32 x 32 blocks. */
static void block_products(size_t M, size_t N, size_t Kp, float alpha, const uint16_t *Ap,
                           const uint16_t *Bp, float beta, float *C, size_t ldc,
                           const Epilogue *epi) {
    size_t mbs = round_up(M, MB) / MB, nbs = round_up(N, 2 * NB) / (2 * NB);
    size_t full = nbs / PANEL, rem = nbs % PANEL;
#pragma omp parallel if (mbs * nbs > 1)
    {
        float Cb[MB * 2 * NB];
        load_tile_config();
#pragma omp for schedule(static)
        for (size_t blk = 0; blk < mbs * nbs; blk++) {
            size_t pi = blk / (mbs * PANEL), mb, nb;
            if (pi < full) {
                size_t r = blk % (mbs * PANEL);
                mb = r / PANEL, nb = pi * PANEL + r % PANEL;
            } else {
                size_t r = blk - full * mbs * PANEL;
                mb = r / rem, nb = full * PANEL + r % rem;
            }
            size_t m0 = mb * MB, n0 = nb * 2 * NB;
            size_t m1 = m0 + MB < M ? m0 + MB : M, n1 = n0 + 2 * NB < N ? n0 + 2 * NB : N;
            if (alpha == 1.0f && (beta == 0.0f || beta == 1.0f) && m1 - m0 == MB && n1 - n0 == 2 * NB) {
                /* a whole block straight into C; the float32 sum starts from C when beta is 1 */
                block_product(C + m0 * ldc + n0, ldc, beta == 1.0f, Ap, Bp, Kp, m0, 2 * nb);
            } else {
                block_product(Cb, 2 * NB, 0, Ap, Bp, Kp, m0, 2 * nb);
                for (size_t m = m0; m < m1; m++) {
                    float *cr = C + m * ldc + n0;
                    const float *br = Cb + (m - m0) * 2 * NB;
                    if (beta == 0.0f) {
#pragma omp simd
                        for (size_t n = 0; n < n1 - n0; n++) cr[n] = alpha * br[n];
                    } else {
#pragma omp simd
                        for (size_t n = 0; n < n1 - n0; n++) cr[n] = fmaf(beta, cr[n], alpha * br[n]);
                    }
                }
            }
            if (epi && epi->kind != EPI_NONE) apply_epilogue(epi, C, ldc, m0, m1, n0, n1);
        }
        tile_release();
    }
}

void amx_packed_product(size_t M, size_t N, size_t K, float alpha, const uint16_t *Ap,
                        const uint16_t *Bp, float beta, float *C, size_t ldc, const Epilogue *epi) {
    if (M == 0 || N == 0) return;
    DL_PROFILE_BEGIN;
    block_products(M, N, round_up(K, KB), alpha, Ap, Bp, beta, C, ldc, epi);
    DL_PROFILE_END(DL_K_MATMUL_BF16);
}

void amx_matmul(int ta, int tb, size_t M, size_t N, size_t K, float alpha, const float *A,
                size_t lda, const float *B, size_t ldb, float beta, float *C, size_t ldc,
                const Epilogue *epi, uint16_t *scratch) {
    if (M == 0 || N == 0) return;
    DL_PROFILE_BEGIN;
    size_t Kp = round_up(K, KB), Mp = round_up(M, MB), Np = round_up(N, 2 * NB);
    uint16_t *Ap = scratch, *Bp = scratch + amx_input_size(M, K);
    pack_rows(Ap, ta, A, lda, M, K, Mp, Kp);
    pack_tiles(Bp, tb, B, ldb, K, N, Kp, Np);
    block_products(M, N, Kp, alpha, Ap, Bp, beta, C, ldc, epi);
    DL_PROFILE_END(DL_K_MATMUL_BF16);
}

void amx_linear(float *y, const float *x, const uint16_t *Wp, const Epilogue *epi, size_t M,
                size_t in, size_t out, uint16_t *xbuf) {
    if (M == 0 || out == 0) return;
    DL_PROFILE_BEGIN;
    size_t Kp = round_up(in, KB);
    pack_rows(xbuf, 0, x, in, M, in, round_up(M, MB), Kp);
    block_products(M, out, Kp, 1.0f, xbuf, Wp, 0.0f, y, out, epi);
    DL_PROFILE_END(DL_K_MATMUL_BF16);
}

#else

int amx_available(void) { return 0; }

void amx_pack_weight(uint16_t *dst, const float *W, size_t out, size_t in) {
    (void)dst, (void)W, (void)out, (void)in;
}

void amx_linear(float *y, const float *x, const uint16_t *Wp, const Epilogue *epi, size_t M,
                size_t in, size_t out, uint16_t *xbuf) {
    (void)y, (void)x, (void)Wp, (void)epi, (void)M, (void)in, (void)out, (void)xbuf;
}

void amx_pack_a(uint16_t *dst, int ta, const float *A, size_t lda, size_t M, size_t K) {
    (void)dst, (void)ta, (void)A, (void)lda, (void)M, (void)K;
}

void amx_pack_b(uint16_t *dst, int tb, const float *B, size_t ldb, size_t K, size_t N) {
    (void)dst, (void)tb, (void)B, (void)ldb, (void)K, (void)N;
}

void amx_packed_product(size_t M, size_t N, size_t K, float alpha, const uint16_t *Ap,
                        const uint16_t *Bp, float beta, float *C, size_t ldc, const Epilogue *epi) {
    (void)M, (void)N, (void)K, (void)alpha, (void)Ap, (void)Bp, (void)beta, (void)C, (void)ldc, (void)epi;
}

void amx_matmul(int ta, int tb, size_t M, size_t N, size_t K, float alpha, const float *A,
                size_t lda, const float *B, size_t ldb, float beta, float *C, size_t ldc,
                const Epilogue *epi, uint16_t *scratch) {
    (void)ta, (void)tb, (void)M, (void)N, (void)K, (void)alpha, (void)A, (void)lda, (void)B;
    (void)ldb, (void)beta, (void)C, (void)ldc, (void)epi, (void)scratch;
}

#endif
