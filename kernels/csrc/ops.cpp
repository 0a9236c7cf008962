// Torch operator schemas and CUDA implementations of the ptq4arvg_kernels library. Meta ("fake") kernels are
// registered from Python (kernels/_extension.py), so the ops trace under torch.compile and capture in CUDA graphs:
// no host synchronisation, the current stream, workspaces from the caching allocator.
#include "launchers.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <vector>

namespace ptq4arvg {
namespace {

OutDtype to_out_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return OutDtype::kBFloat16;
    case at::kHalf: return OutDtype::kFloat16;
    case at::kFloat: return OutDtype::kFloat32;
    default: TORCH_CHECK(false, "unsupported dtype ", t, ": expected bfloat16, float16 or float32");
  }
}

// TMA and the vectorised kernels read 16-byte aligned, dense rows: copy anything else (offset views) once.
at::Tensor aligned(const at::Tensor& t) {
  if (t.is_contiguous() && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0) return t;
  return t.clone(at::MemoryFormat::Contiguous);
}

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), " (got ", t.device(), ")");
}

template <class T>
RowParam<T> row_param(const at::Tensor& t, int64_t rows, at::ScalarType dtype, const at::Tensor& like,
                      const char* name) {
  check_cuda(t, like, name);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, " (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.numel() == 1 || (t.dim() == 1 && t.size(0) == rows), name,
              " must hold one value or one per row (", rows, "), got shape ", t.sizes());
  return {t.data_ptr<T>(), t.numel() != 1 || rows == 1};
}

template <class T>
const T* col_param(const std::optional<at::Tensor>& t, int64_t cols, at::ScalarType dtype, const at::Tensor& like,
                   const char* name) {
  if (!t.has_value()) return nullptr;
  check_cuda(*t, like, name);
  TORCH_CHECK(t->scalar_type() == dtype, name, " must be ", dtype, " (got ", t->scalar_type(), ")");
  TORCH_CHECK(t->dim() == 1 && t->size(0) == cols, name, " must have shape [", cols, "], got ", t->sizes());
  return t->data_ptr<T>();
}

std::optional<at::Tensor> aligned(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(aligned(*t)) : std::nullopt;
}

// The epilogue's vectors, made dense and aligned; they must outlive the launch.
struct EpilogueTensors {
  at::Tensor act_scale;
  std::optional<at::Tensor> act_zero;
  at::Tensor w_scale, wsum;
  std::optional<at::Tensor> bias;

  EpilogueTensors(const at::Tensor& act_scale_, const std::optional<at::Tensor>& act_zero_,
                  const at::Tensor& w_scale_, const at::Tensor& wsum_, const std::optional<at::Tensor>& bias_)
      : act_scale(aligned(act_scale_)), act_zero(aligned(act_zero_)), w_scale(aligned(w_scale_)),
        wsum(aligned(wsum_)), bias(aligned(bias_)) {}
};

EpilogueArgs epilogue_args(int64_t M, int64_t N, const EpilogueTensors& t, const at::Tensor& like) {
  const auto& [act_scale, act_zero, w_scale, wsum, bias] = t;
  EpilogueArgs e;
  e.act_scale = row_param<float>(act_scale, M, at::kFloat, like, "act_scale");
  if (act_zero.has_value()) e.act_zero = row_param<int32_t>(*act_zero, M, at::kInt, like, "act_zero");
  e.w_scale = col_param<float>(w_scale, N, at::kFloat, like, "w_scale");
  e.wsum = col_param<int32_t>(wsum, N, at::kInt, like, "wsum");
  e.bias = col_param<float>(bias, N, at::kFloat, like, "bias");
  return e;
}

std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x_in, const at::Tensor& step_in,
                                                 const at::Tensor& zero_point_in, int64_t bits) {
  const at::Tensor x = aligned(x_in), step = aligned(step_in), zero_point = aligned(zero_point_in);
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be in [2, 8], got ", bits);
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension");
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  TORCH_CHECK(cols % 8 == 0, "the last dimension of x must be a multiple of 8, got ", cols);
  TORCH_CHECK(x.numel() / 8 < (int64_t{1} << 32), "x is too large for one quantize launch (", x.numel(),
              " elements); split it along the rows");
  const c10::cuda::CUDAGuard guard(x.device());
  QuantizeArgs a;
  a.in_dtype = static_cast<int>(to_out_dtype(x.scalar_type()));
  a.step = row_param<float>(step, rows, at::kFloat, x, "step");
  a.zero = row_param<int32_t>(zero_point, rows, at::kInt, x, "zero_point");
  auto out = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto residual = at::empty(zero_point.sizes(), zero_point.options());
  a.x = x.data_ptr();
  a.out = out.data_ptr<int8_t>();
  a.residual = residual.data_ptr<int32_t>();
  a.rows = rows;
  a.cols = cols;
  a.bits = static_cast<int>(bits);
  launch_quantize_rows(a, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, residual};
}

