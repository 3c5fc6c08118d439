// Fused residual-add + dropout + LayerNorm, forward and backward, on CPU.
//
// Forward, per row: z = dropout(x) + residual is formed in fp32 in an L1 scratch row, then normalized (two-pass
// statistics over that row) and written once in x's dtype. The torch composition reads x and residual, writes z,
// reads z back and writes the output; here x and residual are read once and only the output is written.
// z is never rounded to x's dtype, so bf16/fp16 results are closer to the float64 reference than the composition.
//
// Backward, per row: z is recomputed from x and residual (cheaper than saving it: one add against a row already
// being read), and dz is written to dx (times the dropout mask) and dresidual in the same pass. dweight/dbias
// accumulate into per-row-block partial sums (deterministic; see RowBlocks).
#include <vector>

#include "dropout.h"
#include "layer_norm_row.h"

namespace fastbert::cpu {
namespace {

// z = dropout(x) + residual for one row, in fp32. `keep` is scratch for the dropout scale row.
template <typename T>
inline void pre_norm_row(const T* x, const T* residual, const Dropout& drop, int64_t row, int64_t n, float* z,
                         float* keep, float* scratch) {
  const float* xf = row_as_float(x, scratch, n);
  if (drop.active()) {
    drop.scale_row(row, n, keep);
    vec_for(n, [&](int64_t d, int64_t c) { (Vec::loadu(xf + d, c) * Vec::loadu(keep + d, c)).store(z + d, c); });
  } else if (xf != z) {
    std::memcpy(z, xf, n * sizeof(float));
  }
  if (residual != nullptr) {
    const float* rf = row_as_float(residual, scratch, n);
    vec_for(n, [&](int64_t d, int64_t c) { (Vec::loadu(z + d, c) + Vec::loadu(rf + d, c)).store(z + d, c); });
  }
}

template <typename T>
void fwd_impl(const T* x, const T* residual, const float* w, const float* b, T* out, float* mean, float* rstd,
              int64_t rows, int64_t n, float eps, const Dropout& drop) {
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(4 * n);
    float *z = buf.data(), *keep = z + n, *scratch = keep + n, *obuf = scratch + n;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * n;
      pre_norm_row(x + off, residual ? residual + off : nullptr, drop, r, n, z, keep, scratch);
      float* o = out_row(out + off, obuf);
      ln_row_fwd(z, w, b, o, n, eps, mean[r], rstd[r]);
      store_row(o, out + off, n);
    }
  });
}

template <typename T>
void bwd_impl(const T* dout, const T* x, const T* residual, const float* w, const float* mean, const float* rstd,
              T* dx, T* dres, float* dw, float* db, int64_t rows, int64_t n, const Dropout& drop) {
  const RowBlocks blocks(rows);
  std::vector<float> partial(2 * blocks.count * n, 0.f);  // [dw blocks | db blocks]
  float* dw_part = partial.data();
  float* db_part = dw_part + blocks.count * n;
  at::parallel_for(0, blocks.count, blocks.grain(n), [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(5 * n);
    float *z = buf.data(), *keep = z + n, *scratch = keep + n, *dyb = scratch + n, *obuf = dyb + n;
    for (int64_t blk = b0; blk < b1; ++blk) {
      for (int64_t r = blocks.begin(blk); r < blocks.end(blk); ++r) {
        const int64_t off = r * n;
        pre_norm_row(x + off, residual ? residual + off : nullptr, drop, r, n, z, keep, scratch);
        const float* dy = row_as_float(dout + off, dyb, n);
        // dz overwrites z in place; the dropout mask in `keep` is still valid for this row.
        ln_row_bwd(z, dy, w, mean[r], rstd[r], z, dw_part + blk * n, db_part + blk * n, n);
        if (dres != nullptr) write_row(z, dres + off, n);
        if (drop.active()) {
          float* o = out_row(dx + off, obuf);
          vec_for(n, [&](int64_t d, int64_t c) { (Vec::loadu(z + d, c) * Vec::loadu(keep + d, c)).store(o + d, c); });
          store_row(o, dx + off, n);
        } else {
          write_row(z, dx + off, n);
        }
      }
    }
  });
  sum_blocks(dw_part, blocks.count, n, dw);
  sum_blocks(db_part, blocks.count, n, db);
}

}  // namespace

void add_layer_norm_fwd(Dtype dtype, const void* x, const void* residual, const float* weight, const float* bias,
                        void* out, float* mean, float* rstd, int64_t rows, int64_t n, float eps, float dropout_p,
                        uint64_t seed) {
  const Dropout drop{dropout_p, seed};
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    fwd_impl(static_cast<const T*>(x), static_cast<const T*>(residual), weight, bias, static_cast<T*>(out), mean,
             rstd, rows, n, eps, drop);
  });
}

void add_layer_norm_bwd(Dtype dtype, const void* dout, const void* x, const void* residual, const float* weight,
                        const float* mean, const float* rstd, void* dx, void* dresidual, float* dweight, float* dbias,
                        int64_t rows, int64_t n, float dropout_p, uint64_t seed) {
  const Dropout drop{dropout_p, seed};
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    bwd_impl(static_cast<const T*>(dout), static_cast<const T*>(x), static_cast<const T*>(residual), weight, mean,
             rstd, static_cast<T*>(dx), static_cast<T*>(dresidual), dweight, dbias, rows, n, drop);
  });
}

}  // namespace fastbert::cpu
