// Fused attention forward, FlashAttention-2 style, on tensor cores (fp16/bf16; fp32 goes to attention_simt.cu).
//
// One block = 64 query rows of one (batch, head), 4 warps x 16 rows. It streams 64-key tiles of K and V through
// shared memory (cp.async: V[j] loads while S = Q K[j]^T runs, K[j+1] while O += P V[j] runs) and keeps S, P and
// the output accumulator in registers. Online softmax in the log2 domain: t = s * scale * log2(e), running max
// m and sum l per row, O rescaled by exp2(m_old - m_new) when the max grows; padded keys get t = -inf (a select,
// not an additive bias) and a row with no real key keeps m = -inf, is shifted by 0, and ends with l = 0: out 0,
// lse -inf. Key tiles past the last real key are skipped. Dropout multiplies P by the Philox keep mask (the
// attention mapping of launchers.h) after l has been accumulated, and 1/(1-p) is folded into the final 1/l.
// Varlen (kVarlen): the block reads its sequence's start and length from cu_seqlens, and a block whose query tile
// lies past its sequence's end (the grid is sized by max_seqlen) exits before loading anything.
#include "attention.cuh"

namespace fastbert {
namespace cuda {
namespace {

constexpr int kFwdBr = 64, kFwdBc = 64, kFwdThreads = 128;

template <typename T, int DP>
constexpr int fwd_smem_bytes() {
  return (kFwdBr + 2 * kFwdBc) * (DP + 8) * static_cast<int>(sizeof(T)) + kFwdBc * static_cast<int>(sizeof(float));
}

template <typename T, int DP, bool kVarlen>
__global__ void __launch_bounds__(kFwdThreads, 1) attn_fwd_mma_kernel(const AttnParams p) {
  constexpr int Br = kFwdBr, Bc = kFwdBc, LD = DP + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Br * LD;
  T* sV = sK + Bc * LD;
  float* sKeyOk = reinterpret_cast<float*>(sV + Bc * LD);  // 1 = real key, 0 = padding / past the end

  const int nqt = (p.Tq + Br - 1) / Br;
  const int qt = static_cast<int>(blockIdx.x % nqt), bh = static_cast<int>(blockIdx.x / nqt);
  const int b = bh / p.H, h = bh % p.H, q0 = qt * Br;
  const SeqSlice seq = seq_slice<kVarlen>(p, b, h);
  if (q0 >= seq.tq) return;  // varlen only: past this sequence's end (uniform over the block)
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + seq.row0 * p.q_st;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + seq.row0 * p.k_st;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + seq.row0 * p.v_st;
  const uint8_t* mrow = p.mask == nullptr ? nullptr : p.mask + b * p.mask_stride_b;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;

  const int kv_len = block_kv_len(mrow, seq.tk);
  const int n_tiles = (kv_len + Bc - 1) / Bc;
  load_tile<T, Br, DP, LD, kFwdThreads>(sQ, qg, p.q_st, q0, seq.tq, p.D, p.vec_ok);
  if (n_tiles > 0) {
    load_tile<T, Bc, DP, LD, kFwdThreads>(sK, kg, p.k_st, 0, seq.tk, p.D, p.vec_ok);
    if (threadIdx.x < Bc) sKeyOk[threadIdx.x] = key_ok(mrow, threadIdx.x, seq.tk) ? 1.0f : 0.0f;
  }
  cp_async_commit();

  float o[DP / 8][4];
#pragma unroll
  for (int i = 0; i < DP / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const uint32_t qblock = static_cast<uint32_t>((q0 >> 4) + warp);

  for (int j = 0; j < n_tiles; ++j) {
    cp_async_wait_all();
    __syncthreads();  // K[j] and its key flags visible; every warp is done with V[j-1]
    load_tile<T, Bc, DP, LD, kFwdThreads>(sV, vg, p.v_st, j * Bc, seq.tk, p.D, p.vec_ok);
    cp_async_commit();

    // S = Q K^T for this warp's 16 rows x 64 keys.
    float s[Bc / 8][4];
#pragma unroll
    for (int i = 0; i < Bc / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      uint32_t a[4];
      ldsm_x4(a, sQ + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < Bc / 16; ++np) {
        uint32_t bb[4];
        ldsm_x4(bb, sK + (np * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
        mma_16816<T>(s[2 * np], a, bb[0], bb[1]);
        mma_16816<T>(s[2 * np + 1], a, bb[2], bb[3]);
      }
    }

    // Online softmax (rows g and g + 8 of the warp; a row's 64 keys live in the 4 lanes of a quad).
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < Bc / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bool ok = sKeyOk[nt * 8 + 2 * t4 + (i & 1)] != 0.0f;
        s[nt][i] = ok ? s[nt][i] * p.scale_log2 : -INFINITY;
        mx[i >> 1] = fmaxf(mx[i >> 1], s[nt][i]);
      }
    }
    float shift[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);
      shift[r] = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f(m[r] - shift[r]);  // 0 while the row has seen no real key
      m[r] = m_new;
      l[r] *= alpha;
#pragma unroll
      for (int i = 0; i < DP / 8; ++i) {
        o[i][2 * r] *= alpha;
        o[i][2 * r + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nt = 0; nt < Bc / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[nt][i] = exp2f(s[nt][i] - shift[i >> 1]);
        l[i >> 1] += s[nt][i];
      }
    }
    if (p.dropout) {
#pragma unroll
      for (int kb = 0; kb < Bc / 16; ++kb) {
        const Philox4 rnd = attn_philox(p.seed, bh, qblock, static_cast<uint32_t>(((j * Bc) >> 4) + kb), g & 1,
                                        g >> 1, t4);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int slot = (i >> 1) * 4 + half * 2 + (i & 1);
            if (philox_u16(rnd, slot) < p.thr16) s[2 * kb + half][i] = 0.0f;
          }
        }
      }
    }

    cp_async_wait_all();
    __syncthreads();  // V[j] visible; every warp is done with K[j]
    if (j + 1 < n_tiles) {
      load_tile<T, Bc, DP, LD, kFwdThreads>(sK, kg, p.k_st, (j + 1) * Bc, seq.tk, p.D, p.vec_ok);
      if (threadIdx.x < Bc) {
        sKeyOk[threadIdx.x] = key_ok(mrow, (j + 1) * Bc + static_cast<int>(threadIdx.x), seq.tk) ? 1.0f : 0.0f;
      }
    }
    cp_async_commit();

    // O += P V: the S accumulators of key tiles 2kk, 2kk+1 are the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < Bc / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < DP / 16; ++dp) {
        uint32_t bb[4];
        ldsm_x4_trans(bb, sV + (kk * 16 + (lane & 15)) * LD + dp * 16 + (lane >> 4) * 8);
        mma_16816<T>(o[2 * dp], a, bb[0], bb[1]);
        mma_16816<T>(o[2 * dp + 1], a, bb[2], bb[3]);
      }
    }
  }
  cp_async_wait_all();
  __syncthreads();  // with no key tile, other threads' Q copies may still be landing in the staging rows below

