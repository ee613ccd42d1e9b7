// A batch step in one call: R rows (decode tokens of different sequences, a chunk of one sequence's prompt,
// or both) through every layer (norms, projections, rotary, the KV write, attention, SiLU MLP, residuals)
// and the lm_head, inside one OpenMP region whose phases meet at spin barriers. Each weight is read once
// for all R rows (decode on a CPU is bound by reading the weights); attention stays per row, over its own
// sequence's cache (its own length and capacity). The per-op path pays a Python dispatch per tensor op and
// a thread wake-up per GEMV; here the threads only stream weights.
// Compiled as one unit with gemv.cpp (its row kernels are reused). Kinds of weight: bf16/f32 rows,
// int8/int4 rows (gemv.cpp's), and with AVX512-VNNI int8/int4 "interleaved": 16 rows side by side so
// one vpdpbusd gives 16 rows' sums against an int8 copy of x (one scale per 32 of x, as llama.cpp's
// Q8 activations): no horizontal sums, no per-weight float conversion.
#include "gemv.cpp"

#include <atomic>
#include <cmath>
#include <sched.h>

enum Kind : int32_t { K_BF16 = 0, K_F32 = 1, K_I8 = 2, K_I4 = 3, K_I4V = 5, K_I8G = 6 };
// rows of x from which int8 weights go through AMX (the same sums as VNNI's, so any threshold gives the
// same results; measured on a Sapphire Rapids: a step of 4 decode rows 3-5 % faster on AMX, of 2 rows 15 %
// slower)
static const int64_t AMX_ROWS = 4;
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
struct Batch {             // R rows, each a token at a position of one sequence
    int64_t rows;
    const int64_t* token;  // [R]
    const int64_t* pos;    // [R] 0-based position; the row sees its sequence's keys 0..pos
    const int64_t* seq;    // [R] the row's sequence: an index into kc, vc and cap
    void* const* const* kc;  // [S] -> per layer [kv_heads, cap, head_dim] (bf16, or fp32 if kv_f32)
    void* const* const* vc;
    const int64_t* cap;    // [S] positions each sequence's buffers hold
    int64_t n_logits;      // rows whose logits are wanted
    const int64_t* logit_rows;  // [n_logits]
    float* logits;         // [n_logits][vocab] fp32
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

// ---- M rows of x prepared for a kind: rounded to bf16, or quantized to int8 per 32. Row m's data sit at
// f[m*K], b[m*K], q[m*K], dx/qs/xs[m*G], xo[m*n_out]. Sized once for the largest linear and R rows ----
struct Prepared {
    int64_t M = 0, K = 0;
    std::vector<float> f;         // x (fp32), outlier columns zeroed
    std::vector<uint16_t> b;      // bf16 of x (AVX512-BF16 kernel)
    std::vector<int8_t> q;        // int8 x
    std::vector<float> dx, xs;    // per 32: int8 scale, exact sum of x
    std::vector<int32_t> qs;      // per 32: sum of the int8 x (for I8G's +128)
    std::vector<float> xo;        // x at the outlier columns (taken out of f)
    void size(int64_t rows, int64_t kmax, int64_t outmax) {
        f.resize(rows * kmax); b.resize(rows * kmax); q.resize(rows * kmax);
        dx.resize(rows * (kmax / 32 + 1)); xs.resize(rows * (kmax / 32 + 1)); qs.resize(rows * (kmax / 32 + 1));
        xo.resize(rows * (outmax + 1));
    }
};

// int8 copy of one row of x per 32 (scale amax/127), its sums, and x's exact sums
static void quantize_x(const float* f, int64_t K, int8_t* q, float* dx, float* xs, int32_t* qs) {
    for (int64_t g = 0; g < K / 32; g++) {
        const float* xg = f + g * 32;
        float s = 0, amax = 0;
        for (int j = 0; j < 32; j++) { s += xg[j]; amax = std::fmax(amax, std::fabs(xg[j])); }
        const float inv = amax > 0 ? 127.f / amax : 0.f;
        int sum = 0;
        for (int j = 0; j < 32; j++) { int v = (int)std::nearbyint(xg[j] * inv); q[g * 32 + j] = (int8_t)v; sum += v; }
        xs[g] = s; dx[g] = amax / 127.f; qs[g] = sum;
    }
}
#ifdef X86
AVX512 static void quantize_x512(const float* f, int64_t K, int8_t* q, float* dx, float* xs, int32_t* qs) {
    for (int64_t g = 0; g < K / 32; g++) {
        __m512 a = _mm512_loadu_ps(f + g * 32), b = _mm512_loadu_ps(f + g * 32 + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        const __m512 inv = _mm512_set1_ps(amax > 0 ? 127.f / amax : 0.f);
        __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
        _mm_storeu_si128((__m128i*)(q + g * 32), _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128((__m128i*)(q + g * 32 + 16), _mm512_cvtsepi32_epi8(qb));
        xs[g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b)); dx[g] = amax / 127.f;
        qs[g] = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    }
}
AVX512BF static void to_bf16_512(const float* f, uint16_t* b, int64_t K) {
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) _mm256_storeu_si256((__m256i*)(b + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(f + k)));
    for (; k < K; k++) b[k] = f2bf16(f[k]);
}
#endif

// row m of x for L (its rows already sized by Prepared::size)
static void prepare_row(const Lin& L, const float* x, Prepared& p, int64_t m, int isa) {
    const int64_t K = L.k, G = K / 32;
    float* f = p.f.data() + m * K;
    std::memcpy(f, x, K * sizeof(float));
    for (int64_t c = 0; c < L.n_out; c++) { p.xo[m * L.n_out + c] = f[L.out_idx[c]]; f[L.out_idx[c]] = 0; }
    if (L.kind == K_BF16 && isa >= 3) {
#ifdef X86
        to_bf16_512(f, p.b.data() + m * K, K);
#endif
    }
    if (L.kind == K_I4 || interleaved(L.kind)) {
        int8_t* q = p.q.data() + m * K; float* dx = p.dx.data() + m * G; float* xs = p.xs.data() + m * G; int32_t* qs = p.qs.data() + m * G;
#ifdef X86
        if (isa >= 2) { quantize_x512(f, K, q, dx, xs, qs); return; }
#endif
        quantize_x(f, K, q, dx, xs, qs);
    }
}

#ifdef X86
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
VNNI static inline __m512 bf16x16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
VNNI static inline __m512i bcast4(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
VNNI static inline void store16(const Lin& L, __m512 acc, float* y, int64_t b) {
    const int64_t n = b * 16, left = L.n - n;
    const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    if (L.bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, L.bias + n));
    _mm512_mask_storeu_ps(y + n, m, acc);
}

// MR rows of x against block b of 16 weight rows: int8 with a bf16 scale per 32 of each row (as llama.cpp's
// Q8_0), stored +128: the +128 comes back per group from x's int8 sums. The block's 8 vectors per group
// are loaded once for the MR rows
template <int MR>
VNNI static inline void i8g_tile(const Lin& L, const Prepared& p, float* y, int64_t ldy, int64_t b, int64_t m) {
    const int64_t K = L.k, G = K / 32;
    const uint8_t* w = (const uint8_t*)L.w + b * 16 * K; const uint16_t* S = (const uint16_t*)L.s;
    __m512 acc[MR];
    for (int j = 0; j < MR; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++, w += 512) {
        __m512i wv[8];
        for (int t = 0; t < 8; t++) wv[t] = _mm512_loadu_si512(w + t * 64);
        const __m512 sc = bf16x16(S + (b * G + g) * 16);
        for (int j = 0; j < MR; j++) {
            const int8_t* xq = p.q.data() + (m + j) * K + g * 32;
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            for (int t = 0; t < 8; t += 2) {
                s0 = _mm512_dpbusd_epi32(s0, wv[t], bcast4(xq + t * 4));
                s1 = _mm512_dpbusd_epi32(s1, wv[t + 1], bcast4(xq + t * 4 + 4));
            }
            const int64_t at = (m + j) * G + g;
            const __m512i d = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(128 * p.qs[at]));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sc, _mm512_set1_ps(p.dx[at])), acc[j]);
        }
    }
    for (int j = 0; j < MR; j++) store16(L, acc[j], y + (m + j) * ldy, b);
}
VNNI static void i8g_vnni(const Lin& L, const Prepared& p, float* y, int64_t ldy, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        int64_t m = 0;
        for (; m + 4 <= p.M; m += 4) i8g_tile<4>(L, p, y, ldy, b, m);
        for (; m < p.M; m++) i8g_tile<1>(L, p, y, ldy, b, m);
    }
}

