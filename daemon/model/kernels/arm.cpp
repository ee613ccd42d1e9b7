// aarch64 decode kernels, included by gemv.cpp on aarch64 only. ISA levels (edgechat_best_isa): 1 NEON,
// part of every aarch64 CPU; 2 NEON with the dot-product instructions (SDOT, HWCAP asimddp: Cortex-A55/
// A76 and later, so the Raspberry Pi 5, RK3588, Jetson Orin; not the Pi 4's A72).
// Row kinds (bf16, fp32, int8 rows, int4 groups): NEON with the weights widened to fp32 in registers
// (bf16 by a shift), gemv.cpp's signatures: y[m, n] for rows n0..n1 of W and the M rows of x ([M][K]),
// each weight widened once for up to 4 rows of x.
// Interleaved kinds (int8 with a scale per 32, int4 groups): the layouts the AVX512-VNNI kernels read,
// 16 rows side by side, 4 bytes of a row per 32-bit lane (step.cpp's Lin). One 16-byte load is 4 rows x
// 4 k, which is exactly SDOT's by-element form: vdotq_laneq_s32 sums them against 4 int8 values of x, 4
// rows at a time, with no horizontal sums. int8 is stored +128 for VNNI's unsigned operand: XOR 0x80
// gives back the signed weight SDOT takes. Without SDOT, widening multiplies and pairwise adds compute
// the same sums. x comes quantized per 32 (step.cpp's Prepared: p.M rows, q at [m*K], dx and xs at [m*G]).
// Row independence, as gemv.cpp: a row's sums are accumulated in the same order whatever M and the tiling.
// The interleaved kernels are templates on Lin and Prepared: step.cpp defines both after including gemv.cpp.
#include <arm_neon.h>
#include <sys/auxv.h>

#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
// SDOT is an Armv8.2-A extension (every CPU that has it is 8.2 or later); GCC's intrinsic asks for both
#if defined(__clang__)
#define ARM_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod"), flatten))
#else
#define ARM_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod"), flatten))
#endif

// 2: NEON and SDOT, 1: NEON
static int arm_best_isa() { return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) ? 2 : 1; }

// ---- row kinds ----
static inline float32x4_t bf16_lo(uint16x8_t v) { return vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(v), 16)); }
static inline float32x4_t bf16_hi(uint16x8_t v) { return vreinterpretq_f32_u32(vshll_high_n_u16(v, 16)); }
static inline void u8_to_f32(uint8x16_t b, float32x4_t v[4]) {
    const uint16x8_t lo = vmovl_u8(vget_low_u8(b)), hi = vmovl_high_u8(b);
    v[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo))); v[1] = vcvtq_f32_u32(vmovl_high_u16(lo));
    v[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi))); v[3] = vcvtq_f32_u32(vmovl_high_u16(hi));
}

// one row of weights as 16 fp32 at a time (load16) and one at a time for the tail (at)
struct RowBf16 {
    const uint16_t* w;
    void load16(int64_t k, float32x4_t v[4]) const {
        const uint16x8_t a = vld1q_u16(w + k), b = vld1q_u16(w + k + 8);
        v[0] = bf16_lo(a); v[1] = bf16_hi(a); v[2] = bf16_lo(b); v[3] = bf16_hi(b);
    }
    float at(int64_t k) const { return bf16f(w[k]); }
};
struct RowF32 {
    const float* w;
    void load16(int64_t k, float32x4_t v[4]) const { for (int j = 0; j < 4; j++) v[j] = vld1q_f32(w + k + 4 * j); }
    float at(int64_t k) const { return w[k]; }
};
struct RowI8 {
    const int8_t* w;
    void load16(int64_t k, float32x4_t v[4]) const {
        const int8x16_t b = vld1q_s8(w + k);
        const int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_high_s8(b);
        v[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))); v[1] = vcvtq_f32_s32(vmovl_high_s16(lo));
        v[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))); v[3] = vcvtq_f32_s32(vmovl_high_s16(hi));
    }
    float at(int64_t k) const { return (float)w[k]; }
};

