/* CPU kernels for float32 channels-last training (models/fused.py): batch normalisation fused with its SiLU,
 * forward and backward, and squeeze-excitation's scale backward.
 *
 * A channels-last [N, C, H, W] tensor is a [rows = N*H*W, C] matrix in memory, so every per-channel
 * quantity is a vector of C floats and every loop below runs over rows outside, channels inside (unit
 * stride, vectorised by the compiler; expf through glibc's vector maths library). ATen runs BN and SiLU as
 * separate passes over memory: forward reads the input three times and writes two tensors, backward reads
 * five tensors and writes two, and autograd keeps both the BN input and the BN output. Here the forward
 * reads the input twice and writes once, the backward reads (input, gradient) twice and writes once, and
 * only the input is kept: the SiLU's input is recomputed from it.
 *
 * Sums over rows are taken per thread in float over blocks of BLOCK rows, then added in double, about
 * the first row's values (a shifted sum), so the variance keeps its precision when the mean is large.
 * Every function takes the thread count to use; the caller passes torch's.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#define BLOCK 64

/* 1 / (1 + e^-y), exactly 0 below -80 (where it is under 2e-35). Under -ffast-math the division of 1 by an
 * infinite e^-y (y < -88) gives NaN, not 0, so the exponent is bounded too. */
static inline float sigmoid(float y) { return y < -80.0f ? 0.0f : 1.0f / (1.0f + expf(fminf(-y, 80.0f))); }

/* Row range [*begin, *end) of thread t among n. */
static void row_range(int64_t rows, int t, int n, int64_t *begin, int64_t *end) {
    int64_t per = rows / n, extra = rows % n;
    *begin = t * per + (t < extra ? t : extra);
    *end = *begin + per + (t < extra ? 1 : 0);
}

/* Per-channel mean and biased variance of x [rows, C]. scratch: 2 * C * threads doubles, zeroed. */
void bn_stats(const float *x, int64_t rows, int64_t C, float *mean, float *var, double *scratch, int threads) {
    const float *shift = x;  /* the first row */
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        int64_t begin, end;
        row_range(rows, t, n, &begin, &end);
        double *s1 = scratch + (size_t)t * 2 * C, *s2 = s1 + C;
        float *f1 = malloc(2 * C * sizeof(float)), *f2 = f1 + C;
        for (int64_t c = 0; c < C; c++) s1[c] = s2[c] = 0.0;
        for (int64_t r0 = begin; r0 < end; r0 += BLOCK) {
            int64_t r1 = r0 + BLOCK < end ? r0 + BLOCK : end;
            for (int64_t c = 0; c < C; c++) f1[c] = f2[c] = 0.0f;
            for (int64_t r = r0; r < r1; r++) {
                const float *row = x + r * C;
#pragma omp simd
                for (int64_t c = 0; c < C; c++) {
                    float d = row[c] - shift[c];
                    f1[c] += d;
                    f2[c] += d * d;
                }
            }
            for (int64_t c = 0; c < C; c++) { s1[c] += f1[c]; s2[c] += f2[c]; }
        }
        free(f1);
    }
    for (int64_t c = 0; c < C; c++) {
        double a = 0.0, b = 0.0;
        for (int t = 0; t < threads; t++) { a += scratch[(size_t)t * 2 * C + c]; b += scratch[(size_t)t * 2 * C + C + c]; }
        double m = a / rows, v = b / rows - m * m;
        mean[c] = (float)(shift[c] + m);
        var[c] = (float)(v > 0.0 ? v : 0.0);
    }
}

/* out = act(x * scale + shift), act SiLU when silu, identity otherwise. out may be x. */
void bn_act_forward(const float *x, float *out, int64_t rows, int64_t C, const float *scale, const float *shift,
                    int silu, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *in = x + r * C;
        float *o = out + r * C;
        if (silu) {
#pragma omp simd
            for (int64_t c = 0; c < C; c++) { float y = in[c] * scale[c] + shift[c]; o[c] = y * sigmoid(y); }
        } else {
#pragma omp simd
            for (int64_t c = 0; c < C; c++) o[c] = in[c] * scale[c] + shift[c];
        }
    }
}

/* dL/dy of y = BN(x) from the output gradient g: g * silu'(y) with y = x * scale + shift, or g itself. */
static inline float pre_activation_grad(float g, float x, float scale, float shift, int silu) {
    if (!silu) return g;
    float y = x * scale + shift, s = sigmoid(y);
    return g * s * (1.0f + y * (1.0f - s));
}

