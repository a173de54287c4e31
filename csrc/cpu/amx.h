// Float32 products on Intel's AMX tiles (Sapphire Rapids and later), to float32's accuracy.
//
// Each float is split into three bfloat16 parts whose sum is the float exactly (its top 8 significant bits,
// the next 8, the last 8), and a product is the sum of the six part products a1 b1, a2 b1, a3 b1, a1 b2,
// a2 b2, a1 b3, accumulated in float32 by the tiles (each part product is exact in float32). The three
// dropped, a3 b2, a2 b3, a3 b3, are below 2^-21 of a b together, under the rounding of the float32 sums
// around them. bench/cpu_gemm measures the worst errors of both paths against float64 (2e-8 to 2e-7 of
// sum |a b|, of the same order on either). One tile instruction does 16 x 16 x 32 multiply-adds, so six
// passes still run 1.1-1.6 times the rate of the AVX-512 path on the recurrent layers' shapes (bench/NOTES.md,
// "Float32 products on AMX tiles"). Where they differ from float32's products: below 2^-110 a value's last
// part is subnormal, and the tiles flush subnormal inputs and results to zero; an infinity times a value
// whose second or third part is zero gives NaN, not an infinity.
//
// The packed layouts: B (k rows, n columns) as [n / 16][k / 32][part][16 pairs of k][16 columns][2], and A
// (m rows) as [m / 16][k / 32][part][16 rows][32 of k], zero-padded to whole tiles; a block of 16 lines (rows
// of A, columns of B) holds all of K.
#pragma once

#include <cstdint>

#include "gemm.h"

namespace conveyor::cpu::amx {

// Whether the processor has AMX-BF16 and the kernel lets this process use the tiles (checked once).
bool available();
// available() and not turned off (conveyor::use_amx, or CONVEYOR_CPU_AMX=0 in the environment).
bool enabled();
// Turns the AMX path on (where available) or off for the products formed after the call; returns the
// previous setting.
bool set_enabled(bool on);

// Whether a float product runs on AMX: enabled(), B at least kMinColumns wide and K at least kMinDepth deep
// (smaller ones ran slower than the AVX-512 path: padding to whole tiles). Never depends on M or on the
// operands' layouts, so that every row of a product comes out the same whatever the batch or the path (few
// rows, B packed once, a step's columns).
constexpr int64_t kMinColumns = 128, kMinDepth = 128;
bool eligible(int64_t N, int64_t K);

constexpr int64_t kChunkValues = 3 * 512;  // one chunk (32 of K) of 16 lines: three parts, a tile each
inline int64_t chunks(int64_t K) { return (K + 31) / 32; }
// uint16 values of the parts of `lines` lines (rows of A, columns of B) over all of K.
inline int64_t parts_size(int64_t lines, int64_t K) { return (lines + 15) / 16 * chunks(K) * kChunkValues; }
inline int64_t block_size(int64_t K) { return chunks(K) * kChunkValues; }  // 16 lines' parts

// Columns [n0, n1) of B [K, N] into their blocks (n0 a multiple of 16; from N on, zeros up to the next 16);
// `parts` holds all of B's blocks, from column 0.
void split_columns(const MatrixRef<float>& B, int64_t K, int64_t N, int64_t n0, int64_t n1, uint16_t* parts);
// Rows [m0, m1) of A [M, K], columns [k0, k1), into `parts`: the place of row m0's block, in a layout whose
// blocks of 16 rows are `block` values apart and whose first chunk starts at k_first (a multiple of 32; 0 and
// block_size(K) for all of K). From M on, zero rows up to the next 16, and from K on zeros to the chunk's
// end. Any k range: the threads of a step each split their own units.
void split_rows(const MatrixRef<float>& A, int64_t M, int64_t K, int64_t m0, int64_t m1, int64_t k0, int64_t k1,
                uint16_t* parts, int64_t k_first, int64_t block);

// Loads the tile configuration tile_sums() uses on the calling thread: first in every call's work on a
// thread (tasks, a step's columns), since another library may have released or reconfigured the tiles there.
void configure_tiles();
// Back to the tiles' initial state at the end of that work, as other users of the tiles leave them: the system
// then saves no tile data at a switch of threads, and code that expects them released finds them so.
void release_tiles();

// The sums of a block of C (rows <= 32, cols <= 32) over `count` chunks of K: A's blocks of rows at `a` and
// a + a_next, B's blocks of columns at `b` and b + b_next (each at its first chunk), continued from `start`
// (the sums of the chunks before, in the same order) where given, into `sums`; both `ld` floats a row.
void tile_sums(const uint16_t* a, int64_t a_next, const uint16_t* b, int64_t b_next, int64_t count, int64_t rows,
               int64_t cols, const float* start, float* sums, int64_t ld);
// C[rows, cols] = alpha * sums, or alpha * sums + beta * C (beta == 0: C is not read).
void finish(const float* sums, int64_t ld, int64_t rows, int64_t cols, float alpha, float beta, float* C,
            int64_t ldc);
// Whether a block's sums are C as they stand (1 * s is s), so that tile_sums can store them into C directly,
// without finish()'s pass: a whole 32 x 32 tile, alpha 1 and beta 0 (5% of an LSTM's forward, B = 32).
inline bool stores_sums(int64_t rows, int64_t cols, float alpha, float beta) {
  return rows == 32 && cols == 32 && alpha == 1.f && beta == 0.f;
}
// Both over all of K: A's and B's parts in the layouts of all of K, from their first blocks. tile_sums and
// tile_product need configure_tiles() on the thread first.
void tile_product(const uint16_t* a, const uint16_t* b, int64_t K, int64_t rows, int64_t cols, float alpha,
                  float beta, float* C, int64_t ldc);

}  // namespace conveyor::cpu::amx