const float* float_vector(const std::optional<at::Tensor>& t, int64_t length, const at::Tensor& like,
                          const char* name) {
  if (!t.has_value()) return nullptr;
  check_cuda(*t, like, name);
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == length && t->is_contiguous(), name,
              " must be a contiguous float32 vector of length ", length, ", got ", t->scalar_type(), " ", t->sizes());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
  return t->data_ptr<float>();
}

// The fused quantize kernel's arguments shared by fused_quantize and fused_residual_quantize; the caller sets x,
// the outputs and, for the residual prologue, the branch.
struct FusedQuantizeCall {
  at::Tensor x, out, row_step, residual;
  FusedQuantizeArgs args;
};

FusedQuantizeCall fused_quantize_call(
    const at::Tensor& x_in, const at::Tensor& step, const at::Tensor& zero_point,
    const std::optional<at::Tensor>& token_group, int64_t bits, Prologue prologue, double eps,
    const std::optional<at::Tensor>& mod_mul, const std::optional<at::Tensor>& mod_add,
    const std::optional<at::Tensor>& channel_scale, const std::optional<at::Tensor>& channel_shift) {
  FusedQuantizeCall c{aligned(x_in), {}, {}, {}, {}};
  const at::Tensor& x = c.x;
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be in [2, 8], got ", bits);
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension");
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  TORCH_CHECK(cols % 8 == 0 && cols <= kFusedQuantizeMaxCols, "the last dimension of x must be a multiple of 8 and "
              "at most ", kFusedQuantizeMaxCols, ", got ", cols);
  TORCH_CHECK(rows < (int64_t{1} << 31), "x has too many rows for one launch (", rows, ")");
  check_cuda(step, x, "step");
  check_cuda(zero_point, x, "zero_point");
  TORCH_CHECK(step.scalar_type() == at::kFloat && step.dim() == 1 && step.is_contiguous(),
              "step must be a contiguous float32 table [groups]");
  TORCH_CHECK(zero_point.scalar_type() == at::kInt && zero_point.sizes() == step.sizes() && zero_point.is_contiguous(),
              "zero_point must be a contiguous int32 table of step's shape");
  FusedQuantizeArgs& a = c.args;
  a.in_dtype = static_cast<int>(to_out_dtype(x.scalar_type()));
  a.rows = rows;
  a.cols = cols;
  a.bits = static_cast<int>(bits);
  a.prologue = prologue;
  a.eps = static_cast<float>(eps);
  a.step = step.data_ptr<float>();
  a.zero = zero_point.data_ptr<int32_t>();
  int64_t param_rows = 1;
  if (token_group.has_value()) {
    check_cuda(*token_group, x, "token_group");
    TORCH_CHECK(token_group->scalar_type() == at::kInt && token_group->dim() == 1 && token_group->is_contiguous() &&
                token_group->numel() > 0, "token_group must be a non-empty contiguous int32 vector [tokens]");
    a.period = token_group->numel();
    TORCH_CHECK(rows % a.period == 0, "the rows (", rows, ") must be whole sequences of ", a.period, " tokens");
    a.token_group = token_group->data_ptr<int32_t>();
    param_rows = rows;
  } else {
    TORCH_CHECK(step.numel() == 1, "step holds ", step.numel(), " groups: pass token_group to choose among them");
  }
  if (prologue == Prologue::kLayerNormModulate || prologue == Prologue::kResidualLayerNormModulate) {
    TORCH_CHECK(mod_mul.has_value() && mod_add.has_value(), "the layernorm prologue needs mod_mul and mod_add");
    for (const auto* t : {&*mod_mul, &*mod_add}) {
      check_cuda(*t, x, "mod_mul / mod_add");
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(1) == cols && t->stride(1) == 1 &&
                  t->stride(0) % 4 == 0 && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                  "mod_mul and mod_add must be float32 [samples, ", cols, "] with unit column stride and 16-byte "
                  "aligned rows, got ", t->sizes(), " strides ", t->strides());
    }
    TORCH_CHECK(mod_mul->size(0) == mod_add->size(0) && mod_mul->stride(0) == mod_add->stride(0),
                "mod_mul and mod_add must have the same shape and strides");
    const int64_t samples = mod_mul->size(0);
    TORCH_CHECK(samples > 0 && rows % samples == 0, "the rows (", rows, ") must split evenly into the ", samples,
                " samples of mod_mul / mod_add");
    a.mod_mul = mod_mul->data_ptr<float>();
    a.mod_add = mod_add->data_ptr<float>();
    a.mod_stride = mod_mul->stride(0);
    a.rows_per_sample = rows / samples;
  }
  a.channel_scale = float_vector(channel_scale, cols, x, "channel_scale");
  a.channel_shift = float_vector(channel_shift, cols, x, "channel_shift");
  c.out = at::empty(x.sizes(), x.options().dtype(at::kChar));
  c.row_step = at::empty({param_rows}, x.options().dtype(at::kFloat));
  c.residual = at::empty({param_rows}, x.options().dtype(at::kInt));
  a.x = x.data_ptr();
  a.out = c.out.data_ptr<int8_t>();
  a.row_step = c.row_step.data_ptr<float>();
  a.residual = c.residual.data_ptr<int32_t>();
  return c;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_quantize(
    const at::Tensor& x, const at::Tensor& step, const at::Tensor& zero_point,
    const std::optional<at::Tensor>& token_group, int64_t bits, int64_t prologue, double eps,
    const std::optional<at::Tensor>& mod_mul, const std::optional<at::Tensor>& mod_add,
    const std::optional<at::Tensor>& channel_scale, const std::optional<at::Tensor>& channel_shift) {
  TORCH_CHECK(prologue >= 0 && prologue <= 2, "prologue must be 0 (none), 1 (gelu_tanh) or 2 (layernorm), got ",
              prologue);
  const c10::cuda::CUDAGuard guard(x.device());
  FusedQuantizeCall c = fused_quantize_call(x, step, zero_point, token_group, bits, static_cast<Prologue>(prologue),
                                            eps, mod_mul, mod_add, channel_scale, channel_shift);
  launch_fused_quantize(c.args, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {c.out, c.row_step, c.residual};
}

// x_sum = x + branch * gamma (per sample), then the layernorm prologue on x_sum and the quantization.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_residual_quantize(
    const at::Tensor& x, const at::Tensor& branch_in, const at::Tensor& gamma, const at::Tensor& step,
    const at::Tensor& zero_point, const std::optional<at::Tensor>& token_group, int64_t bits, double eps,
    const at::Tensor& mod_mul, const at::Tensor& mod_add, const std::optional<at::Tensor>& channel_scale,
    const std::optional<at::Tensor>& channel_shift) {
  const c10::cuda::CUDAGuard guard(x.device());
  FusedQuantizeCall c = fused_quantize_call(x, step, zero_point, token_group, bits,
                                            Prologue::kResidualLayerNormModulate, eps, mod_mul, mod_add,
                                            channel_scale, channel_shift);
  const at::Tensor branch = aligned(branch_in);
  FusedQuantizeArgs& a = c.args;
  TORCH_CHECK(branch.sizes() == c.x.sizes(), "branch must have x's shape ", c.x.sizes(), ", got ", branch.sizes());
  TORCH_CHECK(branch.scalar_type() == c.x.scalar_type() || c.x.scalar_type() == at::kFloat,
              "branch must have x's dtype, or x must be float32; got x ", c.x.scalar_type(), " and branch ",
              branch.scalar_type());
  check_cuda(branch, c.x, "branch");
  check_cuda(gamma, c.x, "gamma");
  const int64_t samples = mod_mul.size(0);
  TORCH_CHECK(gamma.scalar_type() == branch.scalar_type() && gamma.dim() == 2 && gamma.size(0) == samples &&
              gamma.size(1) == a.cols && gamma.stride(1) == 1 && gamma.stride(0) % 8 == 0 &&
              reinterpret_cast<uintptr_t>(gamma.data_ptr()) % 16 == 0,
              "gamma must be [", samples, ", ", a.cols, "] of the branch's dtype with unit column stride and 16-byte "
              "aligned rows, got ", gamma.scalar_type(), " ", gamma.sizes(), " strides ", gamma.strides());
  at::Tensor x_sum = at::empty_like(c.x);
  a.branch = branch.data_ptr();
  a.gamma = gamma.data_ptr();
  a.branch_dtype = static_cast<int>(to_out_dtype(branch.scalar_type()));
  a.gamma_stride = gamma.stride(0);
  a.x_sum = x_sum.data_ptr();
  launch_fused_quantize(a, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {x_sum, c.out, c.row_step, c.residual};
}

at::Tensor split_qkv(const at::Tensor& qkv_in, int64_t heads, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& q_mul, bool l2_norm, double eps, const at::Tensor& k_out,
                     const at::Tensor& v_out, const std::optional<at::Tensor>& kv_grid, int64_t kv_bits) {
  const at::Tensor qkv = aligned(qkv_in);
  TORCH_CHECK(qkv.dim() == 3 && heads > 0 && qkv.size(2) % (3 * heads) == 0,
              "qkv must be [samples, tokens, 3 * heads * head_dim], got ", qkv.sizes(), " for ", heads, " heads");
  const int64_t S = qkv.size(0), L = qkv.size(1), width = qkv.size(2) / 3, c = width / heads;
  TORCH_CHECK(c >= 8 && c <= 256 && (c & (c - 1)) == 0, "the head dimension must be a power of two in [8, 256], got ",
              c);
  const auto dtype = qkv.scalar_type();
  const bool codes = k_out.scalar_type() == at::kChar;
  for (const auto* t : {&k_out, &v_out}) {
    check_cuda(*t, qkv, "k_out / v_out");
    TORCH_CHECK(t->dim() == 4 && t->size(0) == S && t->size(1) == heads && t->size(2) == L && t->size(3) == c &&
                t->stride(3) == 1, "k_out and v_out must be [", S, ", ", heads, ", ", L, ", ", c,
                "] views with unit stride over the head dimension, got ", t->sizes(), " strides ", t->strides());
    TORCH_CHECK(t->scalar_type() == (codes ? at::kChar : dtype), "k_out and v_out must both be int8 or ", dtype);
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0 && t->stride(0) % 8 == 0 &&
                t->stride(1) % 8 == 0 && t->stride(2) % 8 == 0, "k_out and v_out must be 16-byte aligned, with "
                "strides that are multiples of 8 elements");
  }
  TORCH_CHECK(k_out.strides() == v_out.strides(), "k_out and v_out must have the same strides");
  if (codes) {
    TORCH_CHECK(kv_grid.has_value(), "int8 k_out / v_out need kv_grid = [k_step, k_zero, v_step, v_zero]");
    check_cuda(*kv_grid, qkv, "kv_grid");
    TORCH_CHECK(kv_grid->scalar_type() == at::kFloat && kv_grid->numel() == 4 && kv_grid->is_contiguous(),
                "kv_grid must be a contiguous float32 [k_step, k_zero, v_step, v_zero]");
    TORCH_CHECK(kv_bits >= 2 && kv_bits <= 8, "kv_bits must be in [2, 8], got ", kv_bits);
  }
  const c10::cuda::CUDAGuard guard(qkv.device());
  at::Tensor q = at::empty({S, L, heads, c}, qkv.options());
  SplitQkvArgs a;
  a.qkv = qkv.data_ptr();
  a.dtype = static_cast<int>(to_out_dtype(dtype));
  a.bias = float_vector(bias, 3 * width, qkv, "bias");
  a.q_mul = float_vector(q_mul, heads, qkv, "q_mul");
  a.l2_norm = l2_norm;
  a.eps = static_cast<float>(eps);
  a.q_out = q.data_ptr();
  a.k_out = k_out.data_ptr();
  a.v_out = v_out.data_ptr();
  a.kv_stride_s = k_out.stride(0);
  a.kv_stride_h = k_out.stride(1);
  a.kv_stride_t = k_out.stride(2);
  a.kv_int8 = codes;
  a.kv_grid = codes ? kv_grid->data_ptr<float>() : nullptr;
  a.kv_bits = static_cast<int>(kv_bits);
  a.samples = S;
  a.tokens = L;
  a.heads = heads;
  a.head_dim = c;
  launch_split_qkv(a, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return q;
}

void check_gemm_operands(const at::Tensor& xq, const at::Tensor& wq) {
  TORCH_CHECK(xq.scalar_type() == at::kChar && wq.scalar_type() == at::kChar, "xq and wq must be int8");
  TORCH_CHECK(xq.dim() == 2 && wq.dim() == 2, "xq must be [M, K] and wq [N, K]");
  TORCH_CHECK(xq.size(1) == wq.size(1), "K mismatch: xq is ", xq.sizes(), ", wq is ", wq.sizes());
  TORCH_CHECK(xq.size(1) % 16 == 0, "K must be a multiple of 16, got ", xq.size(1));
  TORCH_CHECK(wq.size(0) % 8 == 0, "N must be a multiple of 8, got ", wq.size(0));
  check_cuda(wq, xq, "wq");
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// The arguments both GEMM families take; `out` is allocated here.
struct GemmCall {
  at::Tensor xq, wq, out;
  Int8GemmArgs args;
};

GemmCall gemm_call(const at::Tensor& xq_in, const at::Tensor& wq_in, const EpilogueTensors& epi,
                   at::ScalarType out_dtype, const char* op) {
  GemmCall c{aligned(xq_in), aligned(wq_in), {}, {}};
  check_gemm_operands(c.xq, c.wq);
  const int64_t M = c.xq.size(0), N = c.wq.size(0), K = c.xq.size(1);
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf, op, " writes bfloat16 or float16, got ", out_dtype);
  TORCH_CHECK(M < (int64_t{1} << 31) && N < (int64_t{1} << 31) && K < (int64_t{1} << 31), "GEMM too large");
  const int device = c.xq.get_device();
  c.out = at::empty({M, N}, c.xq.options().dtype(out_dtype));
  Int8GemmArgs& a = c.args;
  a.xq = c.xq.data_ptr<int8_t>();
  a.wq = c.wq.data_ptr<int8_t>();
  a.out = c.out.data_ptr();
  a.out_dtype = to_out_dtype(out_dtype);
  a.epi = epilogue_args(M, N, epi, c.xq);
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.K = static_cast<int>(K);
  a.device = device;
  a.sm_count = device_attribute(cudaDevAttrMultiProcessorCount, device);
  return c;
}

at::Tensor int8_linear(const at::Tensor& xq_in, const at::Tensor& wq_in, const at::Tensor& act_scale,
                       const std::optional<at::Tensor>& act_zero, const at::Tensor& w_scale, const at::Tensor& wsum,
                       const std::optional<at::Tensor>& bias, at::ScalarType out_dtype, int64_t config) {
  const EpilogueTensors epi(act_scale, act_zero, w_scale, wsum, bias);
  const c10::cuda::CUDAGuard guard(xq_in.device());
  const int device = xq_in.get_device();
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, device);
  const int minor = device_attribute(cudaDevAttrComputeCapabilityMinor, device);
  TORCH_CHECK(major == 9 && minor == 0, "the CUTLASS INT8 GEMM needs an sm_90 GPU (H100/H200), this is sm_", major,
              minor, "; use kernels.int8_linear, which picks the kernel for the GPU");
  GemmCall c = gemm_call(xq_in, wq_in, epi, out_dtype, "the sm_90a INT8 GEMM");
  const Int8GemmArgs& a = c.args;
  if (a.M == 0 || a.N == 0) return c.out;
  TORCH_CHECK(config >= 0 && config < sm90_config_count(), "config must index sm90_configs() (0 to ",
              sm90_config_count() - 1, "), got ", config);
  const Sm90GemmConfig& cfg = sm90_config(static_cast<int>(config));
  const size_t workspace_bytes = cfg.workspace_size(a);
  at::Tensor workspace;
  if (workspace_bytes > 0) workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, c.xq.options().dtype(at::kByte));
  const char* error = cfg.run(a, workspace_bytes > 0 ? workspace.data_ptr() : nullptr,
                              c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == nullptr, "int8_linear (", cfg.name, ", M=", a.M, " N=", a.N, " K=", a.K, "): ", error);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c.out;
}

