// Fused attention backward on tensor cores (fp16/bf16; fp32 goes to attention_simt.cu). Three kernels, no atomics,
// so the gradients are bitwise deterministic:
//   1. delta = rowsum(dout * out) per query row (FlashAttention's D; equals sum_k P dP with dropout too).
//   2. dK/dV: one block per 64-key tile (4 warps x 16 keys), looping over query tiles (double-buffered cp.async).
//      It works on the transposed scores S^T = K Q^T, so P^T and dS^T come out of the accumulators already in
//      the A-fragment layout of dV += P^T dO and dK += dS^T Q.
//   3. dQ: one block per 64-query tile, looping over key tiles: dQ += dS K.
// P is recomputed from the saved lse: P = exp2(s * scale * log2 e - lse * log2 e); a row with lse = -inf (no real
// key) uses +inf instead, so its P is exactly 0. Dropout: dV uses P * keep, dS = P * (dP * keep / (1 - p) - delta),
// with keep regenerated from (seed, b * H + h, q, k) exactly as in the forward. Varlen (kVarlen): as in the
// forward, a block reads its sequence's extent from cu_seqlens and exits at once when its tile lies past the end.
#include "attention.cuh"

namespace fastbert {
namespace cuda {
namespace {

constexpr int kBwdThreads = 128;
constexpr int kTileRows = 64;  // keys per dK/dV block, queries per dQ block

// delta[bh * Tq + q] = sum_d dout[b, q, h, d] * out[b, q, h, d]; one warp per row. All dtypes. Varlen needs no
// sequence boundaries here: the packed tokens are one batch row of `total` queries, delta[h * total + token].
template <typename T>
__global__ void __launch_bounds__(256, 4) attn_bwd_delta_kernel(const AttnParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const int64_t per_bh = p.cu_seqlens != nullptr ? p.total : p.Tq;
  const int64_t n_bh = p.cu_seqlens != nullptr ? p.H : static_cast<int64_t>(p.B) * p.H;
  if (row >= n_bh * per_bh) return;
  const int q = static_cast<int>(row % per_bh), bh = static_cast<int>(row / per_bh), b = bh / p.H, h = bh % p.H;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_sb + static_cast<int64_t>(q) * p.do_st + h * p.do_sh;
  const T* out = static_cast<const T*>(p.out_in) + b * p.o_sb + static_cast<int64_t>(q) * p.o_st + h * p.o_sh;
  float acc = 0.0f;
  for (int d = lane; d < p.D; d += 32) acc = fmaf(to_f32(dout[d]), to_f32(out[d]), acc);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[row] = acc;
}

template <typename T, int DP, int BR>
constexpr int dkdv_smem_bytes() {
  return (2 * kTileRows + 4 * BR) * (DP + 8) * static_cast<int>(sizeof(T)) + 4 * BR * static_cast<int>(sizeof(float));
}

// Rows [row0, row0 + n) of the query-side tensors into buffer `buf`: Q, dO (cp.async), lse * log2 e and delta.
template <typename T, int BR, int DP, int LD>
__device__ __forceinline__ void load_query_tile(const AttnParams& p, T* sQ, T* sdO, float* sLse, float* sDelta,
                                                const T* qg, const T* dog, const SeqSlice& seq, int row0) {
  load_tile<T, BR, DP, LD, kBwdThreads>(sQ, qg, p.q_st, row0, seq.tq, p.D, p.vec_ok);
  load_tile<T, BR, DP, LD, kBwdThreads>(sdO, dog, p.do_st, row0, seq.tq, p.D, p.vec_ok);
  if (threadIdx.x < BR) {
    const int q = row0 + threadIdx.x;
    const float lse = q < seq.tq ? p.lse_in[seq.stat0 + q] : -INFINITY;
    sLse[threadIdx.x] = lse == -INFINITY ? INFINITY : lse * kLog2e;
    sDelta[threadIdx.x] = q < seq.tq ? p.delta[seq.stat0 + q] : 0.0f;
  }
}

template <typename T, int DP, int BR, bool kVarlen>
__global__ void __launch_bounds__(kBwdThreads, 1) attn_bwd_dkdv_mma_kernel(const AttnParams p) {
  constexpr int Bc = kTileRows, LD = DP + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + Bc * LD;
  T* sQ = sV + Bc * LD;     // [2][BR][LD]
  T* sdO = sQ + 2 * BR * LD;  // [2][BR][LD]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * BR * LD);  // [2][BR]
  float* sDelta = sLse + 2 * BR;                              // [2][BR]

  const int nkt = (p.Tk + Bc - 1) / Bc;
  const int kt = static_cast<int>(blockIdx.x % nkt), bh = static_cast<int>(blockIdx.x / nkt);
  const int b = bh / p.H, h = bh % p.H, k0 = kt * Bc;
  const SeqSlice seq = seq_slice<kVarlen>(p, b, h);
  if (k0 >= seq.tk) return;  // varlen only: past this sequence's end, no gradient row to write
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const uint8_t* mrow = p.mask == nullptr ? nullptr : p.mask + b * p.mask_stride_b;
  T* dkg = static_cast<T*>(p.dk) + b * p.dk_sb + h * p.dk_sh + seq.row0 * p.dk_st;
  T* dvg = static_cast<T*>(p.dv) + b * p.dv_sb + h * p.dv_sh + seq.row0 * p.dv_st;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + seq.row0 * p.q_st;
  const T* dog = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + seq.row0 * p.do_st;

  float dk[DP / 8][4], dv[DP / 8][4];
#pragma unroll
  for (int i = 0; i < DP / 8; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.0f;
  }

  const int kv_len = block_kv_len(mrow, seq.tk);
  const int nqt = k0 < kv_len ? (seq.tq + BR - 1) / BR : 0;  // a tile of padding only: zero gradients
  if (nqt > 0) {
    load_tile<T, Bc, DP, LD, kBwdThreads>(
        sK, static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + seq.row0 * p.k_st, p.k_st, k0, seq.tk, p.D,
        p.vec_ok);
    load_tile<T, Bc, DP, LD, kBwdThreads>(
        sV, static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + seq.row0 * p.v_st, p.v_st, k0, seq.tk, p.D,
        p.vec_ok);
    load_query_tile<T, BR, DP, LD>(p, sQ, sdO, sLse, sDelta, qg, dog, seq, 0);
  }
  cp_async_commit();
  const bool key_real[2] = {key_ok(mrow, k0 + warp * 16 + g, seq.tk), key_ok(mrow, k0 + warp * 16 + g + 8, seq.tk)};
  const uint32_t kblock = static_cast<uint32_t>((k0 >> 4) + warp);

  for (int it = 0; it < nqt; ++it) {
    const int buf = it & 1;
    cp_async_wait_all();
    __syncthreads();  // tile `it` visible; every warp is done with tile it - 1 (the buffer refilled next)
    if (it + 1 < nqt) {
      const int nb = buf ^ 1;
      load_query_tile<T, BR, DP, LD>(p, sQ + nb * BR * LD, sdO + nb * BR * LD, sLse + nb * BR, sDelta + nb * BR, qg,
                                     dog, seq, (it + 1) * BR);
    }
    cp_async_commit();
    const T* cQ = sQ + buf * BR * LD;
    const T* cdO = sdO + buf * BR * LD;
    const float* cLse = sLse + buf * BR;
    const float* cDelta = sDelta + buf * BR;

    // S^T = K_w Q^T and dP^T = V_w dO^T: 16 keys x BR queries each.
    float st[BR / 8][4], dpt[BR / 8][4];
#pragma unroll
    for (int i = 0; i < BR / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      uint32_t ak[4], av[4];
      ldsm_x4(ak, sK + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
      ldsm_x4(av, sV + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < BR / 16; ++np) {
        const int off = (np * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8;
        uint32_t bq[4], bo[4];
        ldsm_x4(bq, cQ + off);
        ldsm_x4(bo, cdO + off);
        mma_16816<T>(st[2 * np], ak, bq[0], bq[1]);
        mma_16816<T>(st[2 * np + 1], ak, bq[2], bq[3]);
        mma_16816<T>(dpt[2 * np], av, bo[0], bo[1]);
        mma_16816<T>(dpt[2 * np + 1], av, bo[2], bo[3]);
      }
    }

    // P^T (into st, dropped: P * keep) and dS^T (into dpt). Element (key row g + 8 * (i >> 1), query nt * 8 + 2 * t4
    // + (i & 1)); a 16x16 (query, key) block needs two Philox calls in this transposed layout (q odd / even).
#pragma unroll
    for (int np = 0; np < BR / 16; ++np) {
      Philox4 rnd[2];
      if (p.dropout) {
        const uint32_t qblock = static_cast<uint32_t>(((it * BR) >> 4) + np);
        rnd[0] = attn_philox(p.seed, bh, qblock, kblock, 0, t4, g >> 1);
        rnd[1] = attn_philox(p.seed, bh, qblock, kblock, 1, t4, g >> 1);
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int nt = 2 * np + half;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int q = nt * 8 + 2 * t4 + (i & 1);
          const float prob = key_real[i >> 1] ? exp2f(st[nt][i] * p.scale_log2 - cLse[q]) : 0.0f;
          float dprob = dpt[nt][i], kept = prob;
          if (p.dropout) {
            const bool keep = philox_u16(rnd[i & 1], half * 4 + (i >> 1) * 2 + (g & 1)) >= p.thr16;
            dprob = keep ? dprob * p.keep_scale : 0.0f;
            kept = keep ? prob : 0.0f;
          }
          st[nt][i] = kept;
          dpt[nt][i] = prob * (dprob - cDelta[q]);
        }
      }
    }

    // dV += (P * keep)^T dO and dK += dS^T Q; k-step kk covers queries 16kk .. 16kk + 15.
#pragma unroll
    for (int kk = 0; kk < BR / 16; ++kk) {
      uint32_t ap[4], ad[4];
      ap[0] = pack2<T>(st[2 * kk][0], st[2 * kk][1]);
      ap[1] = pack2<T>(st[2 * kk][2], st[2 * kk][3]);
      ap[2] = pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      ap[3] = pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
      ad[0] = pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]);
      ad[1] = pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]);
      ad[2] = pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
      ad[3] = pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < DP / 16; ++dp) {
        const int off = (kk * 16 + (lane & 15)) * LD + dp * 16 + (lane >> 4) * 8;
        uint32_t bo[4], bq[4];
        ldsm_x4_trans(bo, cdO + off);
        ldsm_x4_trans(bq, cQ + off);
        mma_16816<T>(dv[2 * dp], ap, bo[0], bo[1]);
        mma_16816<T>(dv[2 * dp + 1], ap, bo[2], bo[3]);
        mma_16816<T>(dk[2 * dp], ad, bq[0], bq[1]);
        mma_16816<T>(dk[2 * dp + 1], ad, bq[2], bq[3]);
      }
    }
  }
  cp_async_wait_all();
  __syncthreads();  // sK / sV rows are reused below as this warp's staging buffer (also covers nqt == 0)

  // dK = scale * dS^T Q, dV = keep_scale * (P keep)^T dO; staged through the warp's own rows of sK and sV.
  T* sdK = sK + warp * 16 * LD;
  T* sdV = sV + warp * 16 * LD;
