// Memory-bound kernels: row quantization (bf16/fp16/fp32 -> int8) and the int32 -> float dequantization used
// after torch._int_mm where the fused sm_90a GEMM is not available. Compiled for every architecture in the
// build's arch list. No fast-math: rounding must equal PyTorch's (IEEE division, round-half-to-even).
#include "launchers.h"
#include "quantize_math.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <type_traits>

namespace ptq4arvg {

#ifdef __CUDA_ARCH_LIST__
static constexpr int kCompiledArchs[] = {__CUDA_ARCH_LIST__};
#else
static constexpr int kCompiledArchs[] = {0};
#endif

namespace {

constexpr int kThreads = 256;

// A grid-stride loop over chunks of kVec consecutive elements of one row (16-byte loads, 8- or 16-byte stores),
// with as many blocks as fit on the GPU at once. The chunk's (row, column) is stepped by the grid's stride
// without dividing; the row's step and zero point are read once per chunk.
template <class T, int kVec>
__global__ void __launch_bounds__(kQuantizeThreads)
    quantize_rows_kernel(const T* __restrict__ x, int8_t* __restrict__ out, int32_t* __restrict__ residual,
                         RowParam<float> step, RowParam<int32_t> zero, uint64_t rows, uint64_t vecs_per_row,
                         uint64_t stride_rows, uint64_t stride_vecs, int bits) {
  constexpr int kInVectors = kVec * static_cast<int>(sizeof(T)) / 16;
  constexpr int kOutWords = kVec / 4;
  static_assert(kInVectors >= 1 && kOutWords >= 2, "a chunk is at least one 16-byte load and one 8-byte store");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched with programmatic dependent launch: wait until the kernel before has finished and its writes are
  // visible (x may be its output). Then let the consuming GEMM be scheduled: it waits for this grid in turn.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  const uint32_t first = blockIdx.x * kQuantizeThreads + threadIdx.x;
  // The kernel's only division (in 32 bits unless a row holds 2^35 elements); the loop steps without dividing.
  uint64_t row = vecs_per_row >> 32 ? first / vecs_per_row : first / static_cast<uint32_t>(vecs_per_row);
  uint64_t vec = first - row * vecs_per_row;
  while (row < rows) {
    const uint64_t chunk = row * vecs_per_row + vec;
    uint4 in[kInVectors];
    const uint4* src = reinterpret_cast<const uint4*>(x) + chunk * kInVectors;
#pragma unroll
    for (int i = 0; i < kInVectors; ++i) in[i] = __ldcs(src + i);  // read once: evict first
    const RowGrid g = make_row_grid(step.ptr[step.per_row ? row : 0], zero.ptr[zero.per_row ? row : 0], bits);
    if (vec == 0 && (zero.per_row || row == 0)) residual[zero.per_row ? row : 0] = g.zero - g.offset;

    uint32_t codes[kOutWords];
    if (g.fast) {
      quantize_chunk<T, true>(in, g, codes);
    } else {
      quantize_chunk<T, false>(in, g, codes);
    }
    if constexpr (kOutWords % 4 == 0) {
      uint4* dst = reinterpret_cast<uint4*>(out) + chunk * (kOutWords / 4);
#pragma unroll
      for (int j = 0; j < kOutWords / 4; ++j)
        dst[j] = make_uint4(codes[4 * j], codes[4 * j + 1], codes[4 * j + 2], codes[4 * j + 3]);
    } else {
      reinterpret_cast<uint2*>(out)[chunk] = make_uint2(codes[0], codes[1]);
    }

    vec += stride_vecs;
    row += stride_rows;
    if (vec >= vecs_per_row) {
      vec -= vecs_per_row;
      ++row;
    }
  }
}

// How one quantize kernel is launched on one device, looked up once per device.
struct QuantizeLaunchPlan {
  unsigned resident_blocks = 1;  // blocks that fit on the whole GPU at once
  bool programmatic = false;     // the kernel waits for its predecessor itself (griddepcontrol, sm_90 code)
};

template <class T, int kVec>
QuantizeLaunchPlan quantize_launch_plan() {
  int device = 0;
  cudaGetDevice(&device);
  const auto query = [device] {
    QuantizeLaunchPlan plan;
    int sms = 1, blocks_per_sm = 1, major = 0, minor = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, quantize_rows_kernel<T, kVec>, kQuantizeThreads, 0);
    plan.resident_blocks = static_cast<unsigned>(std::max(sms, 1) * std::max(blocks_per_sm, 1));
    // The device runs the best compiled architecture up to its own: that code has the griddepcontrol
    // instructions (and may be launched programmatically) when some compiled architecture in [sm_90, device] exists.
    const int device_arch = major * 100 + minor * 10;
    for (int arch : kCompiledArchs) plan.programmatic |= arch >= 900 && arch <= device_arch;
    return plan;
  };
  if (device < 0 || device >= kMaxDevices) return query();
  static QuantizeLaunchPlan plans[kMaxDevices];
  static std::once_flag queried[kMaxDevices];
  std::call_once(queried[device], [&] { plans[device] = query(); });
  return plans[device];
}

template <class T, int kVec>
void launch_quantize(const QuantizeArgs& a, cudaStream_t stream) {
  const uint64_t vecs_per_row = static_cast<uint64_t>(a.cols) / kVec;
  const uint64_t chunks = static_cast<uint64_t>(a.rows) * vecs_per_row;
  if (chunks == 0) return;
  const QuantizeLaunchPlan plan = quantize_launch_plan<T, kVec>();
  // Small inputs: one chunk per thread (the fewest round trips to memory); large ones: one resident wave.
  const auto blocks = static_cast<unsigned>(
      std::min<uint64_t>((chunks + kQuantizeThreads - 1) / kQuantizeThreads, plan.resident_blocks));
  const uint64_t stride = static_cast<uint64_t>(blocks) * kQuantizeThreads;

  cudaLaunchAttribute programmatic{};
  programmatic.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  programmatic.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(kQuantizeThreads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = &programmatic;
  config.numAttrs = plan.programmatic ? 1 : 0;  // lets the launch overlap the tail of the kernel before
  cudaLaunchKernelEx(&config, quantize_rows_kernel<T, kVec>, static_cast<const T*>(a.x), a.out, a.residual, a.step,
                     a.zero, static_cast<uint64_t>(a.rows), vecs_per_row, stride / vecs_per_row,
                     stride % vecs_per_row, a.bits);
}

// The widest chunk that divides the rows: four 16-byte loads per thread (32 bf16/fp16 or 16 fp32 elements), else
// 16 elements, else 8 (the op requires K % 8 == 0).
template <class T>
void launch_quantize_rows_of(const QuantizeArgs& a, cudaStream_t stream) {
  constexpr int kWide = 64 / static_cast<int>(sizeof(T));
  if (a.cols % kWide == 0) {
    launch_quantize<T, kWide>(a, stream);
  } else if (kWide > 16 && a.cols % 16 == 0) {
    launch_quantize<T, 16>(a, stream);
  } else {
    launch_quantize<T, 8>(a, stream);
  }
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

// 16 codes per thread: one 16-byte load, 16 output elements written as 16-byte vectors.
template <class T>
__global__ void dequantize_codes_kernel(const int8_t* __restrict__ codes, T* __restrict__ out,
                                        const float* __restrict__ params, uint64_t chunks, uint64_t chunks_per_row,
                                        uint64_t row_stride) {
  const uint64_t chunk = static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (chunk >= chunks) return;
  const float shift = params[0], scale = params[1];
  const uint64_t row = chunk / chunks_per_row;
  const int8_t* src_row = codes + row * row_stride;
  const uint4 packed = reinterpret_cast<const uint4*>(src_row)[chunk - row * chunks_per_row];
  const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
  Pack<T, 16> y;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const auto code = static_cast<int8_t>((words[i / 4] >> (8 * (i % 4))) & 0xffu);
    y.v[i] = from_float<T>(mul_rn(add_rn(static_cast<float>(code), shift), scale));
  }
  constexpr int kVectors = 16 * static_cast<int>(sizeof(T)) / 16;
  const auto* src = reinterpret_cast<const uint4*>(&y);
  uint4* dst = reinterpret_cast<uint4*>(out) + chunk * kVectors;
#pragma unroll
  for (int i = 0; i < kVectors; ++i) dst[i] = src[i];
}

// ---- Quantization fused with its producer ---------------------------------------------------------------------------
//
// One thread block per row, one 8-element chunk per thread: the whole row sits in registers, so the LayerNorm's two
// reductions (mean, then the variance about it) cost no second read. The arithmetic mirrors PyTorch's in float32
// (no fused multiply-adds where PyTorch rounds twice); the activation's own value is never rounded to 16 bits.

// Sum over the block; every thread gets the total. `partial` holds one value per warp.
__device__ __forceinline__ float block_sum(float v, float* partial) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float total = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.f;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(0xffffffffu, total, offset);
  __syncthreads();  // `partial` is reused by the next reduction
  return total;
}

// GELU with the tanh approximation, as PyTorch computes it in float32.
__device__ __forceinline__ float gelu_tanh(float x) {
  constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  constexpr float kKappa = 0.044715f;
  const float inner = kBeta * (x + kKappa * (x * x * x));
  return 0.5f * x * (1.f + tanhf(inner));
}

// TB: the dtype of the residual branch and its gamma (kResidualLayerNormModulate only).
template <class T, Prologue kPrologue, class TB = T>
__global__ void __launch_bounds__(1024) fused_quantize_kernel(const FusedQuantizeArgs a) {
  __shared__ float partial[32];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  const int64_t row = blockIdx.x;
  const int64_t col = 8 * static_cast<int64_t>(threadIdx.x);
  const bool active = col < a.cols;
  float v[8] = {};
  if (active) load8(static_cast<const T*>(a.x) + row * a.cols + col, v);
  constexpr bool kResidual = kPrologue == Prologue::kResidualLayerNormModulate;
  if constexpr (kResidual) {
    if (active) {  // x + T_branch(branch * gamma), rounded to T: the model's `x + branch.mul(gamma)`
      float branch[8], gamma[8];
      load8(static_cast<const TB*>(a.branch) + row * a.cols + col, branch);
      load8(static_cast<const TB*>(a.gamma) + (row / a.rows_per_sample) * a.gamma_stride + col, gamma);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = round_to<T>(add_rn(v[i], round_to<TB>(mul_rn(branch[i], gamma[i]))));
      store8(static_cast<T*>(a.x_sum) + row * a.cols + col, v);
    }
  }

  if constexpr (kPrologue == Prologue::kLayerNormModulate || kResidual) {
    const float cols = static_cast<float>(a.cols);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) sum += v[i];
    const float mean = block_sum(sum, partial) / cols;
    float squares = 0.f;
    if (active) {
#pragma unroll
      for (int i = 0; i < 8; ++i) squares += (v[i] - mean) * (v[i] - mean);
    }
    const float rstd = 1.f / sqrtf(block_sum(squares, partial) / cols + a.eps);
    if (active) {
      const int64_t sample = row / a.rows_per_sample;
      float mul[8], add[8];
      load8(a.mod_mul + sample * a.mod_stride + col, mul);
      load8(a.mod_add + sample * a.mod_stride + col, add);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = add_rn(mul_rn(mul_rn(add_rn(v[i], -mean), rstd), mul[i]), add[i]);
    }
  } else if constexpr (kPrologue == Prologue::kGeluTanh) {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = gelu_tanh(v[i]);
  }
  if (!active) return;  // no block-wide synchronisation below

