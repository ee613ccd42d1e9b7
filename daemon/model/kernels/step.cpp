// One decode step in one call: the token's embedding, every layer (norms, projections, rotary, the KV
// write, attention, SiLU MLP, residuals) and the lm_head, inside one OpenMP region whose phases meet at
// spin barriers. The per-op path pays a Python dispatch per tensor op and a thread wake-up per GEMV
// (about 5 ms of a 30 ms step on a 2-core box); here the threads only stream weights.
// Compiled as one unit with gemv.cpp (its row kernels are reused). Kinds of weight: bf16/f32 rows,
// int8/int4 rows (gemv.cpp's), and with AVX512-VNNI int8/int4 "interleaved": 16 rows side by side so
// one vpdpbusd gives 16 rows' sums against an int8 copy of x (one scale per 32 of x, as llama.cpp's
// Q8 activations): no horizontal sums, no per-weight float conversion.
#include "gemv.cpp"

#include <atomic>
#include <cmath>
#include <sched.h>

enum Kind : int32_t { K_BF16 = 0, K_F32 = 1, K_I8 = 2, K_I4 = 3, K_I4V = 5, K_I8G = 6 };
static inline bool interleaved(int32_t kind) { return kind == K_I4V || kind == K_I8G; }

extern "C" {
struct Lin {               // y[n] = sum_k W[n, k] * x[k] + bias[n]
    int32_t kind, pad;
    int64_t n, k;
    const void* w;         // bf16/f32/int8 rows; int4 nibbles; I8G: [n/16][k/4][16][4] u8 (w + 128);
                           // I4V: [n/16][k/32][4][16][4] nibbles (low: k 8t..8t+3, high: 8t+4..8t+7)
    const void* s;         // int8: fp32 row scales; int4 and I8G: bf16 group scales ([n][k/32]; I4V, I8G [n/16][k/32][16])
    const void* z;         // int4: bf16 group minimums (same layout as s)
    const float* bias;     // or null
    int64_t n_out;         // outlier columns kept apart in fp32 (zero in w): y[n] += out_w[c][n] * x[out_idx[c]]
    const int32_t* out_idx;
    const float* out_w;    // [n_out][n]
};
struct Layer { const float* ln1; const float* ln2; Lin qkv, o, gate_up, down; };
struct Model {
    int32_t layers, hidden, heads, kv_heads, head_dim, inter, kv_f32, pad;
    float eps, scale;
    const float* inv_freq;  // [head_dim / 2]
    const float* norm;      // final norm, fp32
    const Layer* layer;
    Lin head;               // lm_head (its rows are the embedding rows when `embed` is null: tied)
    const void* embed;      // bf16/f32 rows of the embedding, or null
    int32_t embed_f32, pad2;
};
}

// ---- a barrier that spins (waiting threads are about to get work: a futex sleep costs more) ----
struct SpinBarrier {
    std::atomic<int> count{0}, gen{0};
    int threads;
    explicit SpinBarrier(int t) : threads(t) {}
    void wait() {
        if (threads == 1) return;
        int g = gen.load(std::memory_order_acquire);
        if (count.fetch_add(1, std::memory_order_acq_rel) == threads - 1) {
            count.store(0, std::memory_order_relaxed);
            gen.store(g + 1, std::memory_order_release);
            return;
        }
        for (int spins = 0; gen.load(std::memory_order_acquire) == g; spins++) {
#ifdef X86
            _mm_pause();
#endif
            if (spins > 20000) sched_yield();  // the other thread lost its core: do not burn ours
        }
    }
};

// ---- x prepared for a kind: rounded to bf16, or quantized to int8 per 32. Each thread prepares its
// own copy (a few microseconds): cheaper than a barrier more per projection ----
struct Prepared {
    std::vector<float> f;         // x (fp32), outlier columns zeroed
    std::vector<uint16_t> b;      // bf16 of x (AVX512-BF16 kernel)
    std::vector<int8_t> q;        // int8 x
    std::vector<float> dx, xs;    // per 32: int8 scale, exact sum of x
    std::vector<int32_t> qs;      // per 32: sum of the int8 x (for I8G's +128)
    std::vector<float> xo;        // x at the outlier columns (taken out of f)
};

