// GroupNorm + SiLU of the VQVAE decoder in one kernel (see GroupNormArgs in launchers.h). Under autocast PyTorch
// runs it as five passes in float32 (cast, statistics, normalisation, SiLU, cast back); this reads the 16-bit
// input twice and writes the 16-bit output once. One thread block per (sample, group): a group's channels are
// contiguous in NCHW.
#include "launchers.h"
#include "quantize_math.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ptq4arvg {
namespace {

constexpr int kThreads = 512;

// Sum over the block of two values at once; every thread gets both totals.
__device__ __forceinline__ float2 block_sum2(float2 v, float2* partial) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, offset);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float2 total = lane < kThreads / 32 ? partial[lane] : make_float2(0.f, 0.f);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    total.x += __shfl_xor_sync(0xffffffffu, total.x, offset);
    total.y += __shfl_xor_sync(0xffffffffu, total.y, offset);
  }
  return total;
}

template <class TIn, class TOut>
__global__ void __launch_bounds__(kThreads) group_norm_kernel(const GroupNormArgs a) {
  __shared__ float2 partial[kThreads / 32];
  const int64_t group = blockIdx.x;  // sample * groups + g
  const int64_t channels_per_group = a.channels / a.groups;
  const int64_t count = channels_per_group * a.pixels;
  const int64_t vectors = count / 8;
  const TIn* x = static_cast<const TIn*>(a.x) + group * count;
  TOut* out = static_cast<TOut*>(a.out) + group * count;

  // The sums are shifted by the group's first value: no cancellation when the mean is large against the spread.
  const float shift = to_float(x[0]);
  float2 sums = make_float2(0.f, 0.f);
  for (int64_t i = threadIdx.x; i < vectors; i += kThreads) {
    float v[8];
    load8(x + 8 * i, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float d = v[j] - shift;
      sums.x += d;
      sums.y = fmaf(d, d, sums.y);
    }
  }
  sums = block_sum2(sums, partial);
  const float n = static_cast<float>(count);
  const float shifted_mean = sums.x / n;
  const float variance = fmaxf(sums.y / n - shifted_mean * shifted_mean, 0.f);
  const float mean = shift + shifted_mean;
  const float rstd = rsqrtf(variance + a.eps);

  const int64_t first_channel = (group % a.groups) * channels_per_group;
  for (int64_t i = threadIdx.x; i < vectors; i += kThreads) {
    const int64_t c = first_channel + (8 * i) / a.pixels;  // pixels % 8 == 0: a vector stays in one channel
    const float scale = rstd * a.weight[c];
    const float offset = a.bias[c] - mean * scale;
    float v[8];
    load8(x + 8 * i, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float y = fmaf(v[j], scale, offset);
      v[j] = a.silu ? y / (1.f + expf(-y)) : y;
    }
    store8(out + 8 * i, v);
  }
}

template <class TIn>
void launch_group_norm_from(const GroupNormArgs& a, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(a.samples * a.groups);
  switch (a.out_dtype) {
    case OutDtype::kBFloat16: group_norm_kernel<TIn, __nv_bfloat16><<<blocks, kThreads, 0, stream>>>(a); break;
    case OutDtype::kFloat16: group_norm_kernel<TIn, __half><<<blocks, kThreads, 0, stream>>>(a); break;
    case OutDtype::kFloat32: group_norm_kernel<TIn, float><<<blocks, kThreads, 0, stream>>>(a); break;
  }
}

}  // namespace

void launch_group_norm(const GroupNormArgs& a, cudaStream_t stream) {
  if (a.samples == 0 || a.channels == 0 || a.pixels == 0) return;
  switch (static_cast<OutDtype>(a.in_dtype)) {
    case OutDtype::kBFloat16: launch_group_norm_from<__nv_bfloat16>(a, stream); break;
    case OutDtype::kFloat16: launch_group_norm_from<__half>(a, stream); break;
    case OutDtype::kFloat32: launch_group_norm_from<float>(a, stream); break;
  }
}

}  // namespace ptq4arvg