// out[r] = w . x[r] for R rows of x (stride K): the weights widened once per 16 k for all R
template <int R, class Row>
static inline void dot_rows(const Row& w, const float* x, int64_t K, float* out) {
    float32x4_t acc[R][4];
    for (int r = 0; r < R; r++) for (int j = 0; j < 4; j++) acc[r][j] = vdupq_n_f32(0.f);
    const int64_t Kv = K & ~(int64_t)15;
    for (int64_t k = 0; k < Kv; k += 16) {
        float32x4_t v[4];
        w.load16(k, v);
        for (int r = 0; r < R; r++)
            for (int j = 0; j < 4; j++) acc[r][j] = vfmaq_f32(acc[r][j], v[j], vld1q_f32(x + r * K + k + 4 * j));
    }
    for (int r = 0; r < R; r++) {
        float s = vaddvq_f32(vaddq_f32(vaddq_f32(acc[r][0], acc[r][1]), vaddq_f32(acc[r][2], acc[r][3])));
        for (int64_t k = Kv; k < K; k++) s += w.at(k) * x[r * K + k];
        out[r] = s;
    }
}

// y[m, n] = scale[n] (or 1) * W[n] . x[m] for rows [n0, n1); make(n) gives row n's reader
template <class Make>
static inline void rows_neon(Make make, const float* scale, const float* x, float* y, int64_t n0, int64_t n1,
                             int64_t K, int64_t M, int64_t N) {
    for (int64_t n = n0; n < n1; n++) {
        const auto w = make(n);
        const float sc = scale ? scale[n] : 1.f;
        float s[4];
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {
            dot_rows<4>(w, x + m * K, K, s);
            for (int r = 0; r < 4; r++) y[(m + r) * N + n] = s[r] * sc;
        }
        for (; m < M; m++) { dot_rows<1>(w, x + m * K, K, s); y[m * N + n] = s[0] * sc; }
    }
}
static void bf16_neon(const uint16_t* W, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    rows_neon([&](int64_t n) { return RowBf16{W + n * K}; }, nullptr, x, y, n0, n1, K, M, N);
}
static void f32_neon(const float* W, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    rows_neon([&](int64_t n) { return RowF32{W + n * K}; }, nullptr, x, y, n0, n1, K, M, N);
}
static void i8_neon(const int8_t* W, const float* sc, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    rows_neon([&](int64_t n) { return RowI8{W + n * K}; }, sc, x, y, n0, n1, K, M, N);
}

// int4 groups of 32 (16 bytes: low nibbles k 0..15, high 16..31), a bf16 scale and minimum per group;
// xs[m, g]: the sum of x over group g (the minimum's term)
template <int R>
static inline void i4_rows(const uint8_t* q, const uint16_t* S, const uint16_t* Z, const float* x, const float* xs,
                           int64_t K, float* out) {
    const int64_t G = K / 32;
    const uint8x16_t low = vdupq_n_u8(15);
    float32x4_t acc[R];
    float zs[R];
    for (int r = 0; r < R; r++) { acc[r] = vdupq_n_f32(0.f); zs[r] = 0.f; }
    for (int64_t g = 0; g < G; g++) {
        const uint8x16_t b = vld1q_u8(q + g * 16);
        float32x4_t w[8];
        u8_to_f32(vandq_u8(b, low), w);
        u8_to_f32(vshrq_n_u8(b, 4), w + 4);
        const float sc = bf16f(S[g]), mn = bf16f(Z[g]);
        for (int r = 0; r < R; r++) {
            const float* xg = x + r * K + g * 32;
            float32x4_t t = vmulq_f32(w[0], vld1q_f32(xg));
            for (int j = 1; j < 8; j++) t = vfmaq_f32(t, w[j], vld1q_f32(xg + 4 * j));
            acc[r] = vfmaq_n_f32(acc[r], t, sc);
            zs[r] += mn * xs[r * G + g];
        }
    }
    for (int r = 0; r < R; r++) out[r] = vaddvq_f32(acc[r]) + zs[r];
}
static void i4_neon(const uint8_t* Q, const uint16_t* S, const uint16_t* Z, const float* x, const float* xs, float* y,
                    int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    const int64_t G = K / 32;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t* q = Q + n * (K / 2); const uint16_t* s = S + n * G; const uint16_t* z = Z + n * G;
        float o[4];
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {
            i4_rows<4>(q, s, z, x + m * K, xs + m * G, K, o);
            for (int r = 0; r < 4; r++) y[(m + r) * N + n] = o[r];
        }
        for (; m < M; m++) { i4_rows<1>(q, s, z, x + m * K, xs + m * G, K, o); y[m * N + n] = o[0]; }
    }
}