// int8 copy of x per 32 (scale amax/127), its sums, and x's exact sums
static void quantize_x(const float* f, int64_t K, Prepared& p) {
    const int64_t G = K / 32;
    for (int64_t g = 0; g < G; g++) {
        const float* xg = f + g * 32;
        float s = 0, amax = 0;
        for (int j = 0; j < 32; j++) { s += xg[j]; amax = std::fmax(amax, std::fabs(xg[j])); }
        const float inv = amax > 0 ? 127.f / amax : 0.f;
        int sum = 0;
        for (int j = 0; j < 32; j++) { int v = (int)std::nearbyint(xg[j] * inv); p.q[g * 32 + j] = (int8_t)v; sum += v; }
        p.xs[g] = s; p.dx[g] = amax / 127.f; p.qs[g] = sum;
    }
}
#ifdef X86
__attribute__((target("avx512f,avx512bw"))) static void quantize_x512(const float* f, int64_t K, Prepared& p) {
    const int64_t G = K / 32;
    for (int64_t g = 0; g < G; g++) {
        __m512 a = _mm512_loadu_ps(f + g * 32), b = _mm512_loadu_ps(f + g * 32 + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        const __m512 inv = _mm512_set1_ps(amax > 0 ? 127.f / amax : 0.f);
        __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
        _mm_storeu_si128((__m128i*)(p.q.data() + g * 32), _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128((__m128i*)(p.q.data() + g * 32 + 16), _mm512_cvtsepi32_epi8(qb));
        p.xs[g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b)); p.dx[g] = amax / 127.f;
        p.qs[g] = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    }
}
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void to_bf16_512(const float* f, uint16_t* b, int64_t K) {
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) _mm256_storeu_si256((__m256i*)(b + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(f + k)));
    for (; k < K; k++) b[k] = f2bf16(f[k]);
}
#endif

static void prepare(const Lin& L, const float* x, Prepared& p, int isa) {
    const int64_t K = L.k;
    p.f.resize(K);
    std::memcpy(p.f.data(), x, K * sizeof(float));
    p.xo.resize(L.n_out);
    for (int64_t c = 0; c < L.n_out; c++) { p.xo[c] = p.f[L.out_idx[c]]; p.f[L.out_idx[c]] = 0; }
    if (L.kind == K_BF16 && isa >= 3) {
        p.b.resize(K);
#ifdef X86
        to_bf16_512(p.f.data(), p.b.data(), K);
#endif
    }
    if (L.kind == K_I4 || interleaved(L.kind)) {
        p.xs.resize(K / 32); p.dx.resize(K / 32); p.qs.resize(K / 32); p.q.resize(K);
#ifdef X86
        if (isa >= 2) { quantize_x512(p.f.data(), K, p); return; }
#endif
        quantize_x(p.f.data(), K, p);
    }
}

#ifdef X86
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
VNNI static inline __m512 bf16x16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
VNNI static inline __m512i bcast4(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm512_set1_epi32(v); }