// The same sums on AMX-INT8 for many rows of x: per group of 32, one tdpbsud gives a 16 x 16 block of exact
// int32 dot products (x rows signed, the +128 weights unsigned: the I8G layout is AMX's B tile as it is),
// then the same epilogue as i8g_tile in the same order, so every row gets bit for bit what VNNI gives it.
// Tiles: 0/1 A and C for 16 rows of x, 2/3 for a last narrower block, 4 the weights.
#define AMX8 __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni")))
// one block of mb rows of x (m0..) against block b of 16 rows of W; tile numbers are immediates, so the
// body is spelled once per pair of tiles (TA: x, TC: sums)
#define I8G_AMX_BLOCK(TA, TC)                                                                              \
    {                                                                                                      \
        __m512 acc[16];                                                                                    \
        for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();                                         \
        for (int64_t g = 0; g < G; g++) {                                                                  \
            _tile_zero(TC);                                                                                \
            _tile_loadd(TA, p.q.data() + m0 * K + g * 32, K);                                              \
            _tile_loadd(4, w + g * 512, 64);                                                               \
            _tile_dpbsud(TC, TA, 4);                                                                       \
            _tile_stored(TC, c, 64);                                                                       \
            const __m512 sc = bf16x16(S + (b * G + g) * 16);                                               \
            for (int64_t j = 0; j < mb; j++) {                                                             \
                const int64_t at = (m0 + j) * G + g;                                                       \
                const __m512i d = _mm512_sub_epi32(_mm512_load_si512(c + j * 16), _mm512_set1_epi32(128 * p.qs[at])); \
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sc, _mm512_set1_ps(p.dx[at])), acc[j]); \
            }                                                                                              \
        }                                                                                                  \
        for (int64_t j = 0; j < mb; j++) store16(L, acc[j], y + (m0 + j) * ldy, b);                        \
    }