#pragma unroll
  for (int nt = 0; nt < DP / 8; ++nt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int off = (g + 8 * r) * LD + nt * 8 + 2 * t4;
      *reinterpret_cast<uint32_t*>(sdK + off) = pack2<T>(dk[nt][2 * r] * p.scale, dk[nt][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(sdV + off) =
          pack2<T>(dv[nt][2 * r] * p.keep_scale, dv[nt][2 * r + 1] * p.keep_scale);
    }
  }
  __syncwarp();
  store_tile<T, 16, DP, LD, 32>(dkg, p.dk_st, sdK, k0 + warp * 16, seq.tk, p.D, p.vec_ok, lane);
  store_tile<T, 16, DP, LD, 32>(dvg, p.dv_st, sdV, k0 + warp * 16, seq.tk, p.D, p.vec_ok, lane);
}

template <typename T, int DP, int BC>
constexpr int dq_smem_bytes() {
  return (2 * kTileRows + 4 * BC) * (DP + 8) * static_cast<int>(sizeof(T)) + 2 * BC * static_cast<int>(sizeof(float));
}

template <typename T, int DP, int BC>
__device__ __forceinline__ void load_key_tile(const AttnParams& p, T* sK, T* sV, float* sKeyOk, const T* kg,
                                              const T* vg, const uint8_t* mrow, int row0, int tk) {
  constexpr int LD = DP + 8;
  load_tile<T, BC, DP, LD, kBwdThreads>(sK, kg, p.k_st, row0, tk, p.D, p.vec_ok);
  load_tile<T, BC, DP, LD, kBwdThreads>(sV, vg, p.v_st, row0, tk, p.D, p.vec_ok);
  if (threadIdx.x < BC) sKeyOk[threadIdx.x] = key_ok(mrow, row0 + threadIdx.x, tk) ? 1.0f : 0.0f;
}