  if (a.channel_scale != nullptr) {
    float scale[8];
    load8(a.channel_scale + col, scale);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = div_rn(v[i], scale[i]);
  }
  if (a.channel_shift != nullptr) {
    float shift[8];
    load8(a.channel_shift + col, shift);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = add_rn(v[i], -shift[i]);
  }

  const int32_t group = a.token_group != nullptr ? a.token_group[row % a.period] : 0;
  const RowGrid g = make_row_grid(a.step[group], a.zero[group], a.bits);
  uint32_t codes[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (g.fast) {
      codes[j] = pack_int8x4(quantize_element<true>(v[4 * j], g), quantize_element<true>(v[4 * j + 1], g),
                             quantize_element<true>(v[4 * j + 2], g), quantize_element<true>(v[4 * j + 3], g));
    } else {
      codes[j] = pack_int8x4(quantize_element<false>(v[4 * j], g), quantize_element<false>(v[4 * j + 1], g),
                             quantize_element<false>(v[4 * j + 2], g), quantize_element<false>(v[4 * j + 3], g));
    }
  }
  *reinterpret_cast<uint2*>(a.out + row * a.cols + col) = make_uint2(codes[0], codes[1]);
  if (threadIdx.x == 0 && (a.token_group != nullptr || row == 0)) {
    const int64_t i = a.token_group != nullptr ? row : 0;
    a.row_step[i] = g.step;
    a.residual[i] = g.zero - g.offset;
  }
}