// blocks [b0, b1) of 16 rows, y[n] for n < N. int8 with a bf16 scale per 32 of each row (as llama.cpp's
// Q8_0), stored +128: the +128 comes back per group from x's int8 sums
VNNI static void i8g_vnni(const Lin& L, const Prepared& p, float* y, int64_t b0, int64_t b1) {
    const int64_t K = L.k, G = K / 32;
    const uint8_t* W = (const uint8_t*)L.w; const uint16_t* S = (const uint16_t*)L.s;
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t* w = W + b * 16 * K;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; g++, w += 512) {
            const int8_t* xq = p.q.data() + g * 32;
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            for (int t = 0; t < 8; t += 2) {
                s0 = _mm512_dpbusd_epi32(s0, _mm512_loadu_si512(w + t * 64), bcast4(xq + t * 4));
                s1 = _mm512_dpbusd_epi32(s1, _mm512_loadu_si512(w + t * 64 + 64), bcast4(xq + t * 4 + 4));
            }
            const __m512i d = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(128 * p.qs[g]));
            const __m512 scale = _mm512_mul_ps(bf16x16(S + (b * G + g) * 16), _mm512_set1_ps(p.dx[g]));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc);
        }
        const int64_t n = b * 16, left = L.n - n;
        const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        if (L.bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, L.bias + n));
        _mm512_mask_storeu_ps(y + n, m, acc);
    }
}

VNNI static void i4v_vnni(const Lin& L, const Prepared& p, float* y, int64_t b0, int64_t b1) {
    const int64_t K = L.k, G = K / 32;
    const uint8_t* W = (const uint8_t*)L.w;
    const uint16_t* S = (const uint16_t*)L.s; const uint16_t* Z = (const uint16_t*)L.z;
    const __m512i low = _mm512_set1_epi8(15);
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t* w = W + b * 8 * K;
        __m512 acc = _mm512_setzero_ps(), accz = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; g++, w += 256) {
            const int8_t* xq = p.q.data() + g * 32;
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            for (int t = 0; t < 4; t++) {
                __m512i v = _mm512_loadu_si512(w + t * 64);
                s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v, low), bcast4(xq + t * 8));
                s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(v, 4), low), bcast4(xq + t * 8 + 4));
            }
            const int64_t at = (b * G + g) * 16;
            __m512 scale = _mm512_mul_ps(bf16x16(S + at), _mm512_set1_ps(p.dx[g]));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), scale, acc);
            accz = _mm512_fmadd_ps(bf16x16(Z + at), _mm512_set1_ps(p.xs[g]), accz);
        }
        const int64_t n = b * 16, left = L.n - n;
        const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __m512 out = _mm512_add_ps(acc, accz);
        if (L.bias) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(m, L.bias + n));
        _mm512_mask_storeu_ps(y + n, m, out);
    }
}
#endif

static void rows_of(const Lin& L, int64_t& n0, int64_t& n1, int t, int T);
static void run_kernel(const Lin& L, const Prepared& p, float* y, int t, int T, int isa);

// this thread's share of L's rows: blocks of 16 for the interleaved kinds, even row spans otherwise
static void run_rows(const Lin& L, const Prepared& p, float* y, int t, int T, int isa) {
    run_kernel(L, p, y, t, T, isa);
    if (L.n_out) {
        int64_t n0, n1; rows_of(L, n0, n1, t, T);
        for (int64_t c = 0; c < L.n_out; c++) {
            const float* w = L.out_w + c * L.n; const float xc = p.xo[c];
            for (int64_t n = n0; n < n1; n++) y[n] += w[n] * xc;
        }
    }
}

