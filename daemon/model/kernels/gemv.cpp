// Decode GEMVs that read each weight once: y[m, n] = sum_k x[m, k] * W[n, k], over a span of rows
// (step.cpp splits the rows over threads and dispatches by ISA).
// Weights: bf16 or fp32 rows, int8 rows with one scale per row, or int4 groups of 32 with a bf16 scale
// and minimum per group (w = scale * q + min, q in 0..15). Weights are converted to fp32 in registers.
// x and y are fp32; m (rows of x) is small (decode: 1). Built without -march: one function per ISA,
// picked at run time by `isa` (0 generic, 1 AVX2+FMA, 2 AVX512F/BW, 3 AVX512-BF16; on aarch64, arm.cpp:
// 1 NEON, 2 NEON with the dot-product instructions).
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#define X86 1
#endif

static inline float bf16f(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; std::memcpy(&f, &u, 4); return f; }

// ---- generic (any CPU; the compiler may vectorize) ----
static void bf16_generic(const uint16_t* W, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++) {
            float s = 0; const uint16_t* w = W + n * K; const float* xm = x + m * K;
            for (int64_t k = 0; k < K; k++) s += bf16f(w[k]) * xm[k];
            y[m * N + n] = s;
        }
}
static void f32_generic(const float* W, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++) {
            float s = 0; const float* w = W + n * K; const float* xm = x + m * K;
            for (int64_t k = 0; k < K; k++) s += w[k] * xm[k];
            y[m * N + n] = s;
        }
}
static void i8_generic(const int8_t* W, const float* sc, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++) {
            float s = 0; const int8_t* w = W + n * K; const float* xm = x + m * K;
            for (int64_t k = 0; k < K; k++) s += (float)w[k] * xm[k];
            y[m * N + n] = s * sc[n];
        }
}
// xs[m, g]: sum of x over group g (for the minimum term)
static void i4_generic(const uint8_t* Q, const uint16_t* S, const uint16_t* Z, const float* x, const float* xs, float* y,
                       int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    const int64_t G = K / 32;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++) {
            float s = 0; const float* xm = x + m * K;
            for (int64_t g = 0; g < G; g++) {
                const uint8_t* q = Q + n * (K / 2) + g * 16; float t = 0;
                for (int j = 0; j < 16; j++) t += (float)(q[j] & 15) * xm[g * 32 + j] + (float)(q[j] >> 4) * xm[g * 32 + 16 + j];
                s += t * bf16f(S[n * G + g]) + bf16f(Z[n * G + g]) * xs[m * G + g];
            }
            y[m * N + n] = s;
        }
}

#ifdef X86
// ---- AVX2 + FMA: 8 lanes ----
__attribute__((target("avx2,fma"))) static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s)); s = _mm_add_ss(s, _mm_movehdup_ps(s)); return _mm_cvtss_f32(s);
}
__attribute__((target("avx2,fma"))) static inline __m256 ld_bf16_8(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
__attribute__((target("avx2,fma"))) static void bf16_avx2(const uint16_t* W, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    const int64_t Kv = K & ~15;
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t* w = W + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float* xm = x + m * K; __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            for (int64_t k = 0; k < Kv; k += 16) {
                a0 = _mm256_fmadd_ps(ld_bf16_8(w + k), _mm256_loadu_ps(xm + k), a0);
                a1 = _mm256_fmadd_ps(ld_bf16_8(w + k + 8), _mm256_loadu_ps(xm + k + 8), a1);
            }
            float s = hsum8(_mm256_add_ps(a0, a1));
            for (int64_t k = Kv; k < K; k++) s += bf16f(w[k]) * xm[k];
            y[m * N + n] = s;
        }
    }
}
__attribute__((target("avx2,fma"))) static void f32_avx2(const float* W, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    const int64_t Kv = K & ~15;
    for (int64_t n = n0; n < n1; n++) {
        const float* w = W + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float* xm = x + m * K; __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            for (int64_t k = 0; k < Kv; k += 16) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(xm + k), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(xm + k + 8), a1);
            }
            float s = hsum8(_mm256_add_ps(a0, a1));
            for (int64_t k = Kv; k < K; k++) s += w[k] * xm[k];
            y[m * N + n] = s;
        }
    }
}
__attribute__((target("avx2,fma"))) static void i8_avx2(const int8_t* W, const float* sc, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    const int64_t Kv = K & ~15;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t* w = W + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float* xm = x + m * K; __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            for (int64_t k = 0; k < Kv; k += 16) {
                __m128i b = _mm_loadu_si128((const __m128i*)(w + k));
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_loadu_ps(xm + k), a0);
                a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), _mm256_loadu_ps(xm + k + 8), a1);
            }
            float s = hsum8(_mm256_add_ps(a0, a1));
            for (int64_t k = Kv; k < K; k++) s += (float)w[k] * xm[k];
            y[m * N + n] = s * sc[n];
        }
    }
}
__attribute__((target("avx2,fma"))) static void i4_avx2(const uint8_t* Q, const uint16_t* S, const uint16_t* Z, const float* x, const float* xs, float* y,
                                                        int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    const int64_t G = K / 32; const __m128i low = _mm_set1_epi8(15);
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++) {
            const float* xm = x + m * K; __m256 acc = _mm256_setzero_ps(); float zs = 0;
            for (int64_t g = 0; g < G; g++) {
                __m128i b = _mm_loadu_si128((const __m128i*)(Q + n * (K / 2) + g * 16));
                __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
                const float* xg = xm + g * 32;
                __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(xg));
                t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), _mm256_loadu_ps(xg + 8), t);
                t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(xg + 16), t);
                t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), _mm256_loadu_ps(xg + 24), t);
                acc = _mm256_fmadd_ps(t, _mm256_set1_ps(bf16f(S[n * G + g])), acc);
                zs += bf16f(Z[n * G + g]) * xs[m * G + g];
            }
            y[m * N + n] = hsum8(acc) + zs;
        }
}

