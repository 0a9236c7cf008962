// Exact row quantization arithmetic and vector access shared by the memory-bound kernels (elementwise.cu,
// attention_inputs.cu).
// No fast-math: every code must equal PyTorch's clamp(round(x / s) + z, 0, 2^b - 1) with IEEE float32 division and
// round-half-to-even.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace ptq4arvg {

template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ float from_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

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

// v rounded to T and back (the rounding a PyTorch op writing T applies).
template <class T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// Eight consecutive elements of T at p (16-byte aligned), as floats.
template <class T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  constexpr int kVectors = 8 * static_cast<int>(sizeof(T)) / 16;
  uint4 in[kVectors];
#pragma unroll
  for (int i = 0; i < kVectors; ++i) in[i] = reinterpret_cast<const uint4*>(p)[i];
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = ChunkElement<T>::get(in, i);
}

template <class T>
__device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
  Pack<T, 8> out;
#pragma unroll
  for (int i = 0; i < 8; ++i) out.v[i] = from_float<T>(v[i]);
  *reinterpret_cast<Pack<T, 8>*>(p) = out;
}

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

}  // namespace ptq4arvg
