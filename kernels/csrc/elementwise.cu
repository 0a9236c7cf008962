// Memory-bound kernels: row quantization (bf16/fp16/fp32 -> int8) and the int32 -> float dequantization used
// after torch._int_mm where the fused sm_90a GEMM is not available. Compiled for every architecture in the
// build's arch list. No fast-math: rounding must equal PyTorch's (IEEE division, round-half-to-even).
#include "launchers.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ptq4arvg {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ float from_float(float v) { return v; }

// Fixed-size register array that can be moved through memory as 16-byte (or 8-byte) words.
template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// One thread quantizes 8 consecutive elements of one row: 16-byte loads of bf16/fp16, an 8-byte store.
template <class T>
__global__ void quantize_rows_kernel(const T* __restrict__ x, int8_t* __restrict__ out,
                                     int32_t* __restrict__ residual, RowParam<float> step,
                                     RowParam<int32_t> zero, uint32_t total, uint32_t vecs_per_row, int bits) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Let the consuming GEMM be scheduled now; it waits (griddepcontrol.wait) for this grid to finish.
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  constexpr int kVec = 8;
  const uint32_t v = blockIdx.x * kThreads + threadIdx.x;  // 32-bit index math: cheap division (host checks the range)
  if (v >= total) return;
  const uint32_t row = v / vecs_per_row;
  const float s = step.ptr[step.per_row ? row : 0];
  const int32_t z = zero.ptr[zero.per_row ? row : 0];
  const int32_t qmax = (1 << bits) - 1;
  const int32_t offset = min(max(z, (1 << bits) - 128), 128);  // keeps q - offset inside int8
  if (v % vecs_per_row == 0 && (zero.per_row || row == 0)) residual[zero.per_row ? row : 0] = z - offset;

  const auto in = reinterpret_cast<const Pack<T, kVec>*>(x)[v];
  Pack<int8_t, kVec> q;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    float r = rintf(to_float(in.v[i]) / s) + static_cast<float>(z);
    r = fminf(fmaxf(r, 0.f), static_cast<float>(qmax));
    q.v[i] = static_cast<int8_t>(static_cast<int32_t>(r) - offset);
  }
  reinterpret_cast<Pack<int8_t, kVec>*>(out)[v] = q;
}

// out = act_scale[m] * (w_scale[n] * float(acc - act_zero[m] * wsum[n])) + bias[n]: the fused GEMM epilogue,
// same operation order, applied to a finished int32 [M, N] tensor. One thread handles 4 columns.
template <class T>
__global__ void dequantize_kernel(const int32_t* __restrict__ acc, T* __restrict__ out, EpilogueArgs e,
                                  uint32_t total, uint32_t vecs_per_row) {
  constexpr int kVec = 4;
  const uint32_t v = blockIdx.x * kThreads + threadIdx.x;
  if (v >= total) return;
  const uint32_t m = v / vecs_per_row;
  const uint32_t n0 = (v - m * vecs_per_row) * kVec;
  const float sa = e.act_scale.ptr[e.act_scale.per_row ? m : 0];
  const int32_t za = e.act_zero.ptr ? e.act_zero.ptr[e.act_zero.per_row ? m : 0] : 0;
  const auto a = reinterpret_cast<const Pack<int32_t, kVec>*>(acc)[v];
  Pack<T, kVec> y;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int32_t corrected = a.v[i] - za * e.wsum[n0 + i];
    const float col_scaled = e.w_scale[n0 + i] * static_cast<float>(corrected);
    y.v[i] = from_float<T>(fmaf(sa, col_scaled, e.bias ? e.bias[n0 + i] : 0.f));
  }
  reinterpret_cast<Pack<T, kVec>*>(out)[v] = y;
}

unsigned blocks_for(uint32_t work) { return (work + kThreads - 1) / kThreads; }

}  // namespace

void launch_quantize_rows(const QuantizeArgs& a, cudaStream_t stream) {
  const auto vecs_per_row = static_cast<uint32_t>(a.cols / 8);
  const auto total = static_cast<uint32_t>(a.rows * vecs_per_row);
  const unsigned blocks = blocks_for(total);
  if (blocks == 0) return;
  switch (static_cast<OutDtype>(a.in_dtype)) {
    case OutDtype::kBFloat16:
      quantize_rows_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(a.x), a.out,
                                                             a.residual, a.step, a.zero, total, vecs_per_row, a.bits);
      break;
    case OutDtype::kFloat16:
      quantize_rows_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const __half*>(a.x), a.out, a.residual,
                                                             a.step, a.zero, total, vecs_per_row, a.bits);
      break;
    case OutDtype::kFloat32:
      quantize_rows_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const float*>(a.x), a.out, a.residual,
                                                             a.step, a.zero, total, vecs_per_row, a.bits);
      break;
  }
}

void launch_dequantize(const DequantizeArgs& a, cudaStream_t stream) {
  const auto vecs_per_row = static_cast<uint32_t>(a.N / 4);
  const auto total = static_cast<uint32_t>(a.M * vecs_per_row);
  const unsigned blocks = blocks_for(total);
  if (blocks == 0) return;
  switch (a.out_dtype) {
    case OutDtype::kBFloat16:
      dequantize_kernel<<<blocks, kThreads, 0, stream>>>(a.acc, static_cast<__nv_bfloat16*>(a.out), a.epi, total,
                                                          vecs_per_row);
      break;
    case OutDtype::kFloat16:
      dequantize_kernel<<<blocks, kThreads, 0, stream>>>(a.acc, static_cast<__half*>(a.out), a.epi, total,
                                                          vecs_per_row);
      break;
    case OutDtype::kFloat32:
      dequantize_kernel<<<blocks, kThreads, 0, stream>>>(a.acc, static_cast<float*>(a.out), a.epi, total,
                                                          vecs_per_row);
      break;
  }
}

#ifdef __CUDA_ARCH_LIST__
static constexpr int kCompiledArchs[] = {__CUDA_ARCH_LIST__};
#else
static constexpr int kCompiledArchs[] = {0};
#endif
int compiled_arch_count() { return static_cast<int>(sizeof(kCompiledArchs) / sizeof(int)); }
int compiled_arch(int index) { return kCompiledArchs[index]; }

}  // namespace ptq4arvg
