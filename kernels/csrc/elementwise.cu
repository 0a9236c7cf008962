// Memory-bound kernels: row quantization (bf16/fp16/fp32 -> int8) and the int32 -> float dequantization used
// after torch._int_mm where the fused sm_90a GEMM is not available. Compiled for every architecture in the
// build's arch list. No fast-math: rounding must equal PyTorch's (IEEE division, round-half-to-even).
#include "launchers.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>

namespace ptq4arvg {

#ifdef __CUDA_ARCH_LIST__
static constexpr int kCompiledArchs[] = {__CUDA_ARCH_LIST__};
#else
static constexpr int kCompiledArchs[] = {0};
#endif

namespace {

constexpr int kThreads = 256;

template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ float from_float(float v) { return v; }

// Fixed-size register array that can be moved through memory as 16-byte (or 8-byte) words.
template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// ---- Row quantization ---------------------------------------------------------------------------------------------
//
// Every code must equal the reference's, clamp(round(x / s) + z, 0, 2^b - 1) - c with an IEEE float32 division and
// round-half-to-even. Done literally, each element costs a division, a rounding and a float -> int conversion, all
// on the multiprocessor's quarter-rate units, which held the kernel to half the copy bandwidth. Instead the kernel
// prepares inv = RN(1 / s) once per chunk of a row (8 to 32 elements) and, per element, uses full-rate instructions:
//   * x / s exactly, by two Markstein corrections of q = RN(x * inv): q <- RN(q + (x - s q) inv), each residual
//     exact in one fma. After the first, q is within one ulp of x / s; with inv = RN(1 / s) the second yields
//     RN(x / s) (Markstein's theorem) as long as nothing overflows or underflows, which holds for
//     2^-30 <= |s| <= 2^30 and |x| <= 2^64. Larger |x| (and infinities) are clamped to 2^64, whose quotient lies
//     beyond every grid anyway; an |x| small enough to make the residual subnormal has |x / s| < 2^-70, which
//     rounds to 0 either way.
//   * the rounding after the clamp: for integer bounds, clamp(round(q), -z, 2^b - 1 - z) equals
//     round(clamp(q, -z, 2^b - 1 - z)); adding 1.5 * 2^23 to a float below 2^22 in magnitude rounds it half to
//     even onto an integer held in the low mantissa bits, so the code is one integer subtraction away from the
//     sum's bits (needs |z| <= 2^20).
// Rows whose step or zero point lies outside those ranges take the literal formula.
constexpr int kQuantizeThreads = 128;
constexpr int kMaxDevices = 64;
constexpr float kLargeInput = 0x1p64f;    // |x| clamp of the fast path: keeps x * inv finite
constexpr float kRoundMagic = 0x1.8p23f;  // 1.5 * 2^23
constexpr int32_t kRoundMagicBits = 0x4B400000;

__host__ __device__ __forceinline__ uint32_t float_bits(float v) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(v);
#else
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
#endif
}

__host__ __device__ __forceinline__ float bits_float(uint32_t b) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(b);
#else
  float v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
#endif
}

// Correctly rounded operations that the compiler may not contract into a neighbouring fma.
__host__ __device__ __forceinline__ float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

__host__ __device__ __forceinline__ float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

__host__ __device__ __forceinline__ float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

__host__ __device__ __forceinline__ float reciprocal_rn(float a) {
#ifdef __CUDA_ARCH__
  return __frcp_rn(a);
#else
  return 1.f / a;
#endif
}

