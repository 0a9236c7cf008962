// Plain C++ interface between the torch-facing op code (ops.cpp) and the CUDA translation units.
// Nothing here includes torch or CUTLASS, so each side compiles on its own.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace ptq4arvg {

enum class OutDtype : int { kBFloat16 = 0, kFloat16 = 1, kFloat32 = 2 };

// One per-row parameter: a device pointer and whether it holds one value per row (else one scalar).
template <class T>
struct RowParam {
  const T* ptr = nullptr;
  bool per_row = false;
};

// xs = clamp(round(x / step[m]) + zero[m], 0, 2^bits - 1) - offset[m],  offset = clamp(zero, 2^bits - 128, 128)
// residual[m] = zero[m] - offset[m]  (what the GEMM epilogue still has to subtract; 0 for <= 7-bit grids)
struct QuantizeArgs {
  const void* x = nullptr;  // [rows, cols], bf16 / fp16 / fp32, contiguous
  int in_dtype = 0;         // OutDtype numbering
  int8_t* out = nullptr;    // [rows, cols]
  int32_t* residual = nullptr;  // [rows] or [1], matching zero.per_row
  RowParam<float> step;
  RowParam<int32_t> zero;
  int64_t rows = 0;
  int64_t cols = 0;  // multiple of 8
  int bits = 8;
};
void launch_quantize_rows(const QuantizeArgs& args, cudaStream_t stream);

// The quantize kernel fused with the operation that produces its input, one row per thread block:
//   y = prologue(x[m, :]);  y = y / channel_scale - channel_shift (optional);  then y is quantized as above with
//   the grid of the row's token group: (step, zero)[token_group[m % period]] (one grid when token_group is null).
// Prologues: none; GELU (tanh approximation); LayerNorm without affine followed by the per-sample modulation
//   y * mod_mul[s, :] + mod_add[s, :], s = m / rows_per_sample (adaLN); the same LayerNorm after a residual
//   update x <- x + T(branch[m, :] * gamma[s, :]) (the product rounded to the branch's dtype T, the sum to x's),
//   whose result is also written to x_sum.
// Also writes the row parameters the GEMM epilogue takes: row_step[m] and residual[m] (both [1] without token
// groups), residual = zero - offset as in QuantizeArgs.
enum class Prologue : int { kNone = 0, kGeluTanh = 1, kLayerNormModulate = 2, kResidualLayerNormModulate = 3 };

struct FusedQuantizeArgs {
  const void* x = nullptr;  // [rows, cols], bf16 / fp16 / fp32, contiguous, 16-byte aligned
  int in_dtype = 0;         // OutDtype numbering
  int8_t* out = nullptr;    // [rows, cols]
  float* row_step = nullptr;     // [rows], or [1] without token groups
  int32_t* residual = nullptr;   // same length as row_step
  const float* step = nullptr;   // [groups]
  const int32_t* zero = nullptr; // [groups]
  const int32_t* token_group = nullptr;  // [period] or null
  int64_t period = 1;
  int64_t rows = 0;
  int64_t cols = 0;  // multiple of 8, at most 8 * 1024
  int bits = 8;
  Prologue prologue = Prologue::kNone;
  float eps = 1e-6f;
  const float* mod_mul = nullptr;  // [samples, cols] rows mod_stride apart (kLayerNormModulate)
  const float* mod_add = nullptr;
  int64_t mod_stride = 0;
  int64_t rows_per_sample = 1;
  const float* channel_scale = nullptr;  // [cols] or null
  const float* channel_shift = nullptr;  // [cols] or null
  // kResidualLayerNormModulate only: branch [rows, cols] dense and gamma [samples, cols] rows gamma_stride apart,
  // both of branch_dtype; x_sum [rows, cols] dense, of x's dtype.
  const void* branch = nullptr;
  const void* gamma = nullptr;
  int branch_dtype = 0;
  int64_t gamma_stride = 0;
  void* x_sum = nullptr;
};
constexpr int kFusedQuantizeMaxCols = 8 * 1024;
void launch_fused_quantize(const FusedQuantizeArgs& args, cudaStream_t stream);

// out[m, n] = out_dtype( act_scale[m] * (w_scale[n] * float(acc - act_zero[m] * wsum[n])) + bias[n] )
// acc is int32: either a finished [M, N] tensor (dequantize) or the GEMM accumulator (fused epilogue).
struct EpilogueArgs {
  RowParam<float> act_scale;
  RowParam<int32_t> act_zero;  // ptr == nullptr: no zero-point correction
  const float* w_scale = nullptr;  // [N]
  const int32_t* wsum = nullptr;   // [N]
  const float* bias = nullptr;     // [N] or nullptr
};

struct DequantizeArgs {
  const int32_t* acc = nullptr;  // [M, N]
  void* out = nullptr;           // [M, N]
  OutDtype out_dtype = OutDtype::kBFloat16;
  EpilogueArgs epi;
  int64_t M = 0, N = 0;  // N multiple of 4
};
void launch_dequantize(const DequantizeArgs& args, cudaStream_t stream);