AMX8 static void i8g_amx(const Lin& L, const Prepared& p, float* y, int64_t ldy, int64_t b0, int64_t b1) {
    const int64_t K = L.k, G = K / 32, M = p.M, whole = M / 16 * 16, rest = M - whole;
    const uint16_t* S = (const uint16_t*)L.s;
    alignas(64) int32_t c[16 * 16];
    alignas(64) TileConfig cfg = {};
    cfg.palette = 1;
    cfg.rows[0] = 16; cfg.colsb[0] = 32;  // A: 16 rows of x, a group of 32 int8
    cfg.rows[1] = 16; cfg.colsb[1] = 64;  // C: 16 rows of x by 16 rows of W, int32
    cfg.rows[2] = (uint8_t)(rest ? rest : 1); cfg.colsb[2] = 32;
    cfg.rows[3] = (uint8_t)(rest ? rest : 1); cfg.colsb[3] = 64;
    cfg.rows[4] = 8; cfg.colsb[4] = 64;   // B: the group's 8 x 4 k by 16 rows of W (+128)
    _tile_loadconfig(&cfg);
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t* w = (const uint8_t*)L.w + b * 16 * K;
        for (int64_t m0 = 0; m0 < whole; m0 += 16) {
            const int64_t mb = 16;
            I8G_AMX_BLOCK(0, 1)
        }
        if (rest) {
            const int64_t m0 = whole, mb = rest;
            I8G_AMX_BLOCK(2, 3)
        }
    }
    _tile_release();
}