static void run_kernel(const Lin& L, const Prepared& p, float* y, int t, int T, int isa) {
    const int64_t N = L.n, K = L.k;
    if (interleaved(L.kind)) {
        const int64_t blocks = (N + 15) / 16, per = (blocks + T - 1) / T;
        const int64_t b0 = per * t < blocks ? per * t : blocks, b1 = b0 + per < blocks ? b0 + per : blocks;
#ifdef X86
        if (L.kind == K_I8G) i8g_vnni(L, p, y, b0, b1);
        else i4v_vnni(L, p, y, b0, b1);
#elif defined(__aarch64__)
        if (L.kind == K_I8G) i8g_arm(L, p, y, N, b0, b1, isa);
        else i4v_arm(L, p, y, N, b0, b1, isa);
#endif
        return;
    }
    int64_t n0, n1; span(N, n0, n1, t, T);
    const float* x = p.f.data();
    switch (L.kind) {
    case K_BF16:
#ifdef X86
        if (isa >= 3) bf16_dp((const uint16_t*)L.w, p.b.data(), y, n0, n1, K, 1, N);
        else if (isa == 2) bf16_avx512((const uint16_t*)L.w, x, y, n0, n1, K, 1, N);
        else if (isa == 1) bf16_avx2((const uint16_t*)L.w, x, y, n0, n1, K, 1, N); else
#elif defined(__aarch64__)
        if (isa >= 1) bf16_neon((const uint16_t*)L.w, x, y, n0, n1, K, 1, N); else
#endif
        bf16_generic((const uint16_t*)L.w, x, y, n0, n1, K, 1, N);
        break;
    case K_F32:
#ifdef X86
        if (isa >= 2) f32_avx512((const float*)L.w, x, y, n0, n1, K, 1, N);
        else if (isa == 1) f32_avx2((const float*)L.w, x, y, n0, n1, K, 1, N); else
#elif defined(__aarch64__)
        if (isa >= 1) f32_neon((const float*)L.w, x, y, n0, n1, K, 1, N); else
#endif
        f32_generic((const float*)L.w, x, y, n0, n1, K, 1, N);
        break;
    case K_I8:
#ifdef X86
        if (isa >= 2) i8_avx512((const int8_t*)L.w, (const float*)L.s, x, y, n0, n1, K, 1, N);
        else if (isa == 1) i8_avx2((const int8_t*)L.w, (const float*)L.s, x, y, n0, n1, K, 1, N); else
#elif defined(__aarch64__)
        if (isa >= 1) i8_neon((const int8_t*)L.w, (const float*)L.s, x, y, n0, n1, K, 1, N); else
#endif
        i8_generic((const int8_t*)L.w, (const float*)L.s, x, y, n0, n1, K, 1, N);
        break;
    case K_I4: {
        const uint8_t* Q = (const uint8_t*)L.w; const uint16_t* S = (const uint16_t*)L.s; const uint16_t* Z = (const uint16_t*)L.z;
#ifdef X86
        if (isa >= 2) i4_avx512(Q, S, Z, x, p.xs.data(), y, n0, n1, K, 1, N);
        else if (isa == 1) i4_avx2(Q, S, Z, x, p.xs.data(), y, n0, n1, K, 1, N); else
#elif defined(__aarch64__)
        if (isa >= 1) i4_neon(Q, S, Z, x, p.xs.data(), y, n0, n1, K, 1, N); else
#endif
        i4_generic(Q, S, Z, x, p.xs.data(), y, n0, n1, K, 1, N);
        break;
    }
    }
    add_bias(y, L.bias, n0, n1, 1, N);
}

