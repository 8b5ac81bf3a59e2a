/* DLM-One distillation kernels. */
#include "distill.h"

void sid_loss(float *loss, float *omega, float *g_yr, float *g_yf, float *g_eg, const float *y_r,
              const float *y_f, const float *e_g, const float *mask, float alpha, size_t B,
              size_t L, size_t E) {
    DL_PROFILE_BEGIN;
    size_t n = L * E;
#pragma omp parallel for schedule(static) if (B * n > DL_PAR_MIN)
    for (size_t b = 0; b < B; b++) {
        const float *yr = y_r + b * n, *yf = y_f + b * n, *eg = e_g + b * n, *mk = mask + b * L;
        double abs_sum = 0.0;
        size_t count = 0;
        for (size_t l = 0; l < L; l++) {
            if (mk[l] == 0.0f) continue;
            for (size_t e = 0; e < E; e++) abs_sum += fabs((double)eg[l * E + e] - yr[l * E + e]);
            count += E;
        }
        double w = count ? abs_sum / (double)count : 0.0;
        if (w < 1e-5) w = 1e-5;
        omega[b] = (float)w;
        float scale = (float)(1.0 / (w * (double)B));
        double s = 0.0;
        float *gr = g_yr + b * n, *gf = g_yf + b * n, *ge = g_eg + b * n;
        for (size_t l = 0; l < L; l++) {
            size_t o = l * E;
            if (mk[l] == 0.0f) {
                memset(gr + o, 0, E * sizeof(float));
                memset(gf + o, 0, E * sizeof(float));
                memset(ge + o, 0, E * sizeof(float));
                continue;
            }
            for (size_t e = 0; e < E; e++) {
                float d = yr[o + e] - yf[o + e], u = yr[o + e] - eg[o + e];
                s += (double)d * (u - alpha * d);
                gr[o + e] = scale * (u + d - 2.0f * alpha * d);
                gf[o + e] = scale * (2.0f * alpha * d - u);
                ge[o + e] = -scale * d;
            }
        }
        loss[b] = (float)(s / w);
    }
    DL_PROFILE_END(DL_K_DISTILL);
}

/* Row sums in double, added in row order (the same for any thread count); DENOISE_GROUP
 * rows at a time so that they live on the stack (no allocation that could fail). */
#define DENOISE_GROUP 1024

double denoise_loss(float *grad, const float *pred, const float *target, const float *mask,
                    size_t B, size_t L, size_t E) {
    size_t rows = B * L, positions = 0;
    for (size_t r = 0; r < rows; r++) positions += mask[r] != 0.0f;
    float k = positions ? 2.0f / (float)positions : 0.0f;
    double total = 0.0, row_sums[DENOISE_GROUP];
    for (size_t r0 = 0; r0 < rows; r0 += DENOISE_GROUP) {
        size_t r1 = r0 + DENOISE_GROUP < rows ? r0 + DENOISE_GROUP : rows;
#pragma omp parallel for schedule(static) if ((r1 - r0) * E > DL_PAR_MIN)
        for (size_t r = r0; r < r1; r++) {
            const float *p = pred + r * E, *t = target + r * E;
            float *g = grad + r * E;
            double s = 0.0;
            if (mask[r] == 0.0f) {
                memset(g, 0, E * sizeof(float));
            } else {
                for (size_t e = 0; e < E; e++) {
                    float d = p[e] - t[e];
                    s += (double)d * d;
                    g[e] = k * d;
                }
            }
            row_sums[r - r0] = s;
        }
        for (size_t r = r0; r < r1; r++) total += row_sums[r - r0];
    }
    return positions ? total / (double)positions : 0.0;
}

size_t disc_logit_count(DiscKind kind, size_t L, size_t H) {
    return kind == DISC_TOKEN ? H : (kind == DISC_LINEAR ? L : 1);
}

static size_t mask_count(const float *mask_row, size_t L) {
    size_t count = 0;
    for (size_t l = 0; l < L; l++) count += mask_row[l] != 0.0f;
    return count;
}

void disc_logits(float *logit, const float *hidden, const float *mask, DiscKind kind, const float *w,
                 float bias, size_t B, size_t L, size_t H) {
    DL_PROFILE_BEGIN;
    const size_t K = disc_logit_count(kind, L, H);
#pragma omp parallel for schedule(static) if (B * L * H > DL_PAR_MIN)
    for (size_t b = 0; b < B; b++) {
        const float *m = mask + b * L;
        const size_t count = mask_count(m, L);
        float *out = logit + b * K;
        memset(out, 0, K * sizeof(float));
        if (count == 0) continue;
        if (kind == DISC_LINEAR) {
            for (size_t l = 0; l < L; l++) {
                if (m[l] == 0.0f) continue;
                const float *h = hidden + (b * L + l) * H;
                double v = bias;
                for (size_t c = 0; c < H; c++) v += (double)w[c] * h[c];
                out[l] = (float)v;
            }
            continue;
        }
        /* token pooling; hidden-mean then averages the H pooled values */
        double pooled_sum = 0.0;
        for (size_t c = 0; c < H; c++) {
            double s = 0.0;
            for (size_t l = 0; l < L; l++)
                if (m[l] != 0.0f) s += hidden[(b * L + l) * H + c];
            s /= (double)count;
            if (kind == DISC_TOKEN)
                out[c] = (float)s;
            else
                pooled_sum += s;
        }
        if (kind == DISC_HIDDEN_MEAN) out[0] = (float)(pooled_sum / (double)H);
    }
    DL_PROFILE_END(DL_K_DISTILL);
}

void disc_backward(float *grad_hidden, float *grad_w, float *grad_bias, const float *grad_logit,
                   const float *hidden, const float *mask, DiscKind kind, const float *w, size_t B,
                   size_t L, size_t H) {
    DL_PROFILE_BEGIN;
    const size_t K = disc_logit_count(kind, L, H);
    /* the head's gradient sums over rows in order (one thread): thread-count independent */
    for (size_t b = 0; b < B; b++) {
        const float *m = mask + b * L;
        const size_t count = mask_count(m, L);
        const float *g = grad_logit + b * K;
        for (size_t l = 0; l < L; l++) {
            float *gh = grad_hidden + (b * L + l) * H;
            if (m[l] == 0.0f) {
                memset(gh, 0, H * sizeof(float));
                continue;
            }
            if (kind == DISC_LINEAR) {
                const float *h = hidden + (b * L + l) * H;
                for (size_t c = 0; c < H; c++) {
                    gh[c] = g[l] * w[c];
                    grad_w[c] += g[l] * h[c];
                }
                *grad_bias += g[l];
            } else if (kind == DISC_TOKEN) {
                const float inv = 1.0f / (float)count;
                for (size_t c = 0; c < H; c++) gh[c] = g[c] * inv;
            } else {
                const float gv = g[0] / ((float)count * (float)H);
                for (size_t c = 0; c < H; c++) gh[c] = gv;
            }
        }
    }
    DL_PROFILE_END(DL_K_DISTILL);
}

void bce_with_logits(float *loss, float *grad, const float *logit, const float *target, float c,
                     size_t B) {
    DL_PROFILE_BEGIN;
    for (size_t b = 0; b < B; b++) {
        float z = logit[b], y = target[b];
        int clamped = z > c || z < -c;
        z = z > c ? c : (z < -c ? -c : z);
        loss[b] = fmaxf(z, 0.0f) - z * y + log1pf(expf(-fabsf(z)));
        grad[b] = clamped ? 0.0f : 1.0f / (1.0f + expf(-z)) - y;
    }
    DL_PROFILE_END(DL_K_DISTILL);
}
