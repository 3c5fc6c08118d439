// Shared pieces of the fused attention kernels (attention_fwd.cu, attention_bwd.cu, attention_simt.cu): the
// parameter block (padded batch or packed varlen sequences), tensor-core primitives (mma.sync m16n8k16, ldmatrix,
// cp.async) and global->shared tile loads.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 * g + t:
//   A (16x16, row-major):   a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, k x n):        b0 = (k = 2t..2t+1, n = g), b1 = (k = 2t+8.., n = g)
//   C/D (16x8, fp32):       c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
// so the accumulators of two adjacent n-tiles are, once packed to 16 bits, the A fragment of the next product
// (P = softmax(S) feeds P V without leaving registers, as in FlashAttention-2).
#pragma once

#include "common.cuh"

namespace fastbert {
namespace cuda {

struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  const void* out_in;  // bwd: the forward output (delta = rowsum(dout * out))
  const void* dout;
  void* out;
  void* dq;
  void* dk;
  void* dv;
  float* lse;            // fwd output (B, H, Tq)
  const float* lse_in;   // bwd input
  float* delta;          // bwd scratch (B, H, Tq); varlen: (H, total)
  const uint8_t* mask;   // (B, Tk) nonzero = real key; nullable (always null in varlen mode)
  int64_t mask_stride_b;
  // Varlen (packed) mode: B sequences back to back along the token dimension, sequence b at tokens
  // cu_seqlens[b] .. cu_seqlens[b + 1]; Tq = Tk = max_seqlen only size the grid, batch strides are 0, and lse /
  // delta are (H, total). nullptr: the padded (B, T, H, D) layout.
  const int32_t* cu_seqlens;
  int64_t total;
  int64_t q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh;
  int64_t o_sb, o_st, o_sh, do_sb, do_st, do_sh;
  int64_t dq_sb, dq_st, dq_sh, dk_sb, dk_st, dk_sh, dv_sb, dv_st, dv_sh;
  int B, H, Tq, Tk, D;
  float scale, scale_log2;
  bool dropout;
  float keep_scale;
  uint32_t thr16;
  uint64_t seed;
  bool vec_ok;  // every tensor pointer 16-byte aligned and every stride a multiple of 16 bytes
};

// --------------------------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+).

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two fp32 values -> one 32-bit register of T (lo in the low half: the lower column index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// 16-byte asynchronous copy; src_bytes = 0 writes zeros (rows past the sequence end, padded head dims).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// --------------------------------------------------------------------------------------------------------------
// Tiles. load_tile copies rows [row0, row0 + ROWS) of a (seqlen, headdim) slice (row stride `stride` elements)
// into shared memory laid out [ROWS][LD]; rows >= nrows and columns >= d (up to the padded DP) become zeros.
// vec: cp.async 16-byte chunks (d % 8 == 0 for 16-bit types, d % 4 == 0 for fp32); otherwise element loads.

template <typename T, int ROWS, int DP, int LD, int NTHREADS>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t stride, int row0, int nrows, int d,
                                          bool vec) {
  constexpr int kPer = 16 / sizeof(T), kChunks = DP / kPer;
  if (vec) {
    for (int i = threadIdx.x; i < ROWS * kChunks; i += NTHREADS) {
      const int r = i / kChunks, ch = i % kChunks;
      const bool ok = row0 + r < nrows && ch * kPer < d;
      const T* src = ok ? g + static_cast<int64_t>(row0 + r) * stride + ch * kPer : g;
      cp_async_16(smem + r * LD + ch * kPer, src, ok ? 16 : 0);
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * DP; i += NTHREADS) {
      const int r = i / DP, c = i % DP;
      const bool ok = row0 + r < nrows && c < d;
      smem[r * LD + c] = ok ? g[static_cast<int64_t>(row0 + r) * stride + c] : from_f32<T>(0.0f);
    }
  }
}

// Store rows [0, ROWS) of a shared [ROWS][LD] tile to global rows row0.. (< nrows), columns < d.
// Called by one warp (lane) for its own rows, or by the block (NTHREADS, tid).
template <typename T, int ROWS, int DP, int LD, int NTHREADS>
__device__ __forceinline__ void store_tile(T* g, int64_t stride, const T* smem, int row0, int nrows, int d,
                                           bool vec, int tid) {
  constexpr int kPer = 16 / sizeof(T), kChunks = DP / kPer;
  if (vec) {
    for (int i = tid; i < ROWS * kChunks; i += NTHREADS) {
      const int r = i / kChunks, ch = i % kChunks;
      if (row0 + r < nrows && ch * kPer < d) {
        *reinterpret_cast<uint4*>(g + static_cast<int64_t>(row0 + r) * stride + ch * kPer) =
            *reinterpret_cast<const uint4*>(smem + r * LD + ch * kPer);
      }
    }
  } else {
    for (int i = tid; i < ROWS * DP; i += NTHREADS) {
      const int r = i / DP, c = i % DP;
      if (row0 + r < nrows && c < d) g[static_cast<int64_t>(row0 + r) * stride + c] = smem[r * LD + c];
    }
  }
}

// One past the last real key of this batch row (0 when every key is padding; seqlen_k without a mask). Key
// tiles past it contribute nothing and are skipped. Every thread of the block must call it.
__device__ __forceinline__ int block_kv_len(const uint8_t* mrow, int Tk) {
  if (mrow == nullptr) return Tk;
  __shared__ int s_last[32];
  int last = -1;
  for (int k = threadIdx.x; k < Tk; k += blockDim.x) {
    if (mrow[k] != 0) last = k;
  }
  last = __reduce_max_sync(0xffffffffu, last);
  if ((threadIdx.x & 31) == 0) s_last[threadIdx.x >> 5] = last;
  __syncthreads();
  int result = -1;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) result = max(result, s_last[w]);
  return result + 1;
}