// Whether kernels may be launched programmatically on the current device: as in quantize_launch_plan, which
// this reuses (its occupancy figure is not needed here).
bool programmatic_launch_allowed() { return quantize_launch_plan<float, 16>().programmatic; }

template <class T, Prologue kPrologue, class TB = T>
void launch_fused_quantize_of(const FusedQuantizeArgs& a, cudaStream_t stream) {
  const int chunks = static_cast<int>(a.cols / 8);
  cudaLaunchAttribute programmatic{};
  programmatic.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  programmatic.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(a.rows));
  config.blockDim = dim3(static_cast<unsigned>(std::max(32, (chunks + 31) / 32 * 32)));
  config.stream = stream;
  config.attrs = &programmatic;
  config.numAttrs = programmatic_launch_allowed() ? 1 : 0;
  cudaLaunchKernelEx(&config, fused_quantize_kernel<T, kPrologue, TB>, a);
}

template <class T>
void launch_fused_quantize_with(const FusedQuantizeArgs& a, cudaStream_t stream) {
  switch (a.prologue) {
    case Prologue::kNone: launch_fused_quantize_of<T, Prologue::kNone>(a, stream); break;
    case Prologue::kGeluTanh: launch_fused_quantize_of<T, Prologue::kGeluTanh>(a, stream); break;
    case Prologue::kLayerNormModulate: launch_fused_quantize_of<T, Prologue::kLayerNormModulate>(a, stream); break;
    case Prologue::kResidualLayerNormModulate:
      // the branch has x's dtype, or x is float32 (a float32 residual stream fed by 16-bit branches)
      if (std::is_same_v<T, float> && a.branch_dtype == static_cast<int>(OutDtype::kBFloat16)) {
        launch_fused_quantize_of<T, Prologue::kResidualLayerNormModulate, __nv_bfloat16>(a, stream);
      } else if (std::is_same_v<T, float> && a.branch_dtype == static_cast<int>(OutDtype::kFloat16)) {
        launch_fused_quantize_of<T, Prologue::kResidualLayerNormModulate, __half>(a, stream);
      } else {
        launch_fused_quantize_of<T, Prologue::kResidualLayerNormModulate, T>(a, stream);
      }
      break;
  }
}

}  // namespace