static void rms_norm(const float* x, const float* w, float* out, int64_t n, float eps) {
    float ss = 0;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.f / std::sqrt(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

template <typename T> static inline float ld(const T* p, int64_t i);
template <> inline float ld<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float ld<uint16_t>(const uint16_t* p, int64_t i) { return bf16f(p[i]); }
static inline void st(float* p, int64_t i, float v) { p[i] = v; }
static inline void st(uint16_t* p, int64_t i, float v) { p[i] = f2bf16(v); }

// one query head against keys/values 0..n-1 of its kv head: out = softmax(q k^T * scale) v
template <typename T>
static void attend(const float* q, const T* k, const T* v, int64_t n, int64_t d, float scale, float* s, float* out) {
    float mx = -INFINITY;
    for (int64_t t = 0; t < n; t++) {
        const T* kt = k + t * d; float a = 0;
        for (int64_t i = 0; i < d; i++) a += q[i] * ld(kt, i);
        s[t] = a * scale; mx = std::fmax(mx, s[t]);
    }
    float sum = 0;
    for (int64_t t = 0; t < n; t++) { s[t] = std::exp(s[t] - mx); sum += s[t]; }
    for (int64_t i = 0; i < d; i++) out[i] = 0;
    for (int64_t t = 0; t < n; t++) {
        const T* vt = v + t * d; const float p = s[t] / sum;
        for (int64_t i = 0; i < d; i++) out[i] += p * ld(vt, i);
    }
}
#ifdef X86
#define AVX512 __attribute__((target("avx512f,avx512bw")))
AVX512 static inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
AVX512 static inline __m512 ld16(const uint16_t* p) { return bf16x16(p); }
AVX512 static inline __m512 exp16(__m512 x) {  // e^x, relative error ~2e-7, x <= 0 here
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f)); y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f)); y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(y, n);
}
template <typename T>
AVX512 static void attend512(const float* q, const T* k, const T* v, int64_t n, int64_t d, float scale, float* s, float* out) {
    float mx = -INFINITY;
    for (int64_t t = 0; t < n; t++) {
        const T* kt = k + t * d; __m512 a = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), ld16(kt + i), a);
        s[t] = _mm512_reduce_add_ps(a) * scale; mx = std::fmax(mx, s[t]);
    }
    __m512 tot = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) { __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), _mm512_set1_ps(mx))); _mm512_storeu_ps(s + t, e); tot = _mm512_add_ps(tot, e); }
    float sum = _mm512_reduce_add_ps(tot);
    for (; t < n; t++) { s[t] = std::exp(s[t] - mx); sum += s[t]; }
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < d; i += 16) {
        __m512 o = _mm512_setzero_ps();
        for (int64_t u = 0; u < n; u++) o = _mm512_fmadd_ps(_mm512_set1_ps(s[u]), ld16(v + u * d + i), o);
        _mm512_storeu_ps(out + i, _mm512_mul_ps(o, _mm512_set1_ps(inv)));
    }
}
#endif

#ifdef X86
AVX512 static int64_t swiglu512(const float* gu, float* out, int64_t I) {
    int64_t i = 0;
    for (; i + 16 <= I; i += 16) {
        __m512 g = _mm512_loadu_ps(gu + i);
        __m512 sg = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(sg, _mm512_loadu_ps(gu + I + i)));
    }
    return i;
}
#endif

// rotate-half rotary embedding of one head, in place
static void rope(float* h, const float* cs, const float* sn, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = h[i], b = h[i + half];
        h[i] = a * cs[i] - b * sn[i]; h[i + half] = b * cs[i] + a * sn[i];
    }
}

// the rows of L this thread computed (what run_rows gave it)
static void rows_of(const Lin& L, int64_t& n0, int64_t& n1, int t, int T) {
    if (interleaved(L.kind)) {
        const int64_t blocks = (L.n + 15) / 16, per = (blocks + T - 1) / T;
        n0 = per * t * 16 < L.n ? per * t * 16 : L.n; n1 = n0 + per * 16 < L.n ? n0 + per * 16 : L.n;
    } else {
        span(L.n, n0, n1, t, T);
    }
}

// SiLU(gate) * up
static void swiglu(const float* gu, float* out, int64_t I, int isa) {
    int64_t i = 0;
#ifdef X86
    if (isa >= 2) i = swiglu512(gu, out, I);
#endif
    for (; i < I; i++) { const float g = gu[i]; out[i] = g / (1.f + std::exp(-g)) * gu[I + i]; }
}

