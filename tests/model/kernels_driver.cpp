// Runs the decode kernels on cases written by tests/model/test_arm_kernels.py (raw little-endian files),
// for every ISA level this CPU has, and writes the outputs beside them:
//   NAME.gemv.ISA  y [M][N] from edgechat_gemv_lin (the stable entry point, 2 threads)
//   NAME.rows.ISA  y [M][N] from the kernels called directly with all M rows of x at once (gemv.cpp's
//                  row signatures; a Prepared of M rows for the interleaved kinds); no outlier columns
//   NAME.one.ISA   the same, each row of x alone (M = 1): row independence wants the same bits
//   NAME.deq       the fp32 weight edgechat_dequantize gives (quantized kinds)
// cases.txt: one case a line: name kind n k m n_out has_bias (kind: step.cpp's Kind). Prints the best ISA
// and the source hash. One translation unit with step.cpp, so the static kernels are reachable.
#include "step.cpp"

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>

static std::vector<char> read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}
static void write_file(const std::string& path, const float* data, size_t count) {
    std::ofstream out(path, std::ios::binary);
    out.write((const char*)data, count * sizeof(float));
}

// rows m0..m0+M-1 of x prepared for L as the batch step prepares them (step.cpp's prepare_row)
static Prepared prepare_rows(const Lin& L, const float* x, int64_t m0, int64_t M, int isa) {
    Prepared p;
    p.size(M, L.k, L.n_out);
    p.M = M; p.K = L.k;
    for (int64_t m = 0; m < M; m++) prepare_row(L, x + (m0 + m) * L.k, p, m, isa);
    return p;
}

// all M rows at once through the kernels the step dispatches to on this ISA
static void run_all_rows(const Lin& L, const Prepared& r, float* y, int isa) {
    const int64_t N = L.n, K = L.k, M = r.M;
    const float* x = r.f.data();
    switch (L.kind) {
#if defined(__aarch64__)
    case K_I8G: i8g_arm(L, r, y, N, 0, (N + 15) / 16, isa); return;
    case K_I4V: i4v_arm(L, r, y, N, 0, (N + 15) / 16, isa); return;
    case K_BF16:
        if (isa >= 1) bf16_neon((const uint16_t*)L.w, x, y, 0, N, K, M, N); else bf16_generic((const uint16_t*)L.w, x, y, 0, N, K, M, N);
        break;
    case K_F32:
        if (isa >= 1) f32_neon((const float*)L.w, x, y, 0, N, K, M, N); else f32_generic((const float*)L.w, x, y, 0, N, K, M, N);
        break;
    case K_I8:
        if (isa >= 1) i8_neon((const int8_t*)L.w, (const float*)L.s, x, y, 0, N, K, M, N);
        else i8_generic((const int8_t*)L.w, (const float*)L.s, x, y, 0, N, K, M, N);
        break;
    case K_I4:
        if (isa >= 1) i4_neon((const uint8_t*)L.w, (const uint16_t*)L.s, (const uint16_t*)L.z, x, r.xs.data(), y, 0, N, K, M, N);
        else i4_generic((const uint8_t*)L.w, (const uint16_t*)L.s, (const uint16_t*)L.z, x, r.xs.data(), y, 0, N, K, M, N);
        break;
#endif
    default: std::fprintf(stderr, "no direct path for kind %d here\n", L.kind); std::exit(2);
    }
    add_bias(y, L.bias, 0, N, M, N);
}

int main(int argc, char** argv) {
    if (argc != 2) { std::fprintf(stderr, "usage: %s CASE_DIR\n", argv[0]); return 2; }
    const std::string dir = std::string(argv[1]) + "/";
    const int best = edgechat_best_isa();
    std::printf("best_isa=%d source_hash=%s\n", best, edgechat_source_hash());
    std::ifstream list(dir + "cases.txt");
    std::string line;
    while (std::getline(list, line)) {
        std::istringstream fields(line);
        std::string name; int kind, has_bias; int64_t n, k, m, n_out;
        if (!(fields >> name >> kind >> n >> k >> m >> n_out >> has_bias)) continue;
        const std::string at = dir + name;
        std::vector<char> w = read_file(at + ".w"), s = read_file(at + ".s"), z = read_file(at + ".z"),
            bias = read_file(at + ".bias"), idx = read_file(at + ".idx"), outw = read_file(at + ".outw"),
            xb = read_file(at + ".x");
        Lin L{kind, 0, n, k, w.data(), s.empty() ? nullptr : s.data(), z.empty() ? nullptr : z.data(),
              has_bias ? (const float*)bias.data() : nullptr, n_out,
              n_out ? (const int32_t*)idx.data() : nullptr, n_out ? (const float*)outw.data() : nullptr};
        const float* x = (const float*)xb.data();
        std::vector<float> y(m * n);
        for (int isa = 0; isa <= best; isa++) {
            std::fill(y.begin(), y.end(), NAN);
            edgechat_gemv_lin(&L, x, y.data(), m, isa, 2);
            write_file(at + ".gemv." + std::to_string(isa), y.data(), y.size());
            if (n_out == 0) {
                std::fill(y.begin(), y.end(), NAN);
                run_all_rows(L, prepare_rows(L, x, 0, m, isa), y.data(), isa);
                write_file(at + ".rows." + std::to_string(isa), y.data(), y.size());
                std::fill(y.begin(), y.end(), NAN);  // each row alone: the same bits (row independence)
                for (int64_t r = 0; r < m; r++) run_all_rows(L, prepare_rows(L, x, r, 1, isa), y.data() + r * n, isa);
                write_file(at + ".one." + std::to_string(isa), y.data(), y.size());
            }
        }
        if (kind != K_BF16 && kind != K_F32) {
            std::vector<float> deq(n * k);
            edgechat_dequantize(&L, deq.data(), 1, 2);
            write_file(at + ".deq", deq.data(), deq.size());
        }
        std::printf("%s done\n", name.c_str());
    }
    return 0;
}