template <typename T, int DP, int BC, bool kVarlen>
__global__ void __launch_bounds__(kBwdThreads, 1) attn_bwd_dq_mma_kernel(const AttnParams p) {
  constexpr int Br = kTileRows, LD = DP + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + Br * LD;
  T* sK = sdO + Br * LD;     // [2][BC][LD]
  T* sV = sK + 2 * BC * LD;  // [2][BC][LD]
  float* sKeyOk = reinterpret_cast<float*>(sV + 2 * BC * LD);  // [2][BC]

  const int nqt = (p.Tq + Br - 1) / Br;
  const int qt = static_cast<int>(blockIdx.x % nqt), bh = static_cast<int>(blockIdx.x / nqt);
  const int b = bh / p.H, h = bh % p.H, q0 = qt * Br;
  const SeqSlice seq = seq_slice<kVarlen>(p, b, h);
  if (q0 >= seq.tq) return;  // varlen only: past this sequence's end
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const uint8_t* mrow = p.mask == nullptr ? nullptr : p.mask + b * p.mask_stride_b;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + seq.row0 * p.k_st;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + seq.row0 * p.v_st;

  const int kv_len = block_kv_len(mrow, seq.tk);
  const int n_tiles = (kv_len + BC - 1) / BC;
  load_tile<T, Br, DP, LD, kBwdThreads>(sQ, static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + seq.row0 * p.q_st,
                                        p.q_st, q0, seq.tq, p.D, p.vec_ok);
  load_tile<T, Br, DP, LD, kBwdThreads>(
      sdO, static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + seq.row0 * p.do_st, p.do_st, q0, seq.tq, p.D,
      p.vec_ok);
  if (n_tiles > 0) load_key_tile<T, DP, BC>(p, sK, sV, sKeyOk, kg, vg, mrow, 0, seq.tk);
  cp_async_commit();

  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int q = q0 + warp * 16 + g + 8 * r;
    const float lse = q < seq.tq ? p.lse_in[seq.stat0 + q] : -INFINITY;
    lse2[r] = lse == -INFINITY ? INFINITY : lse * kLog2e;
    delta[r] = q < seq.tq ? p.delta[seq.stat0 + q] : 0.0f;
  }
  float dq[DP / 8][4];
