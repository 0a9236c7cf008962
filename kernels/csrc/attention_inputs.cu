// The attention inputs of a fused qkv projection in one pass (see SplitQkvArgs in launchers.h): what PyTorch does in
// a bias add, a head split, two L2 normalisations with their reductions, a multiply, a cast and the KV cache
// copies, each a pass over memory through a permuted view. No fast-math: values must round like PyTorch's.
#include "launchers.h"
#include "quantize_math.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ptq4arvg {
namespace {

constexpr int kThreads = 256;

// The 8 values of one thread after the bias, rounded to T as `qkv + bias.to(T)` rounds them.
template <class T>
__device__ __forceinline__ void load_with_bias(const T* src, const float* bias, float (&v)[8]) {
  load8(src, v);
  if (bias == nullptr) return;
  float b[8];
  load8(bias, b);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = round_to<T>(add_rn(v[i], round_to<T>(b[i])));
}

// v / max(||v||, eps) over the head, whose c / 8 threads are adjacent lanes of one warp (kLanes a power of two).
template <int kLanes>
__device__ __forceinline__ void l2_normalize(float (&v)[8], float eps) {
  float squares = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) squares = fmaf(v[i], v[i], squares);
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset >>= 1) squares += __shfl_xor_sync(0xffffffffu, squares, offset);
  const float norm = fmaxf(sqrtf(squares), eps);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = div_rn(v[i], norm);
}

template <class T>
__device__ __forceinline__ void store_kv(void* base, int64_t offset, float (&v)[8], bool codes, const float* grid,
                                         int bits) {
  if (!codes) {
    store8(static_cast<T*>(base) + offset, v);
    return;
  }
  const RowGrid g = make_row_grid(grid[0], static_cast<int32_t>(grid[1]), bits);
  uint32_t packed[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {  // the literal formula: a K/V grid is read once per 8 values, speed is not at stake
    packed[j] = pack_int8x4(quantize_element<false>(round_to<T>(v[4 * j]), g),
                            quantize_element<false>(round_to<T>(v[4 * j + 1]), g),
                            quantize_element<false>(round_to<T>(v[4 * j + 2]), g),
                            quantize_element<false>(round_to<T>(v[4 * j + 3]), g));
  }
  *reinterpret_cast<uint2*>(static_cast<int8_t*>(base) + offset) = make_uint2(packed[0], packed[1]);
}

template <class T, int kLanes>
__global__ void __launch_bounds__(kThreads) split_qkv_kernel(const SplitQkvArgs a, uint64_t total) {
  // One thread: 8 consecutive head-dim values of q, k and v of one (sample, token, head).
  const uint64_t index = static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = index < total;  // inactive lanes still join the warp shuffles
  const uint64_t i = active ? index : 0;
  const int64_t head_threads = a.heads * kLanes;
  const int64_t row = static_cast<int64_t>(i / head_threads);  // sample * tokens + token
  const int64_t within = static_cast<int64_t>(i % head_threads);
  const int64_t head = within / kLanes, d = (within % kLanes) * 8;
  const int64_t width = a.heads * a.head_dim;  // C
  const T* src = static_cast<const T*>(a.qkv) + row * 3 * width + head * a.head_dim + d;
  const int64_t column = head * a.head_dim + d;

  float q[8], k[8], v[8];
  load_with_bias(src, a.bias ? a.bias + column : nullptr, q);
  load_with_bias(src + width, a.bias ? a.bias + width + column : nullptr, k);
  load_with_bias(src + 2 * width, a.bias ? a.bias + 2 * width + column : nullptr, v);
  if (a.l2_norm) {
    l2_normalize<kLanes>(q, a.eps);
    l2_normalize<kLanes>(k, a.eps);
    if (a.q_mul != nullptr) {
      const float m = a.q_mul[head];
#pragma unroll
      for (int j = 0; j < 8; ++j) q[j] = mul_rn(q[j], m);
    }
  }
  if (!active) return;
  store8(static_cast<T*>(a.q_out) + row * width + column, q);
  const int64_t sample = row / a.tokens, token = row % a.tokens;
  const int64_t slot = sample * a.kv_stride_s + head * a.kv_stride_h + token * a.kv_stride_t + d;
  store_kv<T>(a.k_out, slot, k, a.kv_int8, a.kv_grid, a.kv_bits);
  store_kv<T>(a.v_out, slot, v, a.kv_int8, a.kv_grid ? a.kv_grid + 2 : nullptr, a.kv_bits);
}

template <class T>
void launch_split_qkv_of(const SplitQkvArgs& a, cudaStream_t stream) {
  const uint64_t total = static_cast<uint64_t>(a.samples * a.tokens * a.heads) * (a.head_dim / 8);
  const auto blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads);
  if (blocks == 0) return;
  switch (a.head_dim / 8) {
    case 1: split_qkv_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(a, total); break;
    case 2: split_qkv_kernel<T, 2><<<blocks, kThreads, 0, stream>>>(a, total); break;
    case 4: split_qkv_kernel<T, 4><<<blocks, kThreads, 0, stream>>>(a, total); break;
    case 8: split_qkv_kernel<T, 8><<<blocks, kThreads, 0, stream>>>(a, total); break;
    case 16: split_qkv_kernel<T, 16><<<blocks, kThreads, 0, stream>>>(a, total); break;
    case 32: split_qkv_kernel<T, 32><<<blocks, kThreads, 0, stream>>>(a, total); break;
    default: break;  // rejected by the op
  }
}

}  // namespace

void launch_split_qkv(const SplitQkvArgs& a, cudaStream_t stream) {
  switch (static_cast<OutDtype>(a.dtype)) {
    case OutDtype::kBFloat16: launch_split_qkv_of<__nv_bfloat16>(a, stream); break;
    case OutDtype::kFloat16: launch_split_qkv_of<__half>(a, stream); break;
    case OutDtype::kFloat32: launch_split_qkv_of<float>(a, stream); break;
  }
}

}  // namespace ptq4arvg