// ---- interleaved kinds ----
// acc[i] += sum_j w[4i + j] * x[4L + j]: SDOT's by-element form, or the same sums without it
template <int L>
ARM_DOTPROD static inline int32x4_t dot4_sdot(int32x4_t acc, int8x16_t w, int8x16_t x) {
    return vdotq_laneq_s32(acc, w, x, L);
}
template <int L>
static inline int32x4_t dot4_neon(int32x4_t acc, int8x16_t w, int8x16_t x) {
    const int8x16_t xb = vreinterpretq_s8_s32(vdupq_laneq_s32(vreinterpretq_s32_s8(x), L));
    const int32x4_t lo = vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(xb)));  // rows 0, 1: pairs of k
    const int32x4_t hi = vpaddlq_s16(vmull_high_s8(w, xb));                       // rows 2, 3
    return vaddq_s32(acc, vpaddq_s32(lo, hi));
}
template <bool DOT, int L>
static inline int32x4_t dot4(int32x4_t acc, int8x16_t w, int8x16_t x) {
    if constexpr (DOT) return dot4_sdot<L>(acc, w, x);
    else return dot4_neon<L>(acc, w, x);
}

// 16 fp32 sums + bias into y[b*16 ..], rows past L.n left alone
template <class Lin>
static inline void store16_arm(const Lin& L, const float32x4_t acc[4], float* y, int64_t b) {
    const int64_t n = b * 16;
    for (int r = 0; r < 4; r++) {
        const int64_t at = n + 4 * r;
        if (at + 4 <= L.n) {
            vst1q_f32(y + at, L.bias ? vaddq_f32(acc[r], vld1q_f32(L.bias + at)) : acc[r]);
        } else {
            float v[4];
            vst1q_f32(v, acc[r]);
            for (int i = 0; i < 4 && at + i < L.n; i++) y[at + i] = v[i] + (L.bias ? L.bias[at + i] : 0.f);
        }
    }
}
static inline void bf16x16_arm(const uint16_t* s, float32x4_t out[4]) {
    const uint16x8_t a = vld1q_u16(s), b = vld1q_u16(s + 8);
    out[0] = bf16_lo(a); out[1] = bf16_hi(a); out[2] = bf16_lo(b); out[3] = bf16_hi(b);
}

// one group (32 k) of a 16-row block against one row of int8 x: s[i] holds rows 4i..4i+3.
// int8: 8 quads of k, each [16 rows][4 k] (64 bytes), stored +128
template <bool DOT, int T>
static inline void i8g_quad(const uint8_t* w, int8x16_t x0, int8x16_t x1, int32x4_t s[4]) {
    const uint8x16_t flip = vdupq_n_u8(0x80);
    for (int r = 0; r < 4; r++)
        s[r] = dot4<DOT, T % 4>(s[r], vreinterpretq_s8_u8(veorq_u8(vld1q_u8(w + T * 64 + r * 16), flip)), T < 4 ? x0 : x1);
}
template <bool DOT>
static inline void i8g_group(const uint8_t* w, const int8_t* xq, int32x4_t s[4]) {
    const int8x16_t x0 = vld1q_s8(xq), x1 = vld1q_s8(xq + 16);
    i8g_quad<DOT, 0>(w, x0, x1, s); i8g_quad<DOT, 1>(w, x0, x1, s); i8g_quad<DOT, 2>(w, x0, x1, s);
    i8g_quad<DOT, 3>(w, x0, x1, s); i8g_quad<DOT, 4>(w, x0, x1, s); i8g_quad<DOT, 5>(w, x0, x1, s);
    i8g_quad<DOT, 6>(w, x0, x1, s); i8g_quad<DOT, 7>(w, x0, x1, s);
}
// int4: 4 quads t, each [16 rows][4 bytes]: low nibbles k 8t..8t+3, high 8t+4..8t+7 (0..15, fine as int8)
template <bool DOT, int T>
static inline void i4v_quad(const uint8_t* w, int8x16_t x0, int8x16_t x1, int32x4_t s[4]) {
    const uint8x16_t low = vdupq_n_u8(15);
    for (int r = 0; r < 4; r++) {
        const uint8x16_t v = vld1q_u8(w + T * 64 + r * 16);
        s[r] = dot4<DOT, (2 * T) % 4>(s[r], vreinterpretq_s8_u8(vandq_u8(v, low)), T < 2 ? x0 : x1);
        s[r] = dot4<DOT, (2 * T + 1) % 4>(s[r], vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), T < 2 ? x0 : x1);
    }
}
template <bool DOT>
static inline void i4v_group(const uint8_t* w, const int8_t* xq, int32x4_t s[4]) {
    const int8x16_t x0 = vld1q_s8(xq), x1 = vld1q_s8(xq + 16);
    i4v_quad<DOT, 0>(w, x0, x1, s); i4v_quad<DOT, 1>(w, x0, x1, s);
    i4v_quad<DOT, 2>(w, x0, x1, s); i4v_quad<DOT, 3>(w, x0, x1, s);
}