#pragma unroll
  for (int i = 0; i < DP / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.0f;
  const uint32_t qblock = static_cast<uint32_t>((q0 >> 4) + warp);

  for (int j = 0; j < n_tiles; ++j) {
    const int buf = j & 1;
    cp_async_wait_all();
    __syncthreads();
    if (j + 1 < n_tiles) {
      const int nb = buf ^ 1;
      load_key_tile<T, DP, BC>(p, sK + nb * BC * LD, sV + nb * BC * LD, sKeyOk + nb * BC, kg, vg, mrow, (j + 1) * BC,
                               seq.tk);
    }
    cp_async_commit();
    const T* cK = sK + buf * BC * LD;
    const T* cV = sV + buf * BC * LD;
    const float* cKeyOk = sKeyOk + buf * BC;

    // S = Q_w K^T and dP = dO_w V^T: 16 queries x BC keys each.
    float s[BC / 8][4], dps[BC / 8][4];
#pragma unroll
    for (int i = 0; i < BC / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dps[i][e] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      uint32_t aq[4], ao[4];
      ldsm_x4(aq, sQ + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
      ldsm_x4(ao, sdO + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < BC / 16; ++np) {
        const int off = (np * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8;
        uint32_t bk[4], bv[4];
        ldsm_x4(bk, cK + off);
        ldsm_x4(bv, cV + off);
        mma_16816<T>(s[2 * np], aq, bk[0], bk[1]);
        mma_16816<T>(s[2 * np + 1], aq, bk[2], bk[3]);
        mma_16816<T>(dps[2 * np], ao, bv[0], bv[1]);
        mma_16816<T>(dps[2 * np + 1], ao, bv[2], bv[3]);
      }
    }

    // dS (into s), forward layout: one Philox call per 16x16 block.
#pragma unroll
    for (int kb = 0; kb < BC / 16; ++kb) {
      Philox4 rnd;
      if (p.dropout) {
        rnd = attn_philox(p.seed, bh, qblock, static_cast<uint32_t>(((j * BC) >> 4) + kb), g & 1, g >> 1, t4);
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int nt = 2 * kb + half;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const bool ok = cKeyOk[nt * 8 + 2 * t4 + (i & 1)] != 0.0f;
          const float prob = ok ? exp2f(s[nt][i] * p.scale_log2 - lse2[i >> 1]) : 0.0f;
          float dprob = dps[nt][i];
          if (p.dropout) {
            const bool keep = philox_u16(rnd, (i >> 1) * 4 + half * 2 + (i & 1)) >= p.thr16;
            dprob = keep ? dprob * p.keep_scale : 0.0f;
          }
          s[nt][i] = prob * (dprob - delta[i >> 1]);
        }
      }
    }

    // dQ += dS K: B[k = key][n = d] = K[key][d], a transposed ldmatrix of the key tile.
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < DP / 16; ++dp) {
        uint32_t bk[4];
        ldsm_x4_trans(bk, cK + (kk * 16 + (lane & 15)) * LD + dp * 16 + (lane >> 4) * 8);
        mma_16816<T>(dq[2 * dp], a, bk[0], bk[1]);
        mma_16816<T>(dq[2 * dp + 1], a, bk[2], bk[3]);
      }
    }
  }
  cp_async_wait_all();
  __syncthreads();  // with no key tile, other threads' Q copies may still be landing in the staging rows below

  T* sdQ = sQ + warp * 16 * LD;  // this warp's own rows (only it reads them)