// The rows one block works on: sequence (batch row) b, head h. row0 is the sequence's first token along the token
// dimension (0 unless packed), tq / tk its query / key counts, stat0 the index of its first query in lse / delta.
// The varlen case is a template flag so that the padded kernels keep reading Tq / Tk from the parameter bank
// instead of holding them in registers (the dK/dV kernel at head dim 128 has no register to spare).
struct SeqSlice {
  int64_t row0;
  int64_t stat0;
  int tq, tk;
};

template <bool kVarlen>
__device__ __forceinline__ SeqSlice seq_slice(const AttnParams& p, int b, int h) {
  if constexpr (kVarlen) {
    const int start = __ldg(p.cu_seqlens + b), len = __ldg(p.cu_seqlens + b + 1) - start;
    return SeqSlice{start, static_cast<int64_t>(h) * p.total + start, len, len};
  } else {
    return SeqSlice{0, (static_cast<int64_t>(b) * p.H + h) * p.Tq, p.Tq, p.Tk};
  }
}

// Whether key k (< Tk) is real.
__device__ __forceinline__ bool key_ok(const uint8_t* mrow, int k, int Tk) {
  return k < Tk && (mrow == nullptr || mrow[k] != 0);
}

// Padded head dim: the kernel instance that serves headdim d.
inline int attn_padded_dim(int64_t d) { return d <= 16 ? 16 : d <= 32 ? 32 : d <= 64 ? 64 : 128; }

// --------------------------------------------------------------------------------------------------------------
// Internal launchers: p fully filled and checked by the C API (attention_api.cu). fwd: attention_fwd.cu, bwd:
// attention_bwd.cu (fp16/bf16 on tensor cores), fp32 SIMT kernels: attention_simt.cu.
cudaError_t launch_attn_fwd(const AttnParams& p, FastbertDType dtype, cudaStream_t stream);
cudaError_t launch_attn_bwd(const AttnParams& p, FastbertDType dtype, cudaStream_t stream);
cudaError_t launch_attn_fwd_simt(const AttnParams& p, cudaStream_t stream);
cudaError_t launch_attn_bwd_simt(const AttnParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastbert
