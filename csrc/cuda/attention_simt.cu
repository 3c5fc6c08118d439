// fp32 attention on CUDA cores (no tensor cores, no TF32: fp32 must match transformers to ~1e-6), forward and
// backward, the same algorithms as the tensor-core kernels in a simpler form. 256 threads, 32x32 tiles staged in
// padded shared memory ([32][DP + 1]: conflict-free column walks). Thread (r = tid / 8, c = tid % 8) computes the
// scores of row r against keys 4c .. 4c + 3 (one Philox call covers a key pair) and owns output columns c + 8i.
// Varlen (kVarlen): as in the tensor-core kernels (the sequence's extent from cu_seqlens, early exit past it).
#include "attention.cuh"

namespace fastbert {
namespace cuda {
namespace {

constexpr int kT = 32, kThreads = 256;

// rows [row0, row0 + 32) of a (seqlen, headdim) fp32 slice into s[32][DP + 1]; zeros past nrows / d.
template <int DP>
__device__ __forceinline__ void load_tile_f32(float* s, const float* g, int64_t stride, int row0, int nrows, int d,
                                              bool vec) {
  constexpr int LDF = DP + 1;
  if (vec) {
    for (int i = threadIdx.x; i < kT * (DP / 4); i += kThreads) {
      const int r = i / (DP / 4), c = (i % (DP / 4)) * 4;
      float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (row0 + r < nrows && c < d) v = *reinterpret_cast<const float4*>(g + static_cast<int64_t>(row0 + r) * stride + c);
      s[r * LDF + c] = v.x;
      s[r * LDF + c + 1] = v.y;
      s[r * LDF + c + 2] = v.z;
      s[r * LDF + c + 3] = v.w;
    }
  } else {
    for (int i = threadIdx.x; i < kT * DP; i += kThreads) {
      const int r = i / DP, c = i % DP;
      s[r * LDF + c] = row0 + r < nrows && c < d ? g[static_cast<int64_t>(row0 + r) * stride + c] : 0.0f;
    }
  }
}

// dot(a[0:DP], b[0:DP]) of two padded shared rows.
template <int DP>
__device__ __forceinline__ float dot_row(const float* a, const float* b) {
  float acc = 0.0f;
#pragma unroll 16
  for (int d = 0; d < DP; ++d) acc = fmaf(a[d], b[d], acc);
  return acc;
}

// Keep flags of (query q, keys k, k + 1), k even: one Philox call (they share the counter, see common.cuh).
__device__ __forceinline__ void keep_pair(const AttnParams& p, int bh, int q, int k, bool (&keep)[2]) {
  const uint32_t ql = q & 15, kl = k & 15;
  const Philox4 r = attn_philox(p.seed, bh, q >> 4, k >> 4, ql & 1, (ql & 7) >> 1, (kl & 7) >> 1);
  const int slot = (ql >> 3) * 4 + (kl >> 3) * 2;
  keep[0] = philox_u16(r, slot) >= p.thr16;
  keep[1] = philox_u16(r, slot + 1) >= p.thr16;
}

template <int DP>
constexpr int simt_fwd_smem() {
  return (3 * kT * (DP + 1) + kT * (kT + 1) + kT) * static_cast<int>(sizeof(float));
}

template <int DP, bool kVarlen>
__global__ void __launch_bounds__(kThreads, 1) attn_fwd_simt_kernel(const AttnParams p) {
  constexpr int LDF = DP + 1, kCols = DP / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sQ = reinterpret_cast<float*>(smem_raw);
  float* sK = sQ + kT * LDF;
  float* sV = sK + kT * LDF;
  float* sP = sV + kT * LDF;  // [32][33]
  float* sKeyOk = sP + kT * (kT + 1);

  const int nqt = (p.Tq + kT - 1) / kT;
  const int qt = static_cast<int>(blockIdx.x % nqt), bh = static_cast<int>(blockIdx.x / nqt);
  const int b = bh / p.H, h = bh % p.H, q0 = qt * kT;
  const SeqSlice seq = seq_slice<kVarlen>(p, b, h);
  if (q0 >= seq.tq) return;  // varlen only: past this sequence's end
  const int r = threadIdx.x >> 3, c = threadIdx.x & 7, q = q0 + r;
  const uint8_t* mrow = p.mask == nullptr ? nullptr : p.mask + b * p.mask_stride_b;
  const float* kg = static_cast<const float*>(p.k) + b * p.k_sb + h * p.k_sh + seq.row0 * p.k_st;
  const float* vg = static_cast<const float*>(p.v) + b * p.v_sb + h * p.v_sh + seq.row0 * p.v_st;

  const int kv_len = block_kv_len(mrow, seq.tk);
  load_tile_f32<DP>(sQ, static_cast<const float*>(p.q) + b * p.q_sb + h * p.q_sh + seq.row0 * p.q_st, p.q_st, q0,
                    seq.tq, p.D, p.vec_ok);
  float o[kCols];
#pragma unroll
  for (int i = 0; i < kCols; ++i) o[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;

  for (int k0 = 0; k0 < kv_len; k0 += kT) {
    __syncthreads();  // previous tile fully consumed
    load_tile_f32<DP>(sK, kg, p.k_st, k0, seq.tk, p.D, p.vec_ok);
    load_tile_f32<DP>(sV, vg, p.v_st, k0, seq.tk, p.D, p.vec_ok);
    if (threadIdx.x < kT) sKeyOk[threadIdx.x] = key_ok(mrow, k0 + threadIdx.x, seq.tk) ? 1.0f : 0.0f;
    __syncthreads();
    float t[4];
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int kk = 4 * c + j;
      t[j] = sKeyOk[kk] != 0.0f ? dot_row<DP>(sQ + r * LDF, sK + kk * LDF) * p.scale_log2 : -INFINITY;
      mx = fmaxf(mx, t[j]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
    const float m_new = fmaxf(m, mx), shift = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = exp2f(m - shift);
    m = m_new;
    l *= alpha;
#pragma unroll
    for (int i = 0; i < kCols; ++i) o[i] *= alpha;
    bool keep[4] = {true, true, true, true};
    if (p.dropout) {
      bool k2[2];
      keep_pair(p, bh, q, k0 + 4 * c, k2);
      keep[0] = k2[0], keep[1] = k2[1];
      keep_pair(p, bh, q, k0 + 4 * c + 2, k2);
      keep[2] = k2[0], keep[3] = k2[1];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float pr = exp2f(t[j] - shift);
      l += pr;
      sP[r * (kT + 1) + 4 * c + j] = keep[j] ? pr : 0.0f;
    }
    __syncwarp();  // a row's 8 threads are in one warp
#pragma unroll 4
    for (int kk = 0; kk < kT; ++kk) {
      const float pk = sP[r * (kT + 1) + kk];
#pragma unroll
      for (int i = 0; i < kCols; ++i) o[i] = fmaf(pk, sV[kk * LDF + c + 8 * i], o[i]);
    }
  }
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  l += __shfl_xor_sync(0xffffffffu, l, 4);
  if (q < seq.tq) {
    const float inv = l > 0.0f ? p.keep_scale / l : 0.0f;
    float* og = static_cast<float*>(p.out) + b * p.o_sb + (seq.row0 + q) * p.o_st + h * p.o_sh;
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      if (c + 8 * i < p.D) og[c + 8 * i] = o[i] * inv;
    }
    if (c == 0) p.lse[seq.stat0 + q] = l > 0.0f ? (m + log2f(l)) * kLn2 : -INFINITY;
  }
}

template <int DP>
constexpr int simt_dkdv_smem() {
  return (4 * kT * (DP + 1) + 2 * kT * (kT + 1) + 2 * kT) * static_cast<int>(sizeof(float));
}

// One block per 32 keys, looping over 32-query tiles: P, dP, dS per (query r, keys 4c..) into shared memory,
// then thread (key r, columns c + 8i) accumulates dV += P^T dO and dK += dS^T Q.
template <int DP, bool kVarlen>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_dkdv_simt_kernel(const AttnParams p) {
  constexpr int LDF = DP + 1, kCols = DP / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sK = reinterpret_cast<float*>(smem_raw);
  float* sV = sK + kT * LDF;
  float* sQ = sV + kT * LDF;
  float* sdO = sQ + kT * LDF;
  float* sP = sdO + kT * LDF;      // [query][key], P * keep
  float* sS = sP + kT * (kT + 1);  // [query][key], dS
  float* sLse = sS + kT * (kT + 1);
  float* sDelta = sLse + kT;

  const int nkt = (p.Tk + kT - 1) / kT;
  const int kt = static_cast<int>(blockIdx.x % nkt), bh = static_cast<int>(blockIdx.x / nkt);
  const int b = bh / p.H, h = bh % p.H, k0 = kt * kT;
  const SeqSlice seq = seq_slice<kVarlen>(p, b, h);
  if (k0 >= seq.tk) return;  // varlen only: past this sequence's end, no gradient row to write
  const int r = threadIdx.x >> 3, c = threadIdx.x & 7;
  const uint8_t* mrow = p.mask == nullptr ? nullptr : p.mask + b * p.mask_stride_b;
  const float* qg = static_cast<const float*>(p.q) + b * p.q_sb + h * p.q_sh + seq.row0 * p.q_st;
  const float* dog = static_cast<const float*>(p.dout) + b * p.do_sb + h * p.do_sh + seq.row0 * p.do_st;

  const int kv_len = block_kv_len(mrow, seq.tk);
  const int q_end = k0 < kv_len ? seq.tq : 0;  // a tile of padding only: zero gradients
  load_tile_f32<DP>(sK, static_cast<const float*>(p.k) + b * p.k_sb + h * p.k_sh + seq.row0 * p.k_st, p.k_st, k0,
                    seq.tk, p.D, p.vec_ok);
  load_tile_f32<DP>(sV, static_cast<const float*>(p.v) + b * p.v_sb + h * p.v_sh + seq.row0 * p.v_st, p.v_st, k0,
                    seq.tk, p.D, p.vec_ok);
  bool key_real[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) key_real[j] = key_ok(mrow, k0 + 4 * c + j, seq.tk);
  float dk[kCols], dv[kCols];
#pragma unroll
  for (int i = 0; i < kCols; ++i) dk[i] = dv[i] = 0.0f;

  for (int qs = 0; qs < q_end; qs += kT) {
    __syncthreads();
    load_tile_f32<DP>(sQ, qg, p.q_st, qs, seq.tq, p.D, p.vec_ok);
    load_tile_f32<DP>(sdO, dog, p.do_st, qs, seq.tq, p.D, p.vec_ok);
    if (threadIdx.x < kT) {
      const int q = qs + threadIdx.x;
      const float lse = q < seq.tq ? p.lse_in[seq.stat0 + q] : -INFINITY;
      sLse[threadIdx.x] = lse == -INFINITY ? INFINITY : lse * kLog2e;
      sDelta[threadIdx.x] = q < seq.tq ? p.delta[seq.stat0 + q] : 0.0f;
    }
    __syncthreads();
    bool keep[4] = {true, true, true, true};
    if (p.dropout) {
      bool k2[2];
      keep_pair(p, bh, qs + r, k0 + 4 * c, k2);
      keep[0] = k2[0], keep[1] = k2[1];
      keep_pair(p, bh, qs + r, k0 + 4 * c + 2, k2);
      keep[2] = k2[0], keep[3] = k2[1];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int kk = 4 * c + j;
      const float s = dot_row<DP>(sQ + r * LDF, sK + kk * LDF);
      const float pr = key_real[j] ? exp2f(s * p.scale_log2 - sLse[r]) : 0.0f;
      const float dp = keep[j] ? dot_row<DP>(sdO + r * LDF, sV + kk * LDF) * p.keep_scale : 0.0f;
      sP[r * (kT + 1) + kk] = keep[j] ? pr : 0.0f;
      sS[r * (kT + 1) + kk] = pr * (dp - sDelta[r]);
    }
    __syncthreads();
#pragma unroll 4
    for (int qq = 0; qq < kT; ++qq) {
      const float pk = sP[qq * (kT + 1) + r], ds = sS[qq * (kT + 1) + r];
#pragma unroll
      for (int i = 0; i < kCols; ++i) {
        dv[i] = fmaf(pk, sdO[qq * LDF + c + 8 * i], dv[i]);
        dk[i] = fmaf(ds, sQ[qq * LDF + c + 8 * i], dk[i]);
      }
    }
  }
  const int key = k0 + r;
  if (key < seq.tk) {
    float* dkg = static_cast<float*>(p.dk) + b * p.dk_sb + (seq.row0 + key) * p.dk_st + h * p.dk_sh;
    float* dvg = static_cast<float*>(p.dv) + b * p.dv_sb + (seq.row0 + key) * p.dv_st + h * p.dv_sh;
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      if (c + 8 * i < p.D) {
        dkg[c + 8 * i] = dk[i] * p.scale;
        dvg[c + 8 * i] = dv[i] * p.keep_scale;
      }
    }
  }
}

template <int DP>
constexpr int simt_dq_smem() {
  return (4 * kT * (DP + 1) + kT * (kT + 1) + kT) * static_cast<int>(sizeof(float));
}

// One block per 32 queries, looping over 32-key tiles: dS per (query r, keys 4c..), then dQ += dS K.
template <int DP, bool kVarlen>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_dq_simt_kernel(const AttnParams p) {
  constexpr int LDF = DP + 1, kCols = DP / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sQ = reinterpret_cast<float*>(smem_raw);
  float* sdO = sQ + kT * LDF;
  float* sK = sdO + kT * LDF;
  float* sV = sK + kT * LDF;
  float* sS = sV + kT * LDF;  // [32][33]
  float* sKeyOk = sS + kT * (kT + 1);

  const int nqt = (p.Tq + kT - 1) / kT;
  const int qt = static_cast<int>(blockIdx.x % nqt), bh = static_cast<int>(blockIdx.x / nqt);
  const int b = bh / p.H, h = bh % p.H, q0 = qt * kT;
  const SeqSlice seq = seq_slice<kVarlen>(p, b, h);
  if (q0 >= seq.tq) return;  // varlen only: past this sequence's end
  const int r = threadIdx.x >> 3, c = threadIdx.x & 7, q = q0 + r;
  const uint8_t* mrow = p.mask == nullptr ? nullptr : p.mask + b * p.mask_stride_b;
  const float* kg = static_cast<const float*>(p.k) + b * p.k_sb + h * p.k_sh + seq.row0 * p.k_st;
  const float* vg = static_cast<const float*>(p.v) + b * p.v_sb + h * p.v_sh + seq.row0 * p.v_st;

  const int kv_len = block_kv_len(mrow, seq.tk);
  load_tile_f32<DP>(sQ, static_cast<const float*>(p.q) + b * p.q_sb + h * p.q_sh + seq.row0 * p.q_st, p.q_st, q0,
                    seq.tq, p.D, p.vec_ok);
  load_tile_f32<DP>(sdO, static_cast<const float*>(p.dout) + b * p.do_sb + h * p.do_sh + seq.row0 * p.do_st, p.do_st,
                    q0, seq.tq, p.D, p.vec_ok);
  const float lse = q < seq.tq ? p.lse_in[seq.stat0 + q] : -INFINITY;
  const float lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;
  const float delta = q < seq.tq ? p.delta[seq.stat0 + q] : 0.0f;
  float dq[kCols];
#pragma unroll
  for (int i = 0; i < kCols; ++i) dq[i] = 0.0f;

  for (int k0 = 0; k0 < kv_len; k0 += kT) {
    __syncthreads();
    load_tile_f32<DP>(sK, kg, p.k_st, k0, seq.tk, p.D, p.vec_ok);
    load_tile_f32<DP>(sV, vg, p.v_st, k0, seq.tk, p.D, p.vec_ok);
    if (threadIdx.x < kT) sKeyOk[threadIdx.x] = key_ok(mrow, k0 + threadIdx.x, seq.tk) ? 1.0f : 0.0f;
    __syncthreads();
    bool keep[4] = {true, true, true, true};
    if (p.dropout) {
      bool k2[2];
      keep_pair(p, bh, q, k0 + 4 * c, k2);
      keep[0] = k2[0], keep[1] = k2[1];
      keep_pair(p, bh, q, k0 + 4 * c + 2, k2);
      keep[2] = k2[0], keep[3] = k2[1];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int kk = 4 * c + j;
      const float s = dot_row<DP>(sQ + r * LDF, sK + kk * LDF);
      const float pr = sKeyOk[kk] != 0.0f ? exp2f(s * p.scale_log2 - lse2) : 0.0f;
      const float dp = keep[j] ? dot_row<DP>(sdO + r * LDF, sV + kk * LDF) * p.keep_scale : 0.0f;
      sS[r * (kT + 1) + kk] = pr * (dp - delta);
    }
    __syncwarp();  // a row's 8 threads are in one warp
#pragma unroll 4
    for (int kk = 0; kk < kT; ++kk) {
      const float ds = sS[r * (kT + 1) + kk];
#pragma unroll
      for (int i = 0; i < kCols; ++i) dq[i] = fmaf(ds, sK[kk * LDF + c + 8 * i], dq[i]);
    }
  }
  if (q < seq.tq) {
    float* dqg = static_cast<float*>(p.dq) + b * p.dq_sb + (seq.row0 + q) * p.dq_st + h * p.dq_sh;
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      if (c + 8 * i < p.D) dqg[c + 8 * i] = dq[i] * p.scale;
    }
  }
}

template <int DP, bool kVarlen>
cudaError_t launch_fwd(const AttnParams& p, cudaStream_t stream) {
  constexpr int kSmem = simt_fwd_smem<DP>();
  static_assert(smem_fits_every_arch<kSmem>(), "fp32 attention forward tiles exceed the per-block shared memory");
  const cudaError_t err = set_max_dynamic_smem(attn_fwd_simt_kernel<DP, kVarlen>, kSmem);
  if (err != cudaSuccess) return err;
  const int64_t blocks = ceil_div(p.Tq, kT) * p.B * p.H;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  attn_fwd_simt_kernel<DP, kVarlen><<<static_cast<unsigned>(blocks), kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <int DP, bool kVarlen>
cudaError_t launch_bwd(const AttnParams& p, cudaStream_t stream) {
  constexpr int kSmemKV = simt_dkdv_smem<DP>(), kSmemQ = simt_dq_smem<DP>();
  static_assert(smem_fits_every_arch<kSmemKV>() && smem_fits_every_arch<kSmemQ>(),
                "fp32 attention backward tiles exceed the per-block shared memory limit");
  cudaError_t err = set_max_dynamic_smem(attn_bwd_dkdv_simt_kernel<DP, kVarlen>, kSmemKV);
  if (err == cudaSuccess) err = set_max_dynamic_smem(attn_bwd_dq_simt_kernel<DP, kVarlen>, kSmemQ);
  if (err != cudaSuccess) return err;
  const int64_t bh = static_cast<int64_t>(p.B) * p.H;
  if (ceil_div(std::max(p.Tq, p.Tk), kT) * bh > INT32_MAX) return cudaErrorInvalidValue;
  if (p.Tk > 0) {
    attn_bwd_dkdv_simt_kernel<DP, kVarlen>
        <<<static_cast<unsigned>(ceil_div(p.Tk, kT) * bh), kThreads, kSmemKV, stream>>>(p);
  }
  if (p.Tq > 0) {
    attn_bwd_dq_simt_kernel<DP, kVarlen>
        <<<static_cast<unsigned>(ceil_div(p.Tq, kT) * bh), kThreads, kSmemQ, stream>>>(p);
  }
  return cudaGetLastError();
}

template <int DP>
cudaError_t launch_fwd(const AttnParams& p, cudaStream_t stream) {
  return p.cu_seqlens != nullptr ? launch_fwd<DP, true>(p, stream) : launch_fwd<DP, false>(p, stream);
}

template <int DP>
cudaError_t launch_bwd(const AttnParams& p, cudaStream_t stream) {
  return p.cu_seqlens != nullptr ? launch_bwd<DP, true>(p, stream) : launch_bwd<DP, false>(p, stream);
}

}  // namespace

cudaError_t launch_attn_fwd_simt(const AttnParams& p, cudaStream_t stream) {
  switch (attn_padded_dim(p.D)) {
    case 16: return launch_fwd<16>(p, stream);
    case 32: return launch_fwd<32>(p, stream);
    case 64: return launch_fwd<64>(p, stream);
    default: return launch_fwd<128>(p, stream);
  }
}

cudaError_t launch_attn_bwd_simt(const AttnParams& p, cudaStream_t stream) {
  switch (attn_padded_dim(p.D)) {
    case 16: return launch_bwd<16>(p, stream);
    case 32: return launch_bwd<32>(p, stream);
    case 64: return launch_bwd<64>(p, stream);
    default: return launch_bwd<128>(p, stream);
  }
}

}  // namespace cuda
}  // namespace fastbert
