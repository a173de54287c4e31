// Float32 products on AMX tiles (amx.h). Compiled for any x86-64 target with the instructions enabled per
// function, and taken only where the processor has them (available()).
#include "amx.h"

#include "conveyor/conveyor.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define CONVEYOR_AMX 1
// GCC 12 warns of the undefined operand its own AVX-512 headers pass to the builtins (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace conveyor::cpu::amx {
namespace {

constexpr int kTileValues = 512;  // bfloat16 values in a tile of 16 rows of 64 bytes

// -1: not yet decided; 0 off; 1 on.
std::atomic<int> g_enabled{-1};

bool detect() {
#if defined(CONVEYOR_AMX)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tile = (edx >> 24) & 1u, bf16 = (edx >> 22) & 1u;
  if (!tile || !bf16) return false;
  // The parts are split with AVX-512 (these checks include the system's saving of its registers).
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512vl")) {
    return false;
  }
  // Linux gives a process the 8 KB of tile state only once it asks (ARCH_REQ_XCOMP_PERM for XTILEDATA);
  // the permission holds for all of its threads.
  constexpr long kRequestPermission = 0x1023, kTileData = 18;
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
#else
  return false;
#endif
}

}  // namespace

bool available() {
  static const bool has_amx = detect();
  return has_amx;
}

bool enabled() {
  int state = g_enabled.load(std::memory_order_relaxed);
  if (state < 0) {
    const char* env = std::getenv("CONVEYOR_CPU_AMX");
    const bool off = env != nullptr && std::strcmp(env, "0") == 0;
    int expected = -1;
    g_enabled.compare_exchange_strong(expected, available() && !off ? 1 : 0);
    state = g_enabled.load(std::memory_order_relaxed);
  }
  return state == 1;
}

bool set_enabled(bool on) {
  const bool previous = enabled();
  g_enabled.store(on && available() ? 1 : 0, std::memory_order_relaxed);
  return previous;
}

bool eligible(int64_t N, int64_t K) { return N >= kMinColumns && K >= kMinDepth && enabled(); }

#if defined(CONVEYOR_AMX)
namespace {

#define CONVEYOR_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define CONVEYOR_TILES __attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-bf16")))

// The three parts of 16 floats, each as 16 bfloat16 (the top halves of floats whose low halves are zero).
// A part is the remainder's top 8 significant bits by truncation, so the three sum to x exactly and none
// rounds past it (a largest float does not become infinite). Infinities and NaN keep their first part (a
// NaN's made quiet, so that truncating its payload cannot leave an infinity) and have zero others, without
// forming inf - inf. (An infinity's product can still be NaN where the other path's is infinite: inf times
// a zero part of the other operand.)
CONVEYOR_AVX512 inline void split16(__m512 x, __m256i parts[3]) {
  const __m512i high = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  const __m512i exponent = _mm512_set1_epi32(0x7F800000);
  const __m512i bits = _mm512_castps_si512(x);
  const __mmask16 special = _mm512_cmpeq_epi32_mask(_mm512_and_si512(bits, exponent), exponent);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  __m512i first = _mm512_and_si512(bits, high);
  first = _mm512_mask_or_epi32(first, nan, first, _mm512_set1_epi32(0x00400000));
  __m512 rest = _mm512_maskz_sub_ps(static_cast<__mmask16>(~special), x, _mm512_castsi512_ps(first));
  parts[0] = _mm512_cvtepi32_epi16(_mm512_srli_epi32(first, 16));
  for (int p = 1; p < 3; ++p) {
    const __m512i part = _mm512_and_si512(_mm512_castps_si512(rest), high);
    parts[p] = _mm512_cvtepi32_epi16(_mm512_srli_epi32(part, 16));
    rest = _mm512_sub_ps(rest, _mm512_castsi512_ps(part));
  }
}

CONVEYOR_AVX512 inline __mmask16 lanes(int64_t lo, int64_t hi) {  // lanes [lo, hi) of 16, 0 <= lo <= hi <= 16
  return static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

// Two values' parts side by side in each 32-bit lane: `low`'s in the low half (the first of a pair of k).
CONVEYOR_AVX512 inline __m512i pairs_of(__m256i low, __m256i high) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(low), _mm512_slli_epi32(_mm512_cvtepu16_epi32(high), 16));
}

