// The prefill (T > 1) of the Qwen3.5 / Qwen3-Next Gated DeltaNet layer from its projections to the
// recurrence's inputs, in one launch: depthwise causal conv over the conv state and the new
// inputs, SiLU, split into q | k | v, and q/k L2 normalisation (Dk**-0.5 folded into q). Written as
// row-contiguous q, k, v, which the recurrence kernels read without a copy. The unfused path it
// must equal is mlx_gdn/models/layers.py (causal_conv, split, normalize_qk); at T = 1 the same math
// runs inside decode_layer.metal. The new conv state (the last K - 1 inputs) is a slice the caller
// takes.
//
// Inputs (InT is qkv's dtype; w is read through static_cast<float>):
//   qkv        [B, S, C]      InT   projection output, C = 2 * Hk * Dk + Hv * Dv (q | k | v)
//   conv_state [B, K - 1, C]  InT   the K - 1 inputs before this call's first
//   w          [C, K, 1]            depthwise conv weight (mlx Conv1d layout)
//   mask       [B, S] bool          only with GDN_MASKED: a masked input reads as zero, as the
//                                   unfused layer zeroes it before its conv
// Outputs: q, k [B, S, Hk, Dk] and v [B, S, Hv, Dv], InT.
// Template: InT, Dk, Dv, Hk, Hv, K, NT (threads per threadgroup, a multiple of 32).
// Grid (NT * (2 * Hk + Hv), S, B): threadgroup x takes one head's channels of token y of batch row
// z: q head x (x < Hk), k head x - Hk (x < 2 * Hk) or v head x - 2 * Hk. Thread i holds channels
// i, i + NT, ... of it; a q or k head's sum of squares goes through simd_sum and threadgroup memory.

constexpr int KEY_DIM = Hk * Dk;
constexpr int C = 2 * KEY_DIM + Hv * Dv;
constexpr int DMAX = Dk > Dv ? Dk : Dv;
constexpr int PER = (DMAX + NT - 1) / NT;

const int tid = static_cast<int>(thread_position_in_threadgroup.x);
const int blk = static_cast<int>(threadgroup_position_in_grid.x);
const int t = static_cast<int>(threadgroup_position_in_grid.y);
const int bi = static_cast<int>(threadgroup_position_in_grid.z);
const int S = qkv_shape[1];

const bool is_v = blk >= 2 * Hk;  // uniform over the threadgroup
const int D = is_v ? Dv : Dk;
const int c0 = is_v ? 2 * KEY_DIM + (blk - 2 * Hk) * Dv : blk * Dk;

threadgroup float part_tg[NT / 32];

float xs[PER];
float ss = 0.0f;
GDN_UNROLL
for (int p = 0; p < PER; ++p) {
  const int i = tid + p * NT;
  float r = 0.0f;
  if (i < D) {
    const int c = c0 + i;
    float acc = 0.0f;
    GDN_UNROLL
    for (int j = 0; j < K; ++j) {
      const int tau = t + j - (K - 1);  // the input this tap reads; before 0: the conv state
      float x_in;
      if (tau >= 0) {
        x_in = static_cast<float>(qkv[(static_cast<size_t>(bi) * S + tau) * C + c]);
#if GDN_MASKED
        x_in = mask[static_cast<size_t>(bi) * S + tau] ? x_in : 0.0f;
#endif
      } else {
        x_in = static_cast<float>(conv_state[(bi * (K - 1) + (K - 1) + tau) * C + c]);
      }
      acc += x_in * static_cast<float>(w[c * K + j]);
    }
    r = gdn_conv_silu<InT>(acc);
  }
  xs[p] = r;
  ss += r * r;
}

const size_t row = static_cast<size_t>(bi) * S + t;
if (is_v) {
  const int hv = blk - 2 * Hk;
  GDN_UNROLL
  for (int p = 0; p < PER; ++p) {
    const int i = tid + p * NT;
    if (i < Dv) {
      v[(row * Hv + hv) * Dv + i] = static_cast<InT>(xs[p]);
    }
  }
} else {
  ss = simd_sum(ss);
  if ((tid & 31) == 0) {
    part_tg[tid >> 5] = ss;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float tot = 0.0f;
  for (int i = 0; i < NT / 32; ++i) {
    tot += part_tg[i];
  }
  const bool is_q = blk < Hk;
  const int h = is_q ? blk : blk - Hk;
  const float r = is_q ? gdn_l2_inv(tot) / metal::sqrt(static_cast<float>(Dk)) : gdn_l2_inv(tot);
  device InT* out = is_q ? q : k;
  GDN_UNROLL
  for (int p = 0; p < PER; ++p) {
    const int i = tid + p * NT;
    if (i < Dk) {
      out[(row * Hk + h) * Dk + i] = static_cast<InT>(xs[p] * r);
    }
  }
}