/* Backward sums: sum_g[c] = sum over rows of dL/dy, sum_gx[c] = sum of dL/dy * (x - mean); dL/dy itself is
 * also written to grad_y unless it is NULL, so that the input gradient's pass need not recompute the SiLU's
 * exponential. scratch: 2 * C * threads doubles, zeroed. */
void bn_act_backward_sums(const float *grad, const float *x, int64_t rows, int64_t C, const float *scale,
                          const float *shift, const float *mean, int silu, float *sum_g, float *sum_gx,
                          float *grad_y, double *scratch, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        int64_t begin, end;
        row_range(rows, t, n, &begin, &end);
        double *s1 = scratch + (size_t)t * 2 * C, *s2 = s1 + C;
        float *f1 = malloc(2 * C * sizeof(float)), *f2 = f1 + C;
        for (int64_t c = 0; c < C; c++) s1[c] = s2[c] = 0.0;
        for (int64_t r0 = begin; r0 < end; r0 += BLOCK) {
            int64_t r1 = r0 + BLOCK < end ? r0 + BLOCK : end;
            for (int64_t c = 0; c < C; c++) f1[c] = f2[c] = 0.0f;
            for (int64_t r = r0; r < r1; r++) {
                const float *g = grad + r * C, *in = x + r * C;
                float *gy_row = grad_y ? grad_y + r * C : NULL;
                if (gy_row) {
#pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        float gy = pre_activation_grad(g[c], in[c], scale[c], shift[c], silu);
                        gy_row[c] = gy;
                        f1[c] += gy;
                        f2[c] += gy * (in[c] - mean[c]);
                    }
                } else {
#pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        float gy = pre_activation_grad(g[c], in[c], scale[c], shift[c], silu);
                        f1[c] += gy;
                        f2[c] += gy * (in[c] - mean[c]);
                    }
                }
            }
            for (int64_t c = 0; c < C; c++) { s1[c] += f1[c]; s2[c] += f2[c]; }
        }
        free(f1);
    }
    for (int64_t c = 0; c < C; c++) {
        double a = 0.0, b = 0.0;
        for (int t = 0; t < threads; t++) { a += scratch[(size_t)t * 2 * C + c]; b += scratch[(size_t)t * 2 * C + C + c]; }
        sum_g[c] = (float)a;
        sum_gx[c] = (float)b;
    }
}

/* grad_input = dL/dy * k + x * p + q, per channel (k, p, q from the sums; see fused.py). */
void bn_act_backward_input(const float *grad, const float *x, float *grad_input, int64_t rows, int64_t C,
                           const float *scale, const float *shift, const float *k, const float *p, const float *q,
                           int silu, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = grad + r * C, *in = x + r * C;
        float *o = grad_input + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; c++)
            o[c] = pre_activation_grad(g[c], in[c], scale[c], shift[c], silu) * k[c] + in[c] * p[c] + q[c];
    }
}

/* Squeeze-excitation's scale out = x * a[n, c], backward (x, g: [N, HW, C]; a, sums: [N, C]).
 *
 * ATen computes g * a, then g * x into a temporary, then its sum over HW, and autograd adds the pooling's
 * gradient in a fourth pass; here one pass reads g and x for the sums, and one reads g to write
 * grad_x = g * a + d, d being the pooling's gradient per sample and channel. */
void se_scale_sums(const float *grad, const float *x, int64_t N, int64_t HW, int64_t C, float *sums, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        double *total = calloc(C, sizeof(double));
        float *block = malloc(C * sizeof(float));
        for (int64_t r0 = 0; r0 < HW; r0 += BLOCK) {
            int64_t r1 = r0 + BLOCK < HW ? r0 + BLOCK : HW;
            for (int64_t c = 0; c < C; c++) block[c] = 0.0f;
            for (int64_t r = r0; r < r1; r++) {
                const float *g = grad + (n * HW + r) * C, *in = x + (n * HW + r) * C;
#pragma omp simd
                for (int64_t c = 0; c < C; c++) block[c] += g[c] * in[c];
            }
            for (int64_t c = 0; c < C; c++) total[c] += block[c];
        }
        for (int64_t c = 0; c < C; c++) sums[n * C + c] = (float)total[c];
        free(block);
        free(total);
    }
}

void se_scale_input_grad(const float *grad, const float *a, const float *d, float *grad_input, int64_t N, int64_t HW,
                         int64_t C, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < N * HW; row++) {
        const float *g = grad + row * C, *an = a + (row / HW) * C, *dn = d + (row / HW) * C;
        float *o = grad_input + row * C;
#pragma omp simd
        for (int64_t c = 0; c < C; c++) o[c] = g[c] * an[c] + dn[c];
    }
}