void launch_quantize_rows(const QuantizeArgs& a, cudaStream_t stream) {
  switch (static_cast<OutDtype>(a.in_dtype)) {
    case OutDtype::kBFloat16: launch_quantize_rows_of<__nv_bfloat16>(a, stream); break;
    case OutDtype::kFloat16: launch_quantize_rows_of<__half>(a, stream); break;
    case OutDtype::kFloat32: launch_quantize_rows_of<float>(a, stream); break;
  }
}

void launch_fused_quantize(const FusedQuantizeArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0) return;
  switch (static_cast<OutDtype>(a.in_dtype)) {
    case OutDtype::kBFloat16: launch_fused_quantize_with<__nv_bfloat16>(a, stream); break;
    case OutDtype::kFloat16: launch_fused_quantize_with<__half>(a, stream); break;
    case OutDtype::kFloat32: launch_fused_quantize_with<float>(a, stream); break;
  }
}

void launch_dequantize_codes(const DequantizeCodesArgs& a, cudaStream_t stream) {
  const uint64_t per_row = static_cast<uint64_t>(a.row_len) / 16;
  const uint64_t chunks = static_cast<uint64_t>(a.rows) * per_row;
  const auto blocks = static_cast<unsigned>((chunks + kThreads - 1) / kThreads);
  if (blocks == 0) return;
  const auto stride = static_cast<uint64_t>(a.row_stride);
  switch (a.out_dtype) {
    case OutDtype::kBFloat16:
      dequantize_codes_kernel<<<blocks, kThreads, 0, stream>>>(a.codes, static_cast<__nv_bfloat16*>(a.out), a.params,
                                                               chunks, per_row, stride);
      break;
    case OutDtype::kFloat16:
      dequantize_codes_kernel<<<blocks, kThreads, 0, stream>>>(a.codes, static_cast<__half*>(a.out), a.params, chunks,
                                                               per_row, stride);
      break;
    case OutDtype::kFloat32:
      dequantize_codes_kernel<<<blocks, kThreads, 0, stream>>>(a.codes, static_cast<float*>(a.out), a.params, chunks,
                                                               per_row, stride);
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

int compiled_arch_count() { return static_cast<int>(sizeof(kCompiledArchs) / sizeof(int)); }
int compiled_arch(int index) { return kCompiledArchs[index]; }

}  // namespace ptq4arvg