template <int MR>
VNNI static inline void i4v_tile(const Lin& L, const Prepared& p, float* y, int64_t ldy, int64_t b, int64_t m) {
    const int64_t K = L.k, G = K / 32;
    const uint8_t* w = (const uint8_t*)L.w + b * 8 * K;
    const uint16_t* S = (const uint16_t*)L.s; const uint16_t* Z = (const uint16_t*)L.z;
    const __m512i low = _mm512_set1_epi8(15);
    __m512 acc[MR], accz[MR];
    for (int j = 0; j < MR; j++) { acc[j] = _mm512_setzero_ps(); accz[j] = _mm512_setzero_ps(); }
    for (int64_t g = 0; g < G; g++, w += 256) {
        __m512i lo[4], hi[4];
        for (int t = 0; t < 4; t++) {
            const __m512i v = _mm512_loadu_si512(w + t * 64);
            lo[t] = _mm512_and_si512(v, low); hi[t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        const int64_t at = (b * G + g) * 16;
        const __m512 sc = bf16x16(S + at), mn = bf16x16(Z + at);
        for (int j = 0; j < MR; j++) {
            const int8_t* xq = p.q.data() + (m + j) * K + g * 32;
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            for (int t = 0; t < 4; t++) {
                s0 = _mm512_dpbusd_epi32(s0, lo[t], bcast4(xq + t * 8));
                s1 = _mm512_dpbusd_epi32(s1, hi[t], bcast4(xq + t * 8 + 4));
            }
            const int64_t xg = (m + j) * G + g;
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), _mm512_mul_ps(sc, _mm512_set1_ps(p.dx[xg])), acc[j]);
            accz[j] = _mm512_fmadd_ps(mn, _mm512_set1_ps(p.xs[xg]), accz[j]);
        }
    }
    for (int j = 0; j < MR; j++) store16(L, _mm512_add_ps(acc[j], accz[j]), y + (m + j) * ldy, b);
}
VNNI static void i4v_vnni(const Lin& L, const Prepared& p, float* y, int64_t ldy, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        int64_t m = 0;
        for (; m + 4 <= p.M; m += 4) i4v_tile<4>(L, p, y, ldy, b, m);
        for (; m < p.M; m++) i4v_tile<1>(L, p, y, ldy, b, m);
    }
}
#endif

// the rows of L this thread computes: blocks of 16 for the interleaved kinds, even row spans otherwise
static void rows_of(const Lin& L, int64_t& n0, int64_t& n1, int t, int T) {
    if (interleaved(L.kind)) {
        const int64_t blocks = (L.n + 15) / 16, per = (blocks + T - 1) / T;
        n0 = per * t * 16 < L.n ? per * t * 16 : L.n; n1 = n0 + per * 16 < L.n ? n0 + per * 16 : L.n;
    } else {
        span(L.n, n0, n1, t, T);
    }
}

static void run_kernel(const Lin& L, const Prepared& p, float* y, int t, int T, int isa) {
    const int64_t N = L.n, K = L.k, M = p.M;
    if (interleaved(L.kind)) {
        const int64_t blocks = (N + 15) / 16, per = (blocks + T - 1) / T;
        const int64_t b0 = per * t < blocks ? per * t : blocks, b1 = b0 + per < blocks ? b0 + per : blocks;
#ifdef X86
        if (L.kind == K_I8G && isa >= 4 && M >= AMX_ROWS) i8g_amx(L, p, y, N, b0, b1);
        else if (L.kind == K_I8G) i8g_vnni(L, p, y, N, b0, b1);
        else i4v_vnni(L, p, y, N, b0, b1);
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
        if (isa >= 4) bf16_amx((const uint16_t*)L.w, p.b.data(), y, n0, n1, K, M, N);
        else if (isa >= 3) bf16_dp((const uint16_t*)L.w, p.b.data(), y, n0, n1, K, M, N);
        else if (isa == 2) bf16_avx512((const uint16_t*)L.w, x, y, n0, n1, K, M, N);
        else if (isa == 1) bf16_avx2((const uint16_t*)L.w, x, y, n0, n1, K, M, N); else
#elif defined(__aarch64__)
        if (isa >= 1) bf16_neon((const uint16_t*)L.w, x, y, n0, n1, K, M, N); else
#endif
        bf16_generic((const uint16_t*)L.w, x, y, n0, n1, K, M, N);
        break;
    case K_F32:
#ifdef X86
        if (isa >= 2) f32_avx512((const float*)L.w, x, y, n0, n1, K, M, N);
        else if (isa == 1) f32_avx2((const float*)L.w, x, y, n0, n1, K, M, N); else
#elif defined(__aarch64__)
        if (isa >= 1) f32_neon((const float*)L.w, x, y, n0, n1, K, M, N); else
#endif
        f32_generic((const float*)L.w, x, y, n0, n1, K, M, N);
        break;
    case K_I8:
#ifdef X86
        if (isa >= 2) i8_avx512((const int8_t*)L.w, (const float*)L.s, x, y, n0, n1, K, M, N);
        else if (isa == 1) i8_avx2((const int8_t*)L.w, (const float*)L.s, x, y, n0, n1, K, M, N); else
#elif defined(__aarch64__)
        if (isa >= 1) i8_neon((const int8_t*)L.w, (const float*)L.s, x, y, n0, n1, K, M, N); else
#endif
        i8_generic((const int8_t*)L.w, (const float*)L.s, x, y, n0, n1, K, M, N);
        break;
    case K_I4: {
        const uint8_t* Q = (const uint8_t*)L.w; const uint16_t* S = (const uint16_t*)L.s; const uint16_t* Z = (const uint16_t*)L.z;
#ifdef X86
        if (isa >= 2) i4_avx512(Q, S, Z, x, p.xs.data(), y, n0, n1, K, M, N);
        else if (isa == 1) i4_avx2(Q, S, Z, x, p.xs.data(), y, n0, n1, K, M, N); else
#elif defined(__aarch64__)
        if (isa >= 1) i4_neon(Q, S, Z, x, p.xs.data(), y, n0, n1, K, M, N); else
#endif
        i4_generic(Q, S, Z, x, p.xs.data(), y, n0, n1, K, M, N);
        break;
    }
    }
    add_bias(y, L.bias, n0, n1, M, N);
}

