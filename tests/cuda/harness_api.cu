// Test-only C API for the ctypes harness in tests/cuda (no torch): device memory, errors, and host access to the
// Philox generator and dropout mappings of csrc/cuda/common.cuh (so the NumPy mask model is checked against the
// very code the kernels run). Built together with csrc/cuda/*.cu into one shared library by harness.py; built
// alone (no GPU needed) by test_philox.py.
#include <cstdio>

#include "common.cuh"

using namespace fastbert::cuda;

extern "C" {

int fbh_device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

int fbh_device_name(char* buf, int len) {
  cudaDeviceProp prop;
  const cudaError_t err = cudaGetDeviceProperties(&prop, 0);
  if (err != cudaSuccess) return static_cast<int>(err);
  snprintf(buf, static_cast<size_t>(len), "%s (sm_%d%d)", prop.name, prop.major, prop.minor);
  return 0;
}

void* fbh_malloc(size_t bytes) {
  void* p = nullptr;
  return cudaMalloc(&p, bytes == 0 ? 16 : bytes) == cudaSuccess ? p : nullptr;
}

int fbh_free(void* p) { return static_cast<int>(cudaFree(p)); }

int fbh_memcpy_htod(void* dst, const void* src, size_t bytes) {
  return static_cast<int>(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}

int fbh_memcpy_dtoh(void* dst, const void* src, size_t bytes) {
  return static_cast<int>(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}

int fbh_memset(void* dst, int value, size_t bytes) { return static_cast<int>(cudaMemset(dst, value, bytes)); }

int fbh_synchronize() { return static_cast<int>(cudaDeviceSynchronize()); }

int fbh_peek_last_error() { return static_cast<int>(cudaPeekAtLastError()); }

const char* fbh_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

// CUDA events on the default stream, for rough timings from Python.
void* fbh_event_create() {
  cudaEvent_t e = nullptr;
  return cudaEventCreate(&e) == cudaSuccess ? static_cast<void*>(e) : nullptr;
}

int fbh_event_record(void* e) { return static_cast<int>(cudaEventRecord(static_cast<cudaEvent_t>(e), nullptr)); }

float fbh_event_elapsed_ms(void* start, void* stop) {
  float ms = -1.0f;
  cudaEventSynchronize(static_cast<cudaEvent_t>(stop));
  cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start), static_cast<cudaEvent_t>(stop));
  return ms;
}

int fbh_event_destroy(void* e) { return static_cast<int>(cudaEventDestroy(static_cast<cudaEvent_t>(e))); }

// ---- host access to the generator (no GPU involved) ----

void fbh_philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint64_t key, uint32_t* out) {
  const Philox4 r = philox4x32_10(c0, c1, c2, c3, key);
  for (int i = 0; i < 4; ++i) out[i] = r.v[i];
}

uint32_t fbh_dropout_threshold16(float p) { return dropout_threshold16(p); }

int fbh_attn_dropout_keep(uint64_t seed, uint32_t thr16, int64_t bh, int64_t q, int64_t k) {
  return attn_dropout_keep(seed, thr16, bh, q, k) ? 1 : 0;
}

int fbh_rows_dropout_keep(uint64_t seed, uint32_t thr16, int64_t row, int64_t col) {
  return philox_u16(rows_philox(seed, row, col), static_cast<int>(col & 7)) >= thr16 ? 1 : 0;
}

}  // extern "C"