// v[i] lane j -> v[j] lane i, for 16 vectors of 16 32-bit lanes: pairs, then quadruples, then 128-bit lanes
// and halves exchanged.
CONVEYOR_AVX512 inline void transpose16(__m512i v[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_i32x4(v[h + i], v[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_i32x4(v[h + i], v[h + i + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    v[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    v[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// Lane i: i * 16, the 32-bit lanes of a tile's row i (a row is 64 bytes): the scatter of a value's place
// in each of the 16 rows.
CONVEYOR_AVX512 inline __m512i tile_row_lanes() {
  return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                            _mm512_set1_epi32(16));
}

// 16 values of a line `stride` apart (stride 1: a vector load), lanes outside `valid` zero.
CONVEYOR_AVX512 inline __m512 load16(const float* p, int64_t stride, __mmask16 valid) {
  if (stride == 1) return _mm512_maskz_loadu_ps(valid, p);
  alignas(64) float values[16];
  for (int i = 0; i < 16; ++i) values[i] = (valid >> i) & 1u ? p[i * stride] : 0.f;
  return _mm512_load_ps(values);
}

}  // namespace

CONVEYOR_AVX512 void split_rows(const MatrixRef<float>& A, int64_t M, int64_t K, int64_t m0, int64_t m1,
                                int64_t k0, int64_t k1, uint16_t* parts, int64_t k_first, int64_t block) {
  const int64_t m_end = m1 == M ? (M + 15) / 16 * 16 : m1;  // the last rows' block padded with zeros
  const int64_t k_end = k1 == K ? chunks(K) * 32 : k1;      // and the last chunk of K
  if (A.col_stride != 1 && A.row_stride == 1) {
    // Columns contiguous (dW's and dR's A, a transpose): 16 rows of one k in a vector, and two values of k
    // side by side in each row's 32-bit lane, scattered to the block's 16 rows. A k whose partner is outside
    // [k0, k1) (another thread's) is stored value by value.
    const __m512i row_lanes = tile_row_lanes();
    for (int64_t m = m0; m < m_end; m += 16) {
      const __mmask16 rows = lanes(0, std::clamp<int64_t>(M - m, 0, 16));
      uint16_t* dst = parts + (m - m0) / 16 * block;
      const float* column = A.data + std::min(m, M);
      const auto split_k = [&](int64_t k, __m256i split[3]) {
        split16(load16(column + std::min(k, K) * A.col_stride, 1, k < K ? rows : __mmask16(0)), split);
      };
      for (int64_t k = k0; k < k_end;) {
        uint16_t* at = dst + (k - k_first) / 32 * kChunkValues + k % 32;
        if (k % 32 == 0 && k + 32 <= k_end) {
          // A whole chunk: its 16 pairs of k for each part, transposed to the tile's 16 rows in registers
          // (scattered lane by lane, dW's and dR's splits took 15% of an LSTM's forward + backward).
          __m512i pairs[3][16];
          for (int j = 0; j < 16; ++j) {
            __m256i first[3], second[3];
            split_k(k + 2 * j, first);
            split_k(k + 2 * j + 1, second);
            for (int p = 0; p < 3; ++p) pairs[p][j] = pairs_of(first[p], second[p]);
          }
          for (int p = 0; p < 3; ++p) {
            transpose16(pairs[p]);
            for (int r = 0; r < 16; ++r) _mm512_storeu_si512(at + p * kTileValues + r * 32, pairs[p][r]);
          }
          k += 32;
          continue;
        }
        __m256i first[3];
        split_k(k, first);
        if (k % 2 == 0 && k + 1 < k_end) {
          __m256i second[3];
          split_k(k + 1, second);
          for (int p = 0; p < 3; ++p) {
            _mm512_i32scatter_epi32(at + p * kTileValues, row_lanes, pairs_of(first[p], second[p]), 4);
          }
          k += 2;
          continue;
        }
        for (int p = 0; p < 3; ++p) {
          alignas(32) uint16_t values[16];
          _mm256_store_si256(reinterpret_cast<__m256i*>(values), first[p]);
          for (int r = 0; r < 16; ++r) at[p * kTileValues + r * 32] = values[r];
        }
        k += 1;
      }
    }
    return;
  }
  for (int64_t m = m0; m < m_end; ++m) {
    const float* row = m < M ? A.data + m * A.row_stride : A.data;
    uint16_t* line = parts + ((m - m0) / 16) * block + (m % 16) * 32;
    for (int64_t k = k0; k < k_end;) {
      const int64_t group = k / 16 * 16, hi = std::min<int64_t>(group + 16, k_end);
      const __mmask16 written = lanes(k - group, hi - group);
      const __mmask16 loaded = m < M ? static_cast<__mmask16>(written & lanes(0, std::clamp<int64_t>(K - group, 0, 16)))
                                     : __mmask16(0);
      __m256i split[3];
      split16(load16(row + std::min(group, K) * A.col_stride, A.col_stride, loaded), split);
      uint16_t* dst = line + (group - k_first) / 32 * kChunkValues + group % 32;
      for (int p = 0; p < 3; ++p) _mm256_mask_storeu_epi16(dst + p * kTileValues, written, split[p]);
      k = hi;
    }
  }
}

CONVEYOR_AVX512 void split_columns(const MatrixRef<float>& B, int64_t K, int64_t N, int64_t n0, int64_t n1,
                                   uint16_t* parts) {
  const int64_t n_end = n1 == N ? (N + 15) / 16 * 16 : n1;
  const int64_t block = block_size(K), chunk_count = chunks(K);
  if (B.col_stride == 1) {
    // Rows of B are contiguous: two rows of k (a pair) of 16 columns become one tile row, each value's part
    // in the low half and its partner's in the high half of a 32-bit lane.
    for (int64_t n = n0; n < n_end; n += 16) {
      const __mmask16 columns = lanes(0, std::clamp<int64_t>(N - n, 0, 16));
      uint16_t* dst = parts + (n / 16) * block;
      for (int64_t pair = 0; pair < chunk_count * 16; ++pair) {
        const int64_t k = 2 * pair;
        __m256i even[3], odd[3];
        split16(load16(B.data + k * B.row_stride + n, 1, k < K ? columns : __mmask16(0)), even);
        split16(load16(B.data + (k + 1) * B.row_stride + n, 1, k + 1 < K ? columns : __mmask16(0)), odd);
        uint16_t* row = dst + (pair / 16) * kChunkValues + (pair % 16) * 32;
        for (int p = 0; p < 3; ++p) {
          _mm512_storeu_si512(row + p * kTileValues, pairs_of(even[p], odd[p]));
        }
      }
    }
    return;
  }
  // Columns of B contiguous (or neither): 32 values of k of one column are the column's 16 pairs, one 32-bit
  // lane in each of the tile's 16 rows.
  const __m512i row_lanes = tile_row_lanes();
  for (int64_t n = n0; n < n_end; ++n) {
    uint16_t* dst = parts + (n / 16) * block + (n % 16) * 2;
    const float* column = n < N ? B.data + n * B.col_stride : B.data;
    for (int64_t c = 0; c < chunk_count; ++c) {
      const int64_t k = c * 32;
      const __mmask16 low = n < N ? lanes(0, std::clamp<int64_t>(K - k, 0, 16)) : __mmask16(0);
      const __mmask16 high = n < N ? lanes(0, std::clamp<int64_t>(K - k - 16, 0, 16)) : __mmask16(0);
      __m256i first[3], second[3];
      split16(load16(column + k * B.row_stride, B.row_stride, low), first);
      split16(load16(column + (k + 16) * B.row_stride, B.row_stride, high), second);
      for (int p = 0; p < 3; ++p) {
        const __m512i pairs = _mm512_inserti64x4(_mm512_castsi256_si512(first[p]), second[p], 1);
        _mm512_i32scatter_epi32(dst + c * kChunkValues + p * kTileValues, row_lanes, pairs, 4);
      }
    }
  }
}

namespace {

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace

// Loaded at the start of every call's work on a thread, not once a thread: another library may use the
// tiles on the same thread between two of ours (oneDNN's bfloat16 products in PyTorch do, on the OpenMP
// threads the CPU work shares), and it releases them after, leaving them unconfigured: a tile instruction
// of ours then faulted (SIGILL). 8 tiles of 16 rows of 64 bytes.
CONVEYOR_TILES void configure_tiles() {
  static const TileConfig config = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
      c.bytes_per_row[t] = 64;
      c.rows[t] = 16;
    }
    return c;
  }();
  _tile_loadconfig(&config);
}

CONVEYOR_TILES void release_tiles() { _tile_release(); }

namespace {

// tile_sums() for one shape: tiles 0-3 hold rows 0-15 and 16-31, columns 0-15 and 16-31 of C (kRows2 /
// kColumns2: the second block of rows or columns is there). A through tiles 4-5, B through 6-7; per chunk
// of K a1 b1, a2 b1, a3 b1, a1 b2, a2 b2, a1 b3, in that order for every element.
template <bool kRows2, bool kColumns2>
CONVEYOR_TILES void sums_of(const uint16_t* a, int64_t a_next, const uint16_t* b, int64_t b_next, int64_t count,
                            const float* start, float* sums, int64_t ld) {
  const int64_t stride = ld * int64_t(sizeof(float));
  if (start != nullptr) {
    _tile_loadd(0, start, stride);
    if (kColumns2) _tile_loadd(1, start + 16, stride);
    if (kRows2) _tile_loadd(2, start + 16 * ld, stride);
    if (kRows2 && kColumns2) _tile_loadd(3, start + 16 * ld + 16, stride);
  } else {
    _tile_zero(0);
    if (kColumns2) _tile_zero(1);
    if (kRows2) _tile_zero(2);
    if (kRows2 && kColumns2) _tile_zero(3);
  }
  for (int64_t c = 0; c < count; ++c, a += kChunkValues, b += kChunkValues) {
#define CONVEYOR_COLUMNS_OF_B(part)                                 \
  _tile_loadd(6, b + (part) * kTileValues, 64);                     \
  if (kColumns2) _tile_loadd(7, b + b_next + (part) * kTileValues, 64);
#define CONVEYOR_ROWS_OF_A(part)                                    \
  _tile_loadd(4, a + (part) * kTileValues, 64);                     \
  if (kRows2) _tile_loadd(5, a + a_next + (part) * kTileValues, 64); \
  _tile_dpbf16ps(0, 4, 6);                                          \
  if (kColumns2) _tile_dpbf16ps(1, 4, 7);                           \
  if (kRows2) _tile_dpbf16ps(2, 5, 6);                              \
  if (kRows2 && kColumns2) _tile_dpbf16ps(3, 5, 7);
    CONVEYOR_COLUMNS_OF_B(0)
    CONVEYOR_ROWS_OF_A(0)
    CONVEYOR_ROWS_OF_A(1)
    CONVEYOR_ROWS_OF_A(2)
    CONVEYOR_COLUMNS_OF_B(1)
    CONVEYOR_ROWS_OF_A(0)
    CONVEYOR_ROWS_OF_A(1)
    CONVEYOR_COLUMNS_OF_B(2)
    CONVEYOR_ROWS_OF_A(0)
#undef CONVEYOR_COLUMNS_OF_B
#undef CONVEYOR_ROWS_OF_A
  }
  _tile_stored(0, sums, stride);
  if (kColumns2) _tile_stored(1, sums + 16, stride);
  if (kRows2) _tile_stored(2, sums + 16 * ld, stride);
  if (kRows2 && kColumns2) _tile_stored(3, sums + 16 * ld + 16, stride);
}

}  // namespace

CONVEYOR_TILES void tile_sums(const uint16_t* a, int64_t a_next, const uint16_t* b, int64_t b_next, int64_t count,
                              int64_t rows, int64_t cols, const float* start, float* sums, int64_t ld) {
  const bool rows2 = rows > 16, columns2 = cols > 16;
  if (rows2 && columns2) {
    sums_of<true, true>(a, a_next, b, b_next, count, start, sums, ld);
  } else if (rows2) {
    sums_of<true, false>(a, a_next, b, b_next, count, start, sums, ld);
  } else if (columns2) {
    sums_of<false, true>(a, a_next, b, b_next, count, start, sums, ld);
  } else {
    sums_of<false, false>(a, a_next, b, b_next, count, start, sums, ld);
  }
}

CONVEYOR_AVX512 void finish(const float* sums, int64_t ld, int64_t rows, int64_t cols, float alpha, float beta,
                            float* C, int64_t ldc) {
  // alpha * s, or alpha * s + beta * C in one rounding after beta * C: the other path's accumulate_into.
  const __m512 alpha_v = _mm512_set1_ps(alpha), beta_v = _mm512_set1_ps(beta);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 valid = lanes(0, std::min<int64_t>(16, cols - j));
      float* c = C + r * ldc + j;
      const __m512 s = _mm512_maskz_loadu_ps(valid, sums + r * ld + j);
      const __m512 out = beta == 0.f ? _mm512_mul_ps(alpha_v, s)
                                     : _mm512_fmadd_ps(alpha_v, s, _mm512_mul_ps(beta_v, _mm512_maskz_loadu_ps(valid, c)));
      _mm512_mask_storeu_ps(c, valid, out);
    }
  }
}

CONVEYOR_TILES void tile_product(const uint16_t* a, const uint16_t* b, int64_t K, int64_t rows, int64_t cols,
                                 float alpha, float beta, float* C, int64_t ldc) {
  const int64_t block = block_size(K);
  if (stores_sums(rows, cols, alpha, beta)) {
    tile_sums(a, block, b, block, chunks(K), rows, cols, nullptr, C, ldc);
    return;
  }
  alignas(64) float sums[32 * 32];
  tile_sums(a, block, b, block, chunks(K), rows, cols, nullptr, sums, 32);
  finish(sums, 32, rows, cols, alpha, beta, C, ldc);
}

#else  // no AMX in this build: available() is false, and nothing calls these

void split_rows(const MatrixRef<float>&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, uint16_t*, int64_t,
                int64_t) {}
void split_columns(const MatrixRef<float>&, int64_t, int64_t, int64_t, int64_t, uint16_t*) {}
void configure_tiles() {}
void release_tiles() {}
void tile_sums(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, int64_t, const float*, float*,
               int64_t) {}
void finish(const float*, int64_t, int64_t, int64_t, float, float, float*, int64_t) {}
void tile_product(const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, float, float, float*, int64_t) {}

#endif

}  // namespace conveyor::cpu::amx

namespace conveyor {

bool use_amx(bool on) { return cpu::amx::set_enabled(on); }
bool using_amx() { return cpu::amx::enabled(); }

}  // namespace conveyor