// ---- AVX512F/BW: 16 lanes, two rows at a time ----
__attribute__((target("avx512f,avx512bw"))) static inline __m512 ld_bf16_16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
__attribute__((target("avx512f,avx512bw"))) static void bf16_avx512(const uint16_t* W, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    const int64_t Kv = K & ~31;
    int64_t n = n0;
    for (; n + 1 < n1; n += 2) {
        const uint16_t* w0 = W + n * K; const uint16_t* w1 = w0 + K;
        for (int64_t m = 0; m < M; m++) {
            const float* xm = x + m * K;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
            for (int64_t k = 0; k < Kv; k += 32) {
                __m512 x0 = _mm512_loadu_ps(xm + k), x1 = _mm512_loadu_ps(xm + k + 16);
                a0 = _mm512_fmadd_ps(ld_bf16_16(w0 + k), x0, a0); a1 = _mm512_fmadd_ps(ld_bf16_16(w0 + k + 16), x1, a1);
                b0 = _mm512_fmadd_ps(ld_bf16_16(w1 + k), x0, b0); b1 = _mm512_fmadd_ps(ld_bf16_16(w1 + k + 16), x1, b1);
            }
            float s0 = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)), s1 = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
            for (int64_t k = Kv; k < K; k++) { s0 += bf16f(w0[k]) * xm[k]; s1 += bf16f(w1[k]) * xm[k]; }
            y[m * N + n] = s0; y[m * N + n + 1] = s1;
        }
    }
    if (n < n1) bf16_avx2(W, x, y, n, n1, K, M, N);
}
__attribute__((target("avx512f,avx512bw"))) static void f32_avx512(const float* W, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    const int64_t Kv = K & ~31;
    for (int64_t n = n0; n < n1; n++) {
        const float* w = W + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float* xm = x + m * K; __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            for (int64_t k = 0; k < Kv; k += 32) {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(xm + k), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(xm + k + 16), a1);
            }
            float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
            for (int64_t k = Kv; k < K; k++) s += w[k] * xm[k];
            y[m * N + n] = s;
        }
    }
}
__attribute__((target("avx512f,avx512bw"))) static void i8_avx512(const int8_t* W, const float* sc, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    const int64_t Kv = K & ~31;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t* w = W + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float* xm = x + m * K; __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            for (int64_t k = 0; k < Kv; k += 32) {
                a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k)))), _mm512_loadu_ps(xm + k), a0);
                a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k + 16)))), _mm512_loadu_ps(xm + k + 16), a1);
            }
            float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
            for (int64_t k = Kv; k < K; k++) s += (float)w[k] * xm[k];
            y[m * N + n] = s * sc[n];
        }
    }
}
__attribute__((target("avx512f,avx512bw"))) static void i4_avx512(const uint8_t* Q, const uint16_t* S, const uint16_t* Z, const float* x, const float* xs, float* y,
                                                                  int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    const int64_t G = K / 32; const __m128i low = _mm_set1_epi8(15);
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++) {
            const float* xm = x + m * K; __m512 acc = _mm512_setzero_ps(); float zs = 0;
            for (int64_t g = 0; g < G; g++) {
                __m128i b = _mm_loadu_si128((const __m128i*)(Q + n * (K / 2) + g * 16));
                __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
                __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), _mm512_loadu_ps(xm + g * 32));
                t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), _mm512_loadu_ps(xm + g * 32 + 16), t);
                acc = _mm512_fmadd_ps(t, _mm512_set1_ps(bf16f(S[n * G + g])), acc);
                zs += bf16f(Z[n * G + g]) * xs[m * G + g];
            }
            y[m * N + n] = _mm512_reduce_add_ps(acc) + zs;
        }
}
// ---- AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs into 16 fp32 sums (x rounded to bf16 first:
// exact when the model runs in bf16, as x then came from bf16) ----
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void bf16_dp(const uint16_t* W, const uint16_t* xb, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    const int64_t Kv = K & ~63;
    int64_t n = n0;
    for (; n + 1 < n1; n += 2) {
        const uint16_t* w0 = W + n * K; const uint16_t* w1 = w0 + K;
        for (int64_t m = 0; m < M; m++) {
            const uint16_t* xm = xb + m * K;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
            for (int64_t k = 0; k < Kv; k += 64) {
                __m512bh x0 = (__m512bh)_mm512_loadu_si512(xm + k), x1 = (__m512bh)_mm512_loadu_si512(xm + k + 32);
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + k), x0);
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w0 + k + 32), x1);
                b0 = _mm512_dpbf16_ps(b0, (__m512bh)_mm512_loadu_si512(w1 + k), x0);
                b1 = _mm512_dpbf16_ps(b1, (__m512bh)_mm512_loadu_si512(w1 + k + 32), x1);
            }
            float s0 = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)), s1 = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
            for (int64_t k = Kv; k < K; k++) { s0 += bf16f(w0[k]) * bf16f(xm[k]); s1 += bf16f(w1[k]) * bf16f(xm[k]); }
            y[m * N + n] = s0; y[m * N + n + 1] = s1;
        }
    }
    for (; n < n1; n++)
        for (int64_t m = 0; m < M; m++) {
            float s = 0; for (int64_t k = 0; k < K; k++) s += bf16f(W[n * K + k]) * bf16f(xb[m * K + k]);
            y[m * N + n] = s;
        }
}
#endif