#pragma unroll
  for (int nt = 0; nt < DP / 8; ++nt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      *reinterpret_cast<uint32_t*>(sdQ + (g + 8 * r) * LD + nt * 8 + 2 * t4) =
          pack2<T>(dq[nt][2 * r] * p.scale, dq[nt][2 * r + 1] * p.scale);
    }
  }
  __syncwarp();
  T* dqg = static_cast<T*>(p.dq) + b * p.dq_sb + h * p.dq_sh + seq.row0 * p.dq_st;
  store_tile<T, 16, DP, LD, 32>(dqg, p.dq_st, sdQ, q0 + warp * 16, seq.tq, p.D, p.vec_ok, lane);
}

// dK/dV keeps two DP-wide accumulators per thread: the query tile shrinks to 16 at DP = 128 to stay in registers.
// dQ streams double-buffered 64-key K/V tiles, 32-key ones at DP = 128: 64 would need 104,960 B of shared memory,
// more than sm_86 / sm_89 allow per block (the dropout mask does not depend on the tile: Philox blocks of 16 keys).
template <typename T, int DP, bool kVarlen>
cudaError_t launch_bwd_mma(const AttnParams& p, cudaStream_t stream) {
  constexpr int kBr = DP >= 128 ? 16 : (DP >= 64 ? 32 : 64), kBc = DP >= 128 ? 32 : 64;
  constexpr int kSmemKV = dkdv_smem_bytes<T, DP, kBr>(), kSmemQ = dq_smem_bytes<T, DP, kBc>();
  static_assert(smem_fits_every_arch<kSmemKV>() && smem_fits_every_arch<kSmemQ>(),
                "attention backward tiles need more shared memory than sm_86/sm_89 allow per block");
  cudaError_t err = set_max_dynamic_smem(attn_bwd_dkdv_mma_kernel<T, DP, kBr, kVarlen>, kSmemKV);
  if (err == cudaSuccess) err = set_max_dynamic_smem(attn_bwd_dq_mma_kernel<T, DP, kBc, kVarlen>, kSmemQ);
  if (err != cudaSuccess) return err;
  const int64_t bh = static_cast<int64_t>(p.B) * p.H;
  if (p.Tk > 0) {  // seqlen_q == 0 still runs: it writes zero dK, dV
    attn_bwd_dkdv_mma_kernel<T, DP, kBr, kVarlen>
        <<<static_cast<unsigned>(ceil_div(p.Tk, kTileRows) * bh), kBwdThreads, kSmemKV, stream>>>(p);
  }
  if (p.Tq > 0) {  // seqlen_k == 0 still runs: it writes zero dQ
    attn_bwd_dq_mma_kernel<T, DP, kBc, kVarlen>
        <<<static_cast<unsigned>(ceil_div(p.Tq, kTileRows) * bh), kBwdThreads, kSmemQ, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T, int DP>
cudaError_t launch_bwd_mma(const AttnParams& p, cudaStream_t stream) {
  return p.cu_seqlens != nullptr ? launch_bwd_mma<T, DP, true>(p, stream) : launch_bwd_mma<T, DP, false>(p, stream);
}

template <typename T>
cudaError_t launch_bwd(const AttnParams& p, cudaStream_t stream) {
  const int64_t rows = p.cu_seqlens != nullptr ? p.H * p.total : static_cast<int64_t>(p.B) * p.H * p.Tq;
  if (rows > 0) attn_bwd_delta_kernel<T><<<static_cast<unsigned>(ceil_div(rows, 8)), 256, 0, stream>>>(p);
  if constexpr (std::is_same_v<T, float>) {
    return launch_attn_bwd_simt(p, stream);
  } else {
    switch (attn_padded_dim(p.D)) {
      case 16: return launch_bwd_mma<T, 16>(p, stream);
      case 32: return launch_bwd_mma<T, 32>(p, stream);
      case 64: return launch_bwd_mma<T, 64>(p, stream);
      default: return launch_bwd_mma<T, 128>(p, stream);
    }
  }
}

}  // namespace

cudaError_t launch_attn_bwd(const AttnParams& p, FastbertDType dtype, cudaStream_t stream) {
  switch (dtype) {
    case FASTBERT_FLOAT16: return launch_bwd<__half>(p, stream);
    case FASTBERT_BFLOAT16: return launch_bwd<__nv_bfloat16>(p, stream);
    default: return launch_bwd<float>(p, stream);
  }
}

}  // namespace cuda
}  // namespace fastbert
