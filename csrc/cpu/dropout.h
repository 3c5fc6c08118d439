// Counter-based dropout mask of the cpp backend.
//
// Element (row, col) is kept when a hash of (seed, row, col) clears a threshold, so the forward and the backward
// regenerate the same mask from the seed alone (nothing is stored), any thread computes any row, and the mask is
// independent of the thread count. It is not torch.Generator's stream: the cpp backend draws different (equally
// distributed) masks than the torch backend for the same seed, which the op contract allows.
//
// The hash is two rounds of the "lowbias32" integer mixer (Wellons' hash-prospector; bias ~0.17, an
// avalanche-quality permutation of 32-bit words) keyed by the 64-bit seed. Its top 24 bits are a uniform integer
// u; the element is kept iff u >= ceil(p * 2^24), so P(keep) = 1 - p up to 2^-24. The per-column loop is plain
// 32-bit integer arithmetic that the compiler vectorizes.
#pragma once

#include <cmath>
#include <cstdint>

namespace fastbert::cpu {

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

struct Dropout {
  float p = 0.f;
  uint64_t seed = 0;

  bool active() const { return p > 0.f; }

  // keep_scale[c] = 1 / (1 - p) where element (row, c) is kept, 0 where it is dropped.
  void scale_row(int64_t row, int64_t n, float* keep_scale) const {
    const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    const uint32_t row_key = mix32(mix32(static_cast<uint32_t>(row) ^ k1) + static_cast<uint32_t>(
                                                                                static_cast<uint64_t>(row) >> 32) +
                                   k0);
    const uint32_t threshold = static_cast<uint32_t>(std::ceil(static_cast<double>(p) * 16777216.0));
    const float scale = 1.0f / (1.0f - p);
    for (int64_t c = 0; c < n; ++c) {
      const uint32_t h = mix32(mix32(static_cast<uint32_t>(c) + row_key) ^ k0);
      keep_scale[c] = (h >> 8) >= threshold ? scale : 0.f;
    }
  }
};

}  // namespace fastbert::cpu
