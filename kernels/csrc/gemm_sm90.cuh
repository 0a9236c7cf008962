// INT8 x INT8 -> INT32 GEMM for sm_90a (TMA + wgmma, warp-specialized, persistent) with the dequantization
// fused into an epilogue visitor tree (EVT):
//
//   out[m, n] = D( act_scale[m] * (w_scale[n] * float(acc[m, n] - act_zero[m] * wsum[n])) + bias[n] )
//
// The zero-point correction is done in int32 (exact), the scaling in fp32, one rounding to D at the end.
// act_scale / act_zero are per-row vectors or scalars (chosen at run time); a null act_zero or bias is 0.
// Each gemm_sm90_<config>.cu instantiates one tile configuration for bf16 and fp16 outputs.
#pragma once

#include "launchers.h"

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/gemm/kernel/tile_scheduler.hpp>
#include <cutlass/util/packed_stride.hpp>

namespace ptq4arvg::sm90 {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

// Programmatic dependent launch: the GEMM's prologue overlaps the tail of the preceding (quantize) kernel, and
// the kernel waits (griddepcontrol.wait) for it before touching global memory. Only safe where CUTLASS compiles
// that wait in (CUTLASS_ENABLE_GDC_FOR_SM90), so it is decided per translation unit.
#ifdef CUTLASS_ENABLE_GDC_FOR_SM90
static constexpr bool kProgrammaticLaunch = true;
#else
static constexpr bool kProgrammaticLaunch = false;
#endif

template <class TileShape, class ElementD>
struct DequantTree {
  using PerRow = Stride<bool, _0, _0>;  // true: one value per row, false: one scalar for all rows
  using ActScale = fusion::Sm90ColBroadcast<0, TileShape, float, float, PerRow>;
  using ActZero = fusion::Sm90ColBroadcast<0, TileShape, int32_t, int32_t, PerRow>;
  using WScale = fusion::Sm90RowBroadcast<0, TileShape, float, float>;
  using WSum = fusion::Sm90RowBroadcast<0, TileShape, int32_t, int32_t>;
  using Bias = fusion::Sm90RowBroadcast<0, TileShape, float, float>;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  using ZeroTerm =  // act_zero[m] * wsum[n]
      fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, int32_t, int32_t, kRound>, ActZero, WSum>;
  using Corrected =  // acc - act_zero[m] * wsum[n]
      fusion::Sm90EVT<fusion::Sm90Compute<cutlass::minus, int32_t, int32_t, kRound>, fusion::Sm90AccFetch, ZeroTerm>;
  using ColScaled =  // w_scale[n] * float(corrected)
      fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, WScale, Corrected>;
  using Tree =  // act_scale[m] * col_scaled + bias[n], rounded once to ElementD
      fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiply_add, ElementD, float, kRound>, ActScale, ColScaled, Bias>;

  static typename Tree::Arguments arguments(EpilogueArgs const& e) {
    auto per_row = [](bool v) { return PerRow{v, _0{}, _0{}}; };
    typename ActScale::Arguments act_scale{e.act_scale.ptr, 0.f, per_row(e.act_scale.per_row)};
    typename ActZero::Arguments act_zero{e.act_zero.ptr, 0, per_row(e.act_zero.per_row)};
    typename WScale::Arguments w_scale{e.w_scale};
    typename WSum::Arguments wsum{e.wsum};
    typename Bias::Arguments bias{e.bias};
    return {act_scale, {w_scale, {{}, {act_zero, wsum, {}}, {}}, {}}, bias, {}};
  }
};

template <class ElementD, class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule,
          class TileScheduler>
struct Int8Gemm {
  using Tree = DequantTree<TileShape, ElementD>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float,
      void, cutlass::layout::RowMajor, 16 / sizeof(ElementD),        // no C operand
      ElementD, cutlass::layout::RowMajor, 16 / sizeof(ElementD),
      EpilogueSchedule, typename Tree::Tree>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      int8_t, cutlass::layout::RowMajor, 16,      // A = xq [M, K]
      int8_t, cutlass::layout::ColumnMajor, 16,   // B = wq [N, K] seen as K x N column-major
      int32_t, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, TileScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(Int8GemmArgs const& a) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    auto stride_a = cutlass::make_cute_packed_stride(StrideA{}, make_shape(a.M, a.K, 1));
    auto stride_b = cutlass::make_cute_packed_stride(StrideB{}, make_shape(a.N, a.K, 1));
    auto stride_d = cutlass::make_cute_packed_stride(StrideD{}, make_shape(a.M, a.N, 1));
    cutlass::KernelHardwareInfo hw_info{a.device, a.sm_count};
    return typename Gemm::Arguments{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {a.M, a.N, a.K, 1},
        {a.xq, stride_a, a.wq, stride_b},
        {Tree::arguments(a.epi), nullptr, stride_d, static_cast<ElementD*>(a.out), stride_d},
        hw_info};
  }

  static size_t workspace_size(Int8GemmArgs const& a) { return Gemm::get_workspace_size(arguments(a)); }

  static const char* run(Int8GemmArgs const& a, void* workspace, cudaStream_t stream) {
    auto args = arguments(a);
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return "CUTLASS cannot implement this GEMM shape";
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return "CUTLASS GEMM initialization failed";
    if (gemm.run(stream, nullptr, kProgrammaticLaunch) != cutlass::Status::kSuccess) return "CUTLASS GEMM launch failed";
    return nullptr;
  }
};

// Instantiates both output types of one tile configuration behind the plain launcher interface.
template <class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule, class TileScheduler>
struct Config {
  template <class ElementD>
  using G = Int8Gemm<ElementD, TileShape, ClusterShape, KernelSchedule, EpilogueSchedule, TileScheduler>;

  static size_t workspace_size(Int8GemmArgs const& a) {
    return a.out_dtype == OutDtype::kFloat16 ? G<cutlass::half_t>::workspace_size(a)
                                             : G<cutlass::bfloat16_t>::workspace_size(a);
  }
  static const char* run(Int8GemmArgs const& a, void* workspace, cudaStream_t stream) {
    switch (a.out_dtype) {
      case OutDtype::kBFloat16: return G<cutlass::bfloat16_t>::run(a, workspace, stream);
      case OutDtype::kFloat16: return G<cutlass::half_t>::run(a, workspace, stream);
      default: return "the sm_90a INT8 GEMM writes bfloat16 or float16 only";
    }
  }
};

namespace schedule {
using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using Cooperative = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpiPingpong = cutlass::epilogue::TmaWarpSpecialized;
using EpiCooperative = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Persistent = cutlass::gemm::PersistentScheduler;
using StreamK = cutlass::gemm::StreamKScheduler;
}  // namespace schedule

}  // namespace ptq4arvg::sm90
