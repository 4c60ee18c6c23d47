// Stage kkt_solve of the CUDA chunked kernels (see common.cuh), its helpers: the cumulative
// log-decay of a chunk and T = (I + A)^-1. Its products (A = K K^T and Aqk = Q K^T with their
// decays) run inside launch 1 (wy.cuh), between the gates and the solve.
#ifndef GDN_CHUNKED_KKT_SOLVE_CUH
#define GDN_CHUNKED_KKT_SOLVE_CUH

namespace gdn_tc {

// Inclusive prefix sum of x over the 64 threads 0..63 (two warps), via `scratch[2]`.
__device__ __forceinline__ float scan64(float x, int tid, float* scratch) {
  const int lane = tid & 31;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const float o = __shfl_up_sync(0xffffffffu, x, d);
    if (lane >= d) x += o;
  }
  if (lane == 31 && tid < 64) scratch[tid >> 5] = x;
  __syncthreads();
  if (tid >= 32 && tid < 64) x += scratch[0];
  return x;
}


// Tiles T_ij with i - j = DIST of the blocked inverse below (sA holds M_ik = T_ii A_ik):
// T_ij = -sum_{k=j}^{i-1} M_ik T_kj. Each thread's elements are independent sums of a
// compile-time length, interleaved so that their loads and multiply-adds overlap.
template <int DIST, int LA>
__device__ __forceinline__ void solve_tiles(const float* sA, float* sT, int tid) {
  constexpr int BT = 16, PER = (4 - DIST) * BT * BT / NTHREADS;
  static_assert((4 - DIST) * BT * BT % NTHREADS == 0, "whole elements per thread");
  int arow[PER], tcol[PER], kk0[PER];
  float acc[PER];
#pragma unroll
  for (int q = 0; q < PER; ++q) {
    const int e = tid + q * NTHREADS, j = e / (BT * BT), r = (e / BT) % BT, c = e % BT;
    arow[q] = ((j + DIST) * BT + r) * LA;
    tcol[q] = j * BT + c;
    kk0[q] = j * BT;
    acc[q] = 0.0f;
  }
#pragma unroll
  for (int kk = 0; kk < DIST * BT; ++kk)
#pragma unroll
    for (int q = 0; q < PER; ++q) acc[q] = fmaf(sA[arow[q] + kk0[q] + kk], sT[(kk0[q] + kk) * LA + tcol[q]], acc[q]);
#pragma unroll
  for (int q = 0; q < PER; ++q) sT[arow[q] + tcol[q]] = -acc[q];
  __syncthreads();
}

// T = (I + A)^-1 for A strictly lower [C][LA] in shared memory (C = 64), into sT; sA is
// overwritten. Blocked in 16 x 16 tiles so that no thread runs a long dependent chain:
// diagonal tiles by forward substitution (one column per thread, 16 rows), then
// M_ik = T_ii A_ik for every tile below the diagonal, then tile diagonals d = 1, 2, 3 in order:
// T_ij = -sum_{k=j}^{i-1} M_ik T_kj. All 128 threads; ends with a barrier.
template <int LA>
__device__ __forceinline__ void invert_unit_lower(float* sA, float* sT, int tid) {
  constexpr int BT = 16;
  if (tid < 4 * BT) {
    const int d = tid / BT, c = tid % BT, o = d * BT;
    float x[BT];
#pragma unroll
    for (int i = 0; i < BT; ++i) {
      float acc = i == c ? 1.0f : 0.0f;
#pragma unroll
      for (int j = 0; j < i; ++j) acc = fmaf(-sA[(o + i) * LA + o + j], x[j], acc);
      x[i] = acc;
    }
#pragma unroll
    for (int i = 0; i < BT; ++i) sT[(o + i) * LA + o + c] = x[i];
  } else {
    // Tiles above the diagonal are zero.
    for (int e = tid - 4 * BT; e < 6 * BT * BT; e += NTHREADS - 4 * BT) {
      const int blk = e / (BT * BT), r = (e / BT) % BT, c = e % BT;
      const int bi = blk < 3 ? 0 : (blk < 5 ? 1 : 2), bj = blk < 3 ? blk + 1 : (blk < 5 ? blk - 1 : 3);
      sT[(bi * BT + r) * LA + bj * BT + c] = 0.0f;
    }
  }
  __syncthreads();
  // Tiles below the diagonal, (i, k) = (1,0) (2,0) (3,0) (2,1) (3,1) (3,2): M_ik = T_ii A_ik.
  constexpr int PER = 6 * BT * BT / NTHREADS;
  float m[PER];
#pragma unroll
  for (int q = 0; q < PER; ++q) {
    const int e = tid + q * NTHREADS, blk = e / (BT * BT), r = (e / BT) % BT, c = e % BT;
    const int bi = blk < 3 ? blk + 1 : (blk < 5 ? blk - 1 : 3), bk = blk < 3 ? 0 : (blk < 5 ? 1 : 2);
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < BT; ++j) acc = fmaf(sT[(bi * BT + r) * LA + bi * BT + j], sA[(bi * BT + j) * LA + bk * BT + c], acc);
    m[q] = acc;
  }
  __syncthreads();
#pragma unroll
  for (int q = 0; q < PER; ++q) {
    const int e = tid + q * NTHREADS, blk = e / (BT * BT), r = (e / BT) % BT, c = e % BT;
    const int bi = blk < 3 ? blk + 1 : (blk < 5 ? blk - 1 : 3), bk = blk < 3 ? 0 : (blk < 5 ? 1 : 2);
    sA[(bi * BT + r) * LA + bk * BT + c] = m[q];
  }
  __syncthreads();
  solve_tiles<1, LA>(sA, sT, tid);
  solve_tiles<2, LA>(sA, sT, tid);
  solve_tiles<3, LA>(sA, sT, tid);
}

}  // namespace gdn_tc

#endif  // GDN_CHUNKED_KKT_SOLVE_CUH