at::Tensor int8_linear_sm80(const at::Tensor& xq_in, const at::Tensor& wq_in, const at::Tensor& act_scale,
                            const std::optional<at::Tensor>& act_zero, const at::Tensor& w_scale,
                            const at::Tensor& wsum, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                            int64_t tile) {
  const EpilogueTensors epi(act_scale, act_zero, w_scale, wsum, bias);
  const c10::cuda::CUDAGuard guard(xq_in.device());
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, xq_in.get_device());
  TORCH_CHECK(major >= 8, "the CUTLASS 2.x INT8 GEMM needs an sm_80 or newer GPU, this is sm_", major, "x");
  GemmCall c = gemm_call(xq_in, wq_in, epi, out_dtype, "the sm_80 INT8 GEMM");
  const Int8GemmArgs& a = c.args;
  if (a.M == 0 || a.N == 0) return c.out;
  TORCH_CHECK(tile >= -1 && tile <= 1, "tile must be -1 (automatic), 0 (128x128) or 1 (64x64), got ", tile);
  const int chosen = tile < 0 ? sm80_gemm_tile_for(a) : static_cast<int>(tile);
  const char* error = run_sm80_gemm_tile(a, chosen, nullptr, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == nullptr, "int8_linear_sm80 (tile ", chosen, ", M=", a.M, " N=", a.N, " K=", a.K, "): ", error);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c.out;
}