#if defined(__aarch64__)
#include "arm.cpp"
#endif

static inline uint16_t f2bf16(float f) {  // round to nearest even (x is finite)
    uint32_t u; std::memcpy(&u, &f, 4); return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// rows [n0, n1) of this thread: split N into nearly equal, even-sized parts
static inline void span(int64_t N, int64_t& n0, int64_t& n1, int t, int T) {
    int64_t per = ((N + T - 1) / T + 1) & ~(int64_t)1;
    n0 = per * t < N ? per * t : N; n1 = n0 + per < N ? n0 + per : N;
}

#ifdef _OPENMP
#include <omp.h>
static inline int omp_get_thread_num_() { return omp_get_thread_num(); }
static inline int omp_get_num_threads_() { return omp_get_num_threads(); }
#else
static inline int omp_get_thread_num_() { return 0; }
static inline int omp_get_num_threads_() { return 1; }
#endif

static inline void add_bias(float* y, const float* bias, int64_t n0, int64_t n1, int64_t M, int64_t N) {
    if (bias) for (int64_t m = 0; m < M; m++) for (int64_t n = n0; n < n1; n++) y[m * N + n] += bias[n];
}

#ifndef EDGECHAT_SOURCE_HASH
#define EDGECHAT_SOURCE_HASH "unknown"
#endif

extern "C" {
// the hash of the sources this library was built from (kernels/build.py passes it)
const char* edgechat_source_hash() { return EDGECHAT_SOURCE_HASH; }

// 3: AVX512-BF16 too, 2: AVX512F+BW, 1: AVX2+FMA, 0: none of them; aarch64: 2 NEON+SDOT, 1 NEON
int edgechat_best_isa() {
#ifdef X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16")) return 3;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#elif defined(__aarch64__)
    return arm_best_isa();
#endif
    return 0;
}
}