template <typename KV>
static void step(const Model& M, int64_t token, int64_t pos, void* const* kc, void* const* vc, int64_t cap,
                 float* logits, int isa, int threads) {
    const int64_t H = M.hidden, h = M.heads, kvh = M.kv_heads, d = M.head_dim, I = M.inter, n = pos + 1;
    const int64_t qdim = (h + 2 * kvh) * d;
    std::vector<float> x(H), qkv(qdim), attn(h * d), gu(2 * I), cs(d / 2), sn(d / 2);
    for (int64_t i = 0; i < d / 2; i++) { cs[i] = std::cos((float)pos * M.inv_freq[i]); sn[i] = std::sin((float)pos * M.inv_freq[i]); }
    if (M.embed) {
        for (int64_t i = 0; i < H; i++) x[i] = M.embed_f32 ? ((const float*)M.embed)[token * H + i] : bf16f(((const uint16_t*)M.embed)[token * H + i]);
    } else {  // tied: the lm_head's row (bf16/fp32, int8 rows, or interleaved [n/16][k/4][16][4] + 128)
        const Lin& E = M.head;
        for (int64_t i = 0; i < H; i++) {
            switch (E.kind) {
            case K_BF16: x[i] = bf16f(((const uint16_t*)E.w)[token * H + i]); break;
            case K_F32: x[i] = ((const float*)E.w)[token * H + i]; break;
            case K_I8: x[i] = (float)((const int8_t*)E.w)[token * H + i] * ((const float*)E.s)[token]; break;
            default: {
                const float q = (float)((const uint8_t*)E.w)[((token / 16) * (H / 4) + i / 4) * 64 + (token % 16) * 4 + i % 4] - 128.f;
                x[i] = q * bf16f(((const uint16_t*)E.s)[((token / 16) * (H / 32) + i / 32) * 16 + token % 16]);
            }
            }
        }
    }
    SpinBarrier bar(threads);
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num_(), T = omp_get_num_threads_();
        if (t == 0) bar.threads = T;  // what OpenMP gave, which may be fewer than asked
#pragma omp barrier
        Prepared p;
        std::vector<float> y(I > H ? I : H), s(n), out(H);
        for (int32_t l = 0; l < M.layers; l++) {
            const Layer& L = M.layer[l];
            rms_norm(x.data(), L.ln1, y.data(), H, M.eps);
            prepare(L.qkv, y.data(), p, isa);
            run_rows(L.qkv, p, qkv.data(), t, T, isa);
            bar.wait();
            KV* K = (KV*)kc[l]; KV* V = (KV*)vc[l];
            for (int64_t j = t; j < h + kvh; j += T) {  // rotary on q and k heads; k and v into the cache
                rope(qkv.data() + j * d, cs.data(), sn.data(), d);
                if (j >= h) {
                    const int64_t kv = j - h; KV* kd = K + (kv * cap + pos) * d; KV* vd = V + (kv * cap + pos) * d;
                    for (int64_t i = 0; i < d; i++) { st(kd, i, qkv[j * d + i]); st(vd, i, qkv[(h + kvh + kv) * d + i]); }
                }
            }
            bar.wait();
            for (int64_t j = t; j < h; j += T) {
                const int64_t kv = j / (h / kvh);
#ifdef X86
                if (isa >= 2 && d % 16 == 0) attend512<KV>(qkv.data() + j * d, K + kv * cap * d, V + kv * cap * d, n, d, M.scale, s.data(), attn.data() + j * d); else
#endif
                attend<KV>(qkv.data() + j * d, K + kv * cap * d, V + kv * cap * d, n, d, M.scale, s.data(), attn.data() + j * d);
            }
            bar.wait();
            prepare(L.o, attn.data(), p, isa);
            run_rows(L.o, p, out.data(), t, T, isa);
            { int64_t n0, n1; rows_of(L.o, n0, n1, t, T); for (int64_t i = n0; i < n1; i++) x[i] += out[i]; }
            bar.wait();
            rms_norm(x.data(), L.ln2, y.data(), H, M.eps);
            prepare(L.gate_up, y.data(), p, isa);
            run_rows(L.gate_up, p, gu.data(), t, T, isa);
            bar.wait();
            swiglu(gu.data(), y.data(), I, isa);
            prepare(L.down, y.data(), p, isa);
            run_rows(L.down, p, out.data(), t, T, isa);
            { int64_t n0, n1; rows_of(L.down, n0, n1, t, T); for (int64_t i = n0; i < n1; i++) x[i] += out[i]; }
            bar.wait();
        }
        rms_norm(x.data(), M.norm, y.data(), H, M.eps);
        prepare(M.head, y.data(), p, isa);
        run_rows(M.head, p, logits, t, T, isa);
    }
}