at::Tensor dequantize_int32(const at::Tensor& acc_in, const at::Tensor& act_scale,
                            const std::optional<at::Tensor>& act_zero, const at::Tensor& w_scale,
                            const at::Tensor& wsum, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  const at::Tensor acc = aligned(acc_in);
  const EpilogueTensors epi(act_scale, act_zero, w_scale, wsum, bias);
  TORCH_CHECK(acc.scalar_type() == at::kInt && acc.dim() == 2, "acc must be an int32 [M, N] tensor");
  TORCH_CHECK(acc.size(1) % 4 == 0, "N must be a multiple of 4, got ", acc.size(1));
  TORCH_CHECK(acc.numel() / 4 < (int64_t{1} << 32), "acc is too large for one dequantize launch; split the rows");
  const c10::cuda::CUDAGuard guard(acc.device());
  const int64_t M = acc.size(0), N = acc.size(1);
  auto out = at::empty({M, N}, acc.options().dtype(out_dtype));
  DequantizeArgs a;
  a.acc = acc.data_ptr<int32_t>();
  a.out = out.data_ptr();
  a.out_dtype = to_out_dtype(out_dtype);
  a.epi = epilogue_args(M, N, epi, acc);
  a.M = M;
  a.N = N;
  launch_dequantize(a, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dequantize_codes(const at::Tensor& codes, const at::Tensor& params, at::ScalarType out_dtype) {
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.dim() == 2 && codes.stride(1) == 1,
              "codes must be an int8 [rows, length] tensor with unit column stride, got ", codes.scalar_type(), " ",
              codes.sizes(), " strides ", codes.strides());
  TORCH_CHECK(codes.size(1) % 16 == 0 && (codes.size(0) <= 1 || codes.stride(0) % 16 == 0) &&
              reinterpret_cast<uintptr_t>(codes.data_ptr()) % 16 == 0,
              "codes rows must hold a multiple of 16 values, start 16-byte aligned and lie a multiple of 16 apart");
  check_cuda(params, codes, "params");
  TORCH_CHECK(params.scalar_type() == at::kFloat && params.numel() == 2 && params.is_contiguous(),
              "params must be a contiguous float32 [shift, scale]");
  const c10::cuda::CUDAGuard guard(codes.device());
  auto out = at::empty(codes.sizes(), codes.options().dtype(out_dtype));
  DequantizeCodesArgs a;
  a.codes = codes.data_ptr<int8_t>();
  a.out = out.data_ptr();
  a.out_dtype = to_out_dtype(out_dtype);
  a.params = params.data_ptr<float>();
  a.rows = codes.size(0);
  a.row_len = codes.size(1);
  a.row_stride = codes.size(0) <= 1 ? codes.size(1) : codes.stride(0);
  launch_dequantize_codes(a, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor group_norm_silu(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
                           double eps, bool silu, at::ScalarType out_dtype) {
  const at::Tensor x = aligned(x_in);
  TORCH_CHECK(x.dim() >= 2, "x must be [N, C, ...], got ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1), pixels = C == 0 || N == 0 ? 0 : x.numel() / (N * C);
  TORCH_CHECK(groups > 0 && C % groups == 0, "the ", C, " channels do not split into ", groups, " groups");
  TORCH_CHECK(pixels % 8 == 0, "the spatial size (", pixels, " values per channel) must be a multiple of 8");
  TORCH_CHECK(N * groups < (int64_t{1} << 31), "too many (sample, group) pairs for one launch");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  GroupNormArgs a;
  a.x = x.data_ptr();
  a.in_dtype = static_cast<int>(to_out_dtype(x.scalar_type()));
  a.out = out.data_ptr();
  a.out_dtype = to_out_dtype(out_dtype);
  a.weight = float_vector(weight, C, x, "weight");
  a.bias = float_vector(bias, C, x, "bias");
  a.samples = N;
  a.channels = C;
  a.pixels = pixels;
  a.groups = static_cast<int>(groups);
  a.eps = static_cast<float>(eps);
  a.silu = silu;
  launch_group_norm(a, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<int64_t> compiled_archs() {
  std::vector<int64_t> archs;
  for (int i = 0; i < compiled_arch_count(); ++i) archs.push_back(compiled_arch(i));
  return archs;
}

std::vector<std::string> sm90_configs() {
  std::vector<std::string> names;
  for (int i = 0; i < sm90_config_count(); ++i) names.emplace_back(sm90_config(i).name);
  return names;
}

int64_t cutlass_version_op() { return cutlass_version(); }

}  // namespace
}  // namespace ptq4arvg

TORCH_LIBRARY(ptq4arvg_kernels, m) {
  m.def("quantize_rows(Tensor x, Tensor step, Tensor zero_point, int bits) -> (Tensor, Tensor)");
  m.def("fused_quantize(Tensor x, Tensor step, Tensor zero_point, Tensor? token_group, int bits, int prologue, "
        "float eps, Tensor? mod_mul, Tensor? mod_add, Tensor? channel_scale, Tensor? channel_shift) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("fused_residual_quantize(Tensor x, Tensor branch, Tensor gamma, Tensor step, Tensor zero_point, "
        "Tensor? token_group, int bits, float eps, Tensor mod_mul, Tensor mod_add, Tensor? channel_scale, "
        "Tensor? channel_shift) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("split_qkv(Tensor qkv, int heads, Tensor? bias, Tensor? q_mul, bool l2_norm, float eps, Tensor(a!) k_out, "
        "Tensor(b!) v_out, Tensor? kv_grid, int kv_bits) -> Tensor");
  m.def("group_norm_silu(Tensor x, Tensor weight, Tensor bias, int groups, float eps, bool silu, "
        "ScalarType out_dtype) -> Tensor");
  m.def("int8_linear(Tensor xq, Tensor wq, Tensor act_scale, Tensor? act_zero, Tensor w_scale, Tensor wsum, "
        "Tensor? bias, ScalarType out_dtype, int config) -> Tensor");
  m.def("int8_linear_sm80(Tensor xq, Tensor wq, Tensor act_scale, Tensor? act_zero, Tensor w_scale, Tensor wsum, "
        "Tensor? bias, ScalarType out_dtype, int tile) -> Tensor");
  m.def("dequantize_int32(Tensor acc, Tensor act_scale, Tensor? act_zero, Tensor w_scale, Tensor wsum, "
        "Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def("dequantize_codes(Tensor codes, Tensor params, ScalarType out_dtype) -> Tensor");
  m.def("compiled_archs() -> int[]", &ptq4arvg::compiled_archs);
  m.def("sm90_configs() -> str[]", &ptq4arvg::sm90_configs);
  m.def("cutlass_version() -> int", &ptq4arvg::cutlass_version_op);
}

TORCH_LIBRARY_IMPL(ptq4arvg_kernels, CUDA, m) {
  m.impl("quantize_rows", &ptq4arvg::quantize_rows);
  m.impl("fused_quantize", &ptq4arvg::fused_quantize);
  m.impl("fused_residual_quantize", &ptq4arvg::fused_residual_quantize);
  m.impl("split_qkv", &ptq4arvg::split_qkv);
  m.impl("group_norm_silu", &ptq4arvg::group_norm_silu);
  m.impl("int8_linear", &ptq4arvg::int8_linear);
  m.impl("int8_linear_sm80", &ptq4arvg::int8_linear_sm80);
  m.impl("dequantize_int32", &ptq4arvg::dequantize_int32);
  m.impl("dequantize_codes", &ptq4arvg::dequantize_codes);
}
