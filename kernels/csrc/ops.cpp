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

at::Tensor int8_linear(const at::Tensor& xq_in, const at::Tensor& wq_in, const at::Tensor& act_scale,
                       const std::optional<at::Tensor>& act_zero, const at::Tensor& w_scale, const at::Tensor& wsum,
                       const std::optional<at::Tensor>& bias, at::ScalarType out_dtype, int64_t config) {
  const at::Tensor xq = aligned(xq_in), wq = aligned(wq_in);
  const EpilogueTensors epi(act_scale, act_zero, w_scale, wsum, bias);
  check_gemm_operands(xq, wq);
  const int64_t M = xq.size(0), N = wq.size(0), K = xq.size(1);
  const c10::cuda::CUDAGuard guard(xq.device());
  const int device = xq.get_device();
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, device);
  const int minor = device_attribute(cudaDevAttrComputeCapabilityMinor, device);
  TORCH_CHECK(major == 9 && minor == 0, "the CUTLASS INT8 GEMM needs an sm_90 GPU (H100/H200), this is sm_", major,
              minor, "; use kernels.int8_linear, which falls back to torch._int_mm");
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "the CUTLASS INT8 GEMM writes bfloat16 or float16, got ", out_dtype);
  TORCH_CHECK(M < (int64_t{1} << 31) && N < (int64_t{1} << 31) && K < (int64_t{1} << 31), "GEMM too large");
  auto out = at::empty({M, N}, xq.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;

  Int8GemmArgs a;
  a.xq = xq.data_ptr<int8_t>();
  a.wq = wq.data_ptr<int8_t>();
  a.out = out.data_ptr();
  a.out_dtype = to_out_dtype(out_dtype);
  a.epi = epilogue_args(M, N, epi, xq);
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.K = static_cast<int>(K);
  a.device = device;
  a.sm_count = device_attribute(cudaDevAttrMultiProcessorCount, device);
  TORCH_CHECK(config >= 0 && config < sm90_config_count(), "config must index sm90_configs() (0 to ",
              sm90_config_count() - 1, "), got ", config);
  const Sm90GemmConfig& cfg = sm90_config(static_cast<int>(config));

  const size_t workspace_bytes = cfg.workspace_size(a);
  at::Tensor workspace;
  if (workspace_bytes > 0) workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, xq.options().dtype(at::kByte));
  const char* error = cfg.run(a, workspace_bytes > 0 ? workspace.data_ptr() : nullptr,
                              c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == nullptr, "int8_linear (", cfg.name, ", M=", M, " N=", N, " K=", K, "): ", error);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
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
  m.def("int8_linear(Tensor xq, Tensor wq, Tensor act_scale, Tensor? act_zero, Tensor w_scale, Tensor wsum, "
        "Tensor? bias, ScalarType out_dtype, int config) -> Tensor");
  m.def("dequantize_int32(Tensor acc, Tensor act_scale, Tensor? act_zero, Tensor w_scale, Tensor wsum, "
        "Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def("compiled_archs() -> int[]", &ptq4arvg::compiled_archs);
  m.def("sm90_configs() -> str[]", &ptq4arvg::sm90_configs);
  m.def("cutlass_version() -> int", &ptq4arvg::cutlass_version_op);
}

TORCH_LIBRARY_IMPL(ptq4arvg_kernels, CUDA, m) {
  m.impl("quantize_rows", &ptq4arvg::quantize_rows);
  m.impl("int8_linear", &ptq4arvg::int8_linear);
  m.impl("dequantize_int32", &ptq4arvg::dequantize_int32);
}