extern "C" {
int edgechat_has_vnni() {
#ifdef X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
           && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

// y[m, :] = L(x[m, :]) for m < M (a few rows: short prompts; one row: tests)
void edgechat_gemv_lin(const Lin* L, const float* x, float* y, int64_t M, int isa, int threads) {
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num_(), T = omp_get_num_threads_();
        Prepared p;
        for (int64_t m = 0; m < M; m++) {
            prepare(*L, x + m * L->k, p, isa);
            run_rows(*L, p, y + m * L->n, t, T, isa);
        }
    }
}

// the float weight [n][k] (bf16, or fp32 if f32) a quantized L stands for, outlier columns included:
// prefill multiplies by it with oneDNN's GEMM (one pass here, where torch's ops took five)
void edgechat_dequantize(const Lin* L, void* out, int f32, int threads) {
    const int64_t N = L->n, K = L->k, G = K / 32;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        std::vector<float> row(K);
        const int64_t b = n / 16, j = n % 16;
        switch (L->kind) {
        case K_I8: for (int64_t k = 0; k < K; k++) row[k] = (float)((const int8_t*)L->w)[n * K + k] * ((const float*)L->s)[n]; break;
        case K_I8G: for (int64_t k = 0; k < K; k++)
                row[k] = ((float)((const uint8_t*)L->w)[((b * (K / 4) + k / 4) * 16 + j) * 4 + k % 4] - 128.f)
                         * bf16f(((const uint16_t*)L->s)[(b * G + k / 32) * 16 + j]);
            break;
        case K_I4: for (int64_t g = 0; g < G; g++) {
                const uint8_t* q = (const uint8_t*)L->w + n * (K / 2) + g * 16;
                const float sc = bf16f(((const uint16_t*)L->s)[n * G + g]), mn = bf16f(((const uint16_t*)L->z)[n * G + g]);
                for (int i = 0; i < 16; i++) { row[g * 32 + i] = (q[i] & 15) * sc + mn; row[g * 32 + 16 + i] = (q[i] >> 4) * sc + mn; }
            }
            break;
        case K_I4V: for (int64_t g = 0; g < G; g++) {
                const uint8_t* q = (const uint8_t*)L->w + (b * G + g) * 256 + j * 4;
                const float sc = bf16f(((const uint16_t*)L->s)[(b * G + g) * 16 + j]), mn = bf16f(((const uint16_t*)L->z)[(b * G + g) * 16 + j]);
                for (int t = 0; t < 4; t++)
                    for (int i = 0; i < 4; i++) {
                        const uint8_t v = q[t * 64 + i];
                        row[g * 32 + 8 * t + i] = (v & 15) * sc + mn; row[g * 32 + 8 * t + 4 + i] = (v >> 4) * sc + mn;
                    }
            }
            break;
        default: break;
        }
        for (int64_t c = 0; c < L->n_out; c++) row[L->out_idx[c]] = L->out_w[c * N + n];
        if (f32) std::memcpy((float*)out + n * K, row.data(), K * sizeof(float));
        else for (int64_t k = 0; k < K; k++) ((uint16_t*)out)[n * K + k] = f2bf16(row[k]);
    }
}

// token at position pos (0-based); kc/vc: per layer [kv_heads, cap, head_dim] (bf16, or fp32 if kv_f32);
// logits: [vocab] fp32
void edgechat_decode_step(const Model* m, int64_t token, int64_t pos, void* const* kc, void* const* vc, int64_t cap,
                          float* logits, int isa, int threads) {
    if (m->kv_f32) step<float>(*m, token, pos, kc, vc, cap, logits, isa, threads);
    else step<uint16_t>(*m, token, pos, kc, vc, cap, logits, isa, threads);
}
}