  // Finalize: the quad holds partial row sums; out = O / l (0 when l = 0), lse = (m + log2 l) * ln 2.
  float inv[2], lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    inv[r] = l[r] > 0.0f ? p.keep_scale / l[r] : 0.0f;
    lse[r] = l[r] > 0.0f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
  }
  // The warp's own 16 rows of sQ (read only by this warp) stage the output for 16-byte stores.
  T* sO = sQ + warp * 16 * LD;
#pragma unroll
  for (int nt = 0; nt < DP / 8; ++nt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      *reinterpret_cast<uint32_t*>(sO + (g + 8 * r) * LD + nt * 8 + 2 * t4) =
          pack2<T>(o[nt][2 * r] * inv[r], o[nt][2 * r + 1] * inv[r]);
    }
  }
  __syncwarp();
  T* og = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + seq.row0 * p.o_st;
  store_tile<T, 16, DP, LD, 32>(og, p.o_st, sO, q0 + warp * 16, seq.tq, p.D, p.vec_ok, lane);
  if (t4 == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int q = q0 + warp * 16 + g + 8 * r;
      if (q < seq.tq) p.lse[seq.stat0 + q] = lse[r];
    }
  }
}

template <typename T, int DP, bool kVarlen>
cudaError_t launch_fwd_mma(const AttnParams& p, int64_t blocks, cudaStream_t stream) {
  constexpr int kSmem = fwd_smem_bytes<T, DP>();
  static_assert(smem_fits_every_arch<kSmem>(), "attention forward tiles exceed the per-block shared memory limit");
  const cudaError_t err = set_max_dynamic_smem(attn_fwd_mma_kernel<T, DP, kVarlen>, kSmem);
  if (err != cudaSuccess) return err;
  attn_fwd_mma_kernel<T, DP, kVarlen><<<static_cast<unsigned>(blocks), kFwdThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int DP>
cudaError_t launch_fwd_mma(const AttnParams& p, int64_t blocks, cudaStream_t stream) {
  return p.cu_seqlens != nullptr ? launch_fwd_mma<T, DP, true>(p, blocks, stream)
                                 : launch_fwd_mma<T, DP, false>(p, blocks, stream);
}

template <typename T>
cudaError_t launch_fwd_mma_dim(const AttnParams& p, cudaStream_t stream) {
  const int64_t blocks = ceil_div(p.Tq, kFwdBr) * p.B * p.H;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  switch (attn_padded_dim(p.D)) {
    case 16: return launch_fwd_mma<T, 16>(p, blocks, stream);
    case 32: return launch_fwd_mma<T, 32>(p, blocks, stream);
    case 64: return launch_fwd_mma<T, 64>(p, blocks, stream);
    default: return launch_fwd_mma<T, 128>(p, blocks, stream);
  }
}

}  // namespace

cudaError_t launch_attn_fwd(const AttnParams& p, FastbertDType dtype, cudaStream_t stream) {
  switch (dtype) {
    case FASTBERT_FLOAT16: return launch_fwd_mma_dim<__half>(p, stream);
    case FASTBERT_BFLOAT16: return launch_fwd_mma_dim<__nv_bfloat16>(p, stream);
    default: return launch_attn_fwd_simt(p, stream);
  }
}

}  // namespace cuda
}  // namespace fastbert