__host__ __device__ __forceinline__ int32_t clamp_int(int32_t v, int32_t lo, int32_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// The b-bit grid of one row, prepared once per chunk (8 to 32 elements of one row).
struct RowGrid {
  float step, inv_step;  // s and RN(1 / s)
  float lo, hi;          // -z and 2^b - 1 - z: clamping x / s to them clamps the code to [0, 2^b - 1]
  float zero_f, qmax_f;  // z and 2^b - 1, for the literal formula
  int32_t zero, offset;  // z and c = clamp(z, 2^b - 128, 128), which keeps q - c inside int8
  int32_t code_bias;     // bits(rounded + 1.5 * 2^23) - code_bias = round(x / s) + z - c
  bool fast;             // s and z inside the ranges where the fast arithmetic is exact
};

__host__ __device__ __forceinline__ RowGrid make_row_grid(float s, int32_t z, int bits) {
  RowGrid g;
  const int32_t qmax = (1 << bits) - 1;
  const float magnitude = fabsf(s);
  g.fast = magnitude >= 0x1p-30f && magnitude <= 0x1p30f && z >= -(1 << 20) && z <= (1 << 20);
  const int32_t zc = clamp_int(z, -(1 << 20), 1 << 20);  // z on fast rows; keeps the others free of overflow
  g.step = s;
  g.inv_step = reciprocal_rn(g.fast ? s : 1.f);
  g.lo = static_cast<float>(-zc);
  g.hi = static_cast<float>(qmax - zc);
  g.zero_f = static_cast<float>(z);
  g.qmax_f = static_cast<float>(qmax);
  g.zero = z;
  g.offset = clamp_int(z, (1 << bits) - 128, 128);
  g.code_bias = kRoundMagicBits - zc + g.offset;
  return g;
}

// RN(x / s) on fast rows, for |x| <= 2^64 (see above).
__host__ __device__ __forceinline__ float divide_by_step(float x, const RowGrid& g) {
  const float q = mul_rn(x, g.inv_step);
  const float q1 = fmaf(fmaf(-g.step, q, x), g.inv_step, q);
  return fmaf(fmaf(-g.step, q1, x), g.inv_step, q1);
}

// q - c of one element, an int32 in [-128, 127].
template <bool kFast>
__host__ __device__ __forceinline__ int32_t quantize_element(float x, const RowGrid& g) {
  if constexpr (kFast) {
    // NaN becomes -2^64, hence code 0, as in the literal formula (fmaxf returns the number)
    const float q = divide_by_step(fminf(fmaxf(x, -kLargeInput), kLargeInput), g);
    const float clamped = fminf(fmaxf(q, g.lo), g.hi);
    return static_cast<int32_t>(float_bits(add_rn(clamped, kRoundMagic))) - g.code_bias;
  } else {
    float r = add_rn(rintf(div_rn(x, g.step)), g.zero_f);
    r = fminf(fmaxf(r, 0.f), g.qmax_f);
    return static_cast<int32_t>(r) - g.offset;
  }
}

__host__ __device__ __forceinline__ uint32_t pack_int8x4(int32_t a, int32_t b, int32_t c, int32_t d) {
  return (static_cast<uint32_t>(a) & 0xffu) | ((static_cast<uint32_t>(b) & 0xffu) << 8) |
         ((static_cast<uint32_t>(c) & 0xffu) << 16) | (static_cast<uint32_t>(d) << 24);
}

// 32-bit word i of registers loaded as 16-byte vectors (i is a compile-time constant once unrolled).
template <int N>
__host__ __device__ __forceinline__ uint32_t word(const uint4 (&v)[N], int i) {
  const uint4& w = v[i / 4];
  switch (i % 4) {
    case 0: return w.x;
    case 1: return w.y;
    case 2: return w.z;
    default: return w.w;
  }
}

// Element i, as float, of a chunk of T loaded as 16-byte vectors.
template <class T>
struct ChunkElement;
template <>
struct ChunkElement<__nv_bfloat16> {
  template <int N>
  __host__ __device__ static float get(const uint4 (&v)[N], int i) {
    const uint32_t w = word(v, i / 2);
    return bits_float(i % 2 ? (w & 0xffff0000u) : (w << 16));  // bf16 is the top half of a float
  }
};
template <>
struct ChunkElement<__half> {
  template <int N>
  __host__ __device__ static float get(const uint4 (&v)[N], int i) {
    const uint32_t w = word(v, i / 2);
    return __half2float(__ushort_as_half(static_cast<unsigned short>(i % 2 ? w >> 16 : w & 0xffffu)));
  }
};
template <>
struct ChunkElement<float> {
  template <int N>
  __host__ __device__ static float get(const uint4 (&v)[N], int i) {
    return bits_float(word(v, i));
  }
};

template <class T, bool kFast, int N, int kWords>
__host__ __device__ __forceinline__ void quantize_chunk(const uint4 (&in)[N], const RowGrid& g,
                                                        uint32_t (&codes)[kWords]) {
#pragma unroll
  for (int j = 0; j < kWords; ++j) {
    codes[j] = pack_int8x4(quantize_element<kFast>(ChunkElement<T>::get(in, 4 * j), g),
                           quantize_element<kFast>(ChunkElement<T>::get(in, 4 * j + 1), g),
                           quantize_element<kFast>(ChunkElement<T>::get(in, 4 * j + 2), g),
                           quantize_element<kFast>(ChunkElement<T>::get(in, 4 * j + 3), g));
  }
}

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

}  // namespace

void launch_quantize_rows(const QuantizeArgs& a, cudaStream_t stream) {
  switch (static_cast<OutDtype>(a.in_dtype)) {
    case OutDtype::kBFloat16: launch_quantize_rows_of<__nv_bfloat16>(a, stream); break;
    case OutDtype::kFloat16: launch_quantize_rows_of<__half>(a, stream); break;
    case OutDtype::kFloat32: launch_quantize_rows_of<float>(a, stream); break;
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