// Codes stored as int8 read back in a float dtype: out = T((float(code) + shift) * scale), shift and scale read
// from the device (params = [shift, scale]). codes: rows of row_len values, row_stride apart (a view of the
// filled part of a preallocated INT8 KV cache); out: dense [rows, row_len]. row_len and row_stride are
// multiples of 16.
struct DequantizeCodesArgs {
  const int8_t* codes = nullptr;
  void* out = nullptr;
  OutDtype out_dtype = OutDtype::kBFloat16;
  const float* params = nullptr;
  int64_t rows = 0, row_len = 0, row_stride = 0;
};
void launch_dequantize_codes(const DequantizeCodesArgs& args, cudaStream_t stream);

// The attention inputs from a fused qkv projection, in one pass: qkv [S, l, 3, H, c] (dense, dtype T) is split
// into heads, bias [3 H c] (rounded to T) added, and with l2_norm q and k divided by their L2 norm over c (in
// float32, clamped below by eps) and q multiplied by q_mul[h], each rounded once to T, as PyTorch computes
// F.normalize(q).mul(scale) under autocast. q goes to q_out [S, l, H, c] (dense, T); k and v to k_out / v_out at
// element strides (kv_stride_s, kv_stride_h, kv_stride_t) over (sample, head, token) with unit stride over c: a
// KV cache's slots, in T, or with kv_int8 as the codes of the per-tensor grids kv_grid = [k_step, k_zero,
// v_step, v_zero] (device floats, integer zero points) of kv_bits bits, stored as q - c like the activations.
// c is a power of two in [8, 256].
struct SplitQkvArgs {
  const void* qkv = nullptr;
  int dtype = 0;  // OutDtype numbering
  const float* bias = nullptr;
  const float* q_mul = nullptr;
  bool l2_norm = false;
  float eps = 1e-12f;
  void* q_out = nullptr;
  void* k_out = nullptr;
  void* v_out = nullptr;
  int64_t kv_stride_s = 0, kv_stride_h = 0, kv_stride_t = 0;
  bool kv_int8 = false;
  const float* kv_grid = nullptr;
  int kv_bits = 8;
  int64_t samples = 0, tokens = 0, heads = 0, head_dim = 0;
};
void launch_split_qkv(const SplitQkvArgs& args, cudaStream_t stream);

// GroupNorm (affine) of an NCHW tensor followed by SiLU when silu is set, in two passes over x: per (sample,
// group) the float32 mean and biased variance (sums shifted by the group's first value), then
// y = x * (rstd * weight[c]) + (bias[c] - mean * rstd * weight[c]), y = y / (1 + exp(-y)), rounded once to out's
// dtype. x and out dense [N, C, H, W]; C % groups == 0, H * W % 8 == 0.
struct GroupNormArgs {
  const void* x = nullptr;
  int in_dtype = 0;  // OutDtype numbering
  void* out = nullptr;
  OutDtype out_dtype = OutDtype::kBFloat16;
  const float* weight = nullptr;  // [C]
  const float* bias = nullptr;    // [C]
  int64_t samples = 0, channels = 0, pixels = 0;
  int groups = 32;
  float eps = 1e-6f;
  bool silu = true;
};
void launch_group_norm(const GroupNormArgs& args, cudaStream_t stream);

// INT8 GEMM: A = xq [M, K] row-major, B = wq [N, K] row-major (K contiguous in both), D = out [M, N].
struct Int8GemmArgs {
  const int8_t* xq = nullptr;
  const int8_t* wq = nullptr;
  void* out = nullptr;
  OutDtype out_dtype = OutDtype::kBFloat16;
  EpilogueArgs epi;
  int M = 0, N = 0, K = 0;
  int device = 0;
  int sm_count = 0;
};

// One sm_90a tile configuration. Both functions return nullptr on success or a static error message.
struct Sm90GemmConfig {
  const char* name;  // <tile M>x<tile N>_<kernel schedule>[_<cluster>|_streamk]
  size_t (*workspace_size)(const Int8GemmArgs&);
  const char* (*run)(const Int8GemmArgs&, void* workspace, cudaStream_t);
};

// The configuration table (gemm_sm90_table.cpp); the int8_linear op takes an index into it.
int sm90_config_count();
const Sm90GemmConfig& sm90_config(int index);

// CUTLASS 2.x INT8 GEMM (mma.sync, cp.async) for sm_80 / sm_86 / sm_89, with the same fused epilogue; it also runs
// on later GPUs. Both functions return nullptr / the size on success, or a static error message (run).
size_t sm80_gemm_workspace_size(const Int8GemmArgs& args);
const char* run_sm80_gemm(const Int8GemmArgs& args, void* workspace, cudaStream_t stream);
// The tile run_sm80_gemm picks (0: 128x128, 1: 64x64), and the GEMM with a given tile (tests, sweeps).
int sm80_gemm_tile_for(const Int8GemmArgs& args);
const char* run_sm80_gemm_tile(const Int8GemmArgs& args, int tile, void* workspace, cudaStream_t stream);

// CUTLASS_VERSION of the headers the GEMMs were built with (e.g. 420 for 4.2.0).
int cutlass_version();

// Architectures the CUDA code was compiled for (nvcc's __CUDA_ARCH_LIST__, e.g. {900}).
int compiled_arch_count();
int compiled_arch(int index);

}  // namespace ptq4arvg