// MR rows of x (from m) against block b: a group's 512 (int8) or 256 (int4) bytes of weights are read
// from memory once, for the MR rows (the later rows find them in L1)
template <bool DOT, bool INT4, int MR, class Lin, class P>
static inline void tile_arm(const Lin& L, const P& p, float* y, int64_t ldy, int64_t b, int64_t m) {
    const int64_t K = L.k, G = K / 32, bytes = INT4 ? 256 : 512;
    const uint8_t* w = (const uint8_t*)L.w + b * G * bytes;
    const uint16_t* S = (const uint16_t*)L.s; const uint16_t* Z = (const uint16_t*)L.z;
    float32x4_t acc[MR][4];
    for (int j = 0; j < MR; j++) for (int r = 0; r < 4; r++) acc[j][r] = vdupq_n_f32(0.f);
    for (int64_t g = 0; g < G; g++, w += bytes) {
        float32x4_t sc[4], mn[4];
        bf16x16_arm(S + (b * G + g) * 16, sc);
        if (INT4) bf16x16_arm(Z + (b * G + g) * 16, mn);
        for (int j = 0; j < MR; j++) {
            const int64_t at = (m + j) * G + g;
            int32x4_t s[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
            if (INT4) i4v_group<DOT>(w, p.q.data() + (m + j) * K + g * 32, s);
            else i8g_group<DOT>(w, p.q.data() + (m + j) * K + g * 32, s);
            const float dx = p.dx[at];
            for (int r = 0; r < 4; r++) {
                acc[j][r] = vfmaq_f32(acc[j][r], vcvtq_f32_s32(s[r]), vmulq_n_f32(sc[r], dx));
                if (INT4) acc[j][r] = vfmaq_n_f32(acc[j][r], mn[r], p.xs[at]);
            }
        }
    }
    for (int j = 0; j < MR; j++) store16_arm(L, acc[j], y + (m + j) * ldy, b);
}
template <bool DOT, bool INT4, class Lin, class P>
static inline void blocks_arm(const Lin& L, const P& p, float* y, int64_t ldy, int64_t b0, int64_t b1) {
    const int64_t M = p.M;
    for (int64_t b = b0; b < b1; b++) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) tile_arm<DOT, INT4, 4>(L, p, y, ldy, b, m);
        for (; m < M; m++) tile_arm<DOT, INT4, 1>(L, p, y, ldy, b, m);
    }
}
template <bool INT4, class Lin, class P>
ARM_DOTPROD static void blocks_sdot(const Lin& L, const P& p, float* y, int64_t ldy, int64_t b0, int64_t b1) {
    blocks_arm<true, INT4>(L, p, y, ldy, b0, b1);
}
template <bool INT4, class Lin, class P>
__attribute__((flatten)) static void blocks_neon(const Lin& L, const P& p, float* y, int64_t ldy, int64_t b0, int64_t b1) {
    blocks_arm<false, INT4>(L, p, y, ldy, b0, b1);
}

// blocks [b0, b1) of 16 rows of an interleaved int8 (I8G) or int4 (I4V) linear, for the rows of x in p;
// row m's output at y + m * ldy. SDOT at isa 2, NEON below
template <class Lin, class P>
static void i8g_arm(const Lin& L, const P& p, float* y, int64_t ldy, int64_t b0, int64_t b1, int isa) {
    if (isa >= 2) blocks_sdot<false>(L, p, y, ldy, b0, b1);
    else blocks_neon<false>(L, p, y, ldy, b0, b1);
}
template <class Lin, class P>
static void i4v_arm(const Lin& L, const P& p, float* y, int64_t ldy, int64_t b0, int64_t b1, int isa) {
    if (isa >= 2) blocks_sdot<true>(L, p, y, ldy, b0, b1);
    else blocks_neon<true>(L, p, y, ldy, b0, b1);
}