// this thread's share of L's rows for all M rows of x, outlier columns added back
static void run_rows(const Lin& L, const Prepared& p, float* y, int t, int T, int isa) {
    run_kernel(L, p, y, t, T, isa);
    if (L.n_out) {
        int64_t n0, n1; rows_of(L, n0, n1, t, T);
        for (int64_t m = 0; m < p.M; m++)
            for (int64_t c = 0; c < L.n_out; c++) {
                const float* w = L.out_w + c * L.n; const float xc = p.xo[m * L.n_out + c]; float* ym = y + m * L.n;
                for (int64_t n = n0; n < n1; n++) ym[n] += w[n] * xc;
            }
    }
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
AVX512 static inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
AVX512 static inline __m512 ld16(const uint16_t* p) { return w16(p); }
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

// SiLU(gate) * up
static void swiglu(const float* gu, float* out, int64_t I, int isa) {
    int64_t i = 0;
#ifdef X86
    if (isa >= 2) i = swiglu512(gu, out, I);
#endif
    for (; i < I; i++) { const float g = gu[i]; out[i] = g / (1.f + std::exp(-g)) * gu[I + i]; }
}

// the embedding row of `token` (tied: the lm_head's row: bf16/fp32, int8 rows, or interleaved
// [n/16][k/4][16][4] + 128)
static void embed_row(const Model& M, int64_t token, float* x) {
    const int64_t H = M.hidden;
    if (M.embed) {
        for (int64_t i = 0; i < H; i++) x[i] = M.embed_f32 ? ((const float*)M.embed)[token * H + i] : bf16f(((const uint16_t*)M.embed)[token * H + i]);
        return;
    }
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

// Rows of x prepared for a linear. A few rows: every thread prepares all of them itself (microseconds,
// cheaper than a barrier more per projection). More: the threads share the rows, then meet.
struct Stage {
    Prepared shared;
    bool split;
    SpinBarrier& bar;
    Stage(int64_t R, SpinBarrier& b) : split(R > 2), bar(b) {}
    // make(row m of the input into `dst`), called for the rows this thread prepares
    template <typename F>
    const Prepared& prepare(const Lin& L, int64_t M, Prepared& own, int t, int T, int isa, F make) {
        Prepared& p = split ? shared : own;
        std::vector<float> row(L.k);
        if (!split || t == 0) { p.M = M; p.K = L.k; }
        for (int64_t m = split ? t : 0; m < M; m += split ? T : 1) { make(m, row.data()); prepare_row(L, row.data(), p, m, isa); }
        if (split) bar.wait();
        return p;
    }
};

template <typename KV>
static void step(const Model& M, const Batch& B, int isa, int threads) {
    const int64_t H = M.hidden, h = M.heads, kvh = M.kv_heads, d = M.head_dim, I = M.inter, R = B.rows;
    const int64_t qdim = (h + 2 * kvh) * d, half = d / 2, L_ = B.n_logits;
    std::vector<float> x(R * H), qkv(R * qdim), attn(R * h * d), gu(R * 2 * I), act(R * I), out(R * H), cs(R * half), sn(R * half);
    int64_t longest = 1, kmax = I > H ? I : H, outmax = 0;
    if (h * d > kmax) kmax = h * d;
    for (int64_t r = 0; r < R; r++) {
        embed_row(M, B.token[r], x.data() + r * H);
        for (int64_t i = 0; i < half; i++) {
            cs[r * half + i] = std::cos((float)B.pos[r] * M.inv_freq[i]); sn[r * half + i] = std::sin((float)B.pos[r] * M.inv_freq[i]);
        }
        if (B.pos[r] + 1 > longest) longest = B.pos[r] + 1;
    }
    for (int32_t l = 0; l < M.layers; l++) {
        const Layer& Ly = M.layer[l];
        for (const Lin* L : {&Ly.qkv, &Ly.o, &Ly.gate_up, &Ly.down}) if (L->n_out > outmax) outmax = L->n_out;
    }
    if (M.head.n_out > outmax) outmax = M.head.n_out;
    SpinBarrier bar(threads);
    Stage stage(R, bar);
    if (stage.split) stage.shared.size(R, kmax, outmax);
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num_(), T = omp_get_num_threads_();
        if (t == 0) bar.threads = T;  // what OpenMP gave, which may be fewer than asked
#pragma omp barrier
        Prepared own;
        if (!stage.split) own.size(R > L_ ? R : L_, kmax, outmax);
        std::vector<float> s(longest);
        for (int32_t l = 0; l < M.layers; l++) {
            const Layer& L = M.layer[l];
            const Prepared& pq = stage.prepare(L.qkv, R, own, t, T, isa,
                [&](int64_t r, float* y) { rms_norm(x.data() + r * H, L.ln1, y, H, M.eps); });
            run_rows(L.qkv, pq, qkv.data(), t, T, isa);
            bar.wait();
            for (int64_t job = t; job < R * (h + kvh); job += T) {  // rotary on q and k heads; k and v into the cache
                const int64_t r = job / (h + kvh), j = job % (h + kvh), sq = B.seq[r], cap = B.cap[sq], pos = B.pos[r];
                float* row = qkv.data() + r * qdim;
                rope(row + j * d, cs.data() + r * half, sn.data() + r * half, d);
                if (j >= h) {
                    const int64_t kv = j - h;
                    KV* kd = (KV*)B.kc[sq][l] + (kv * cap + pos) * d; KV* vd = (KV*)B.vc[sq][l] + (kv * cap + pos) * d;
                    for (int64_t i = 0; i < d; i++) { st(kd, i, row[j * d + i]); st(vd, i, row[(h + kvh + kv) * d + i]); }
                }
            }
            bar.wait();
            for (int64_t job = t; job < R * h; job += T) {
                const int64_t r = job / h, j = job % h, kv = j / (h / kvh), sq = B.seq[r], cap = B.cap[sq], n = B.pos[r] + 1;
                const KV* K = (const KV*)B.kc[sq][l] + kv * cap * d; const KV* V = (const KV*)B.vc[sq][l] + kv * cap * d;
                const float* q = qkv.data() + r * qdim + j * d; float* o = attn.data() + (r * h + j) * d;
#ifdef X86
                if (isa >= 2 && d % 16 == 0) attend512<KV>(q, K, V, n, d, M.scale, s.data(), o); else
#endif
                attend<KV>(q, K, V, n, d, M.scale, s.data(), o);
            }
            bar.wait();
            const Prepared& po = stage.prepare(L.o, R, own, t, T, isa,
                [&](int64_t r, float* y) { std::memcpy(y, attn.data() + r * h * d, h * d * sizeof(float)); });
            run_rows(L.o, po, out.data(), t, T, isa);
            { int64_t n0, n1; rows_of(L.o, n0, n1, t, T); for (int64_t r = 0; r < R; r++) for (int64_t i = n0; i < n1; i++) x[r * H + i] += out[r * H + i]; }
            bar.wait();
            const Prepared& pg = stage.prepare(L.gate_up, R, own, t, T, isa,
                [&](int64_t r, float* y) { rms_norm(x.data() + r * H, L.ln2, y, H, M.eps); });
            run_rows(L.gate_up, pg, gu.data(), t, T, isa);
            bar.wait();
            const Prepared& pd = stage.prepare(L.down, R, own, t, T, isa,
                [&](int64_t r, float* y) { swiglu(gu.data() + r * 2 * I, y, I, isa); });
            run_rows(L.down, pd, out.data(), t, T, isa);
            { int64_t n0, n1; rows_of(L.down, n0, n1, t, T); for (int64_t r = 0; r < R; r++) for (int64_t i = n0; i < n1; i++) x[r * H + i] += out[r * H + i]; }
            bar.wait();
        }
        if (L_ > 0) {
            const Prepared& ph = stage.prepare(M.head, L_, own, t, T, isa,
                [&](int64_t j, float* y) { rms_norm(x.data() + B.logit_rows[j] * H, M.norm, y, H, M.eps); });
            run_rows(M.head, ph, B.logits, t, T, isa);
        }
    }
}

#ifdef X86
// the largest of x with banned entries left out, in `best`; returns n, or the index of the first NaN
AVX512 static int64_t argmax512(const float* x, const uint8_t* banned, int64_t n, float& best) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    const __m512 none = top;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        if (banned) {
            const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(banned + i)));
            v = _mm512_mask_mov_ps(v, _mm512_test_epi32_mask(b, b), none);
        }
        if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) break;
        top = _mm512_max_ps(top, v);
    }
    best = _mm512_reduce_max_ps(top);
    for (; i < n; i++) {
        const float v = banned && banned[i] ? -INFINITY : x[i];
        if (v != v) return i;
        best = v > best ? v : best;
    }
    return n;
}
#endif

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

// y[m, :] = L(x[m, :]) for m < M, each weight read once for the M rows
void edgechat_gemv_lin(const Lin* L, const float* x, float* y, int64_t M, int isa, int threads) {
    SpinBarrier bar(threads);
    Stage stage(M, bar);
    if (stage.split) stage.shared.size(M, L->k, L->n_out);
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num_(), T = omp_get_num_threads_();
        if (t == 0) bar.threads = T;
#pragma omp barrier
        Prepared own;
        if (!stage.split) own.size(M, L->k, L->n_out);
        const Prepared& p = stage.prepare(*L, M, own, t, T, isa,
            [&](int64_t m, float* row) { std::memcpy(row, x + m * L->k, L->k * sizeof(float)); });
        run_rows(*L, p, y, t, T, isa);
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

// torch.argmax over x with the banned entries at -inf: the first index of the largest value (the first NaN
// if there is one). Greedy rows pick their token here: one pass in one thread, where torch's argmax and
// masked_fill wake the OpenMP pool twice per row
int64_t edgechat_argmax(const float* x, const uint8_t* banned, int64_t n) {
    float best = -INFINITY;
    int64_t i = 0;
#ifdef X86
    if (n >= 16 && edgechat_best_isa() >= 2) i = argmax512(x, banned, n, best);
    else
#endif
    for (; i < n; i++) {
        const float v = banned && banned[i] ? -INFINITY : x[i];
        if (v != v) return i;
        best = v > best ? v : best;
    }
    if (i < n) return i;  // argmax512 met a NaN at i
    for (int64_t j = 0; j < n; j++)
        if ((banned && banned[j] ? -INFINITY : x[j]) == best) return j;
    return 0;
}

// every row of the batch through the model; logits of the rows asked for
void edgechat_batch_step(const Model* m, const Batch* b, int isa, int threads) {
    if (m->kv_f32) step<float>(*m, *b, isa, threads);
    else step<uint16_t>(*m, *b, isa, threads);
}
}
