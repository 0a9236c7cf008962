// INT8 x INT8 -> INT32 GEMM for sm_80 / sm_86 / sm_89 (CUTLASS 2.x: cp.async multistage mainloop, mma.sync
// m16n8k32), with the dequantization fused into a CUTLASS 2.x epilogue visitor tree (Sm80EVT):
//
//   out[m, n] = D( act_scale[m] * (w_scale[n] * float(acc[m, n] - act_zero[m] * wsum[n])) + bias[n] )
//
// The same tree as gemm_sm90.cuh: the zero-point correction in int32 (exact), the scaling in fp32, one rounding to
// D at the end; act_scale / act_zero are per-row vectors or scalars (a stride of 1 or 0 along M, chosen at run
// time); a null act_zero or bias reads as 0. mma.sync and cp.async exist on every GPU from sm_80 on, so the kernel
// also runs on sm_90 (from an sm_90a or a compute_80 build), just slower than the wgmma kernels there.
#include "launchers.h"

#include <atomic>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/gemm/kernel/default_gemm_universal_with_visitor.h>
#include <cutlass/gemm/threadblock/threadblock_swizzle.h>
// The visitor nodes need the 2.x epilogue headers above included first.
#include <cutlass/epilogue/threadblock/fusion/visitors.hpp>

namespace ptq4arvg {
namespace sm80 {
namespace {

using namespace cute;
namespace evt = cutlass::epilogue::threadblock;
using cutlass::gemm::GemmShape;

// One tile configuration: threadblock tile, warp tile, mainloop stages. Every configuration keeps its shared
// memory under the 99 KiB per block of sm_86 / sm_89 (A100 allows 163 KiB), so each runs on all three.
template <int kTileM, int kTileN, int kWarpM, int kWarpN, int kStages_>
struct Tile {
  using Threadblock = GemmShape<kTileM, kTileN, 64>;
  using Warp = GemmShape<kWarpM, kWarpN, 64>;
  static constexpr int kStages = kStages_;
};
using Tile128 = Tile<128, 128, 64, 64, 4>;  // 4 warps, 64 KiB (two CTAs per SM on sm_80, one on sm_86 / sm_89)
using Tile64 = Tile<64, 64, 32, 32, 6>;     // 4 warps, 48 KiB: small problems, where the grid must still fill the GPU

template <class T, class ElementD>
struct Int8Gemm {
  static constexpr int kAlignmentD = 128 / cutlass::sizeof_bits<ElementD>::value;  // 16-byte stores
  static constexpr int kEpilogueStages = 1;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  using ThreadMap = evt::OutputTileThreadLayout<typename T::Threadblock, typename T::Warp, ElementD, kAlignmentD,
                                                kEpilogueStages>;

  using PerRow = Stride<int64_t, _0, _0>;  // 1: one value per row, 0: one scalar for all rows
  using PerColumn = Stride<_0, _1, _0>;
  using ActScale = evt::VisitorColBroadcast<ThreadMap, float, PerRow>;
  using ActZero = evt::VisitorColBroadcast<ThreadMap, int32_t, PerRow>;
  using WScale = evt::VisitorRowBroadcast<ThreadMap, float, PerColumn>;
  using WSum = evt::VisitorRowBroadcast<ThreadMap, int32_t, PerColumn>;
  using Bias = evt::VisitorRowBroadcast<ThreadMap, float, PerColumn>;

  using ZeroTerm =  // act_zero[m] * wsum[n]
      evt::Sm80EVT<evt::VisitorCompute<cutlass::multiplies, int32_t, int32_t, kRound>, ActZero, WSum>;
  using Corrected =  // acc - act_zero[m] * wsum[n]
      evt::Sm80EVT<evt::VisitorCompute<cutlass::minus, int32_t, int32_t, kRound>, evt::VisitorAccFetch, ZeroTerm>;
  using ColScaled =  // w_scale[n] * float(corrected)
      evt::Sm80EVT<evt::VisitorCompute<cutlass::multiplies, float, float, kRound>, WScale, Corrected>;
  using Output =  // act_scale[m] * col_scaled + bias[n], rounded once to ElementD
      evt::Sm80EVT<evt::VisitorCompute<cutlass::multiply_add, ElementD, float, kRound>, ActScale, ColScaled, Bias>;
  using Store = evt::VisitorAuxStore<ThreadMap, ElementD, kRound, Stride<int64_t, _1, int64_t>>;
  using Tree = evt::Sm80EVT<Store, Output>;

  using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      int8_t, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, 16,     // A = xq [M, K]
      int8_t, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, 16,  // B = wq [N, K] as K x N col-major
      ElementD, cutlass::layout::RowMajor, kAlignmentD,
      int32_t, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      typename T::Threadblock, typename T::Warp, GemmShape<16, 8, 32>,
      Tree, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>, T::kStages,
      cutlass::arch::OpMultiplyAddSaturate,  // saturates only past int32, which K * 127^2 never reaches (K < 133k)
      kEpilogueStages>::GemmKernel;
  static constexpr int kSharedBytes = static_cast<int>(sizeof(typename Kernel::SharedStorage));
  static_assert(kSharedBytes <= 99 * 1024, "the tile must fit the 99 KiB of shared memory per block of sm_86 / sm_89");

  static typename Tree::Arguments tree_arguments(Int8GemmArgs const& a) {
    auto const& e = a.epi;
    auto per_row = [](bool v) { return PerRow{v ? 1 : 0, _0{}, _0{}}; };
    typename ActScale::Arguments act_scale{e.act_scale.ptr, 0.f, per_row(e.act_scale.per_row)};
    typename ActZero::Arguments act_zero{e.act_zero.ptr, 0, per_row(e.act_zero.per_row)};
    typename WScale::Arguments w_scale{e.w_scale, 0.f, {}};
    typename WSum::Arguments wsum{e.wsum, 0, {}};
    typename Bias::Arguments bias{e.bias, 0.f, {}};
    typename Store::Arguments store{static_cast<ElementD*>(a.out), {int64_t(a.N), _1{}, int64_t(a.M) * a.N}};
    // Arguments of a tree node: its children's, then its own.
    typename Output::Arguments output{act_scale, {w_scale, {{}, {act_zero, wsum, {}}, {}}, {}}, bias, {}};
    return {output, store};
  }

  static typename Kernel::Arguments arguments(Int8GemmArgs const& a) {
    return typename Kernel::Arguments(
        cutlass::gemm::GemmUniversalMode::kGemm, {a.M, a.N, a.K}, /*batch_count=*/1, tree_arguments(a),
        a.xq, a.wq, /*ptr_C=*/nullptr, /*ptr_D=*/nullptr,  // D is written by the tree's Store node
        /*batch strides=*/int64_t(a.M) * a.K, int64_t(a.N) * a.K, 0, int64_t(a.M) * a.N,
        /*lda=*/a.K, /*ldb=*/a.K, /*ldc=*/a.N, /*ldd=*/a.N);
  }
};

// The kernel body exists only where mma.sync m16n8k32 / cp.async do (sm_80 on), so this file also compiles for
// older targets in TORCH_CUDA_ARCH_LIST; there the launch runs an empty kernel, which run() refuses beforehand.
template <class Kernel>
__global__ void __launch_bounds__(Kernel::kThreadCount, 1) int8_gemm_kernel(typename Kernel::Params params) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  Kernel::invoke(params, *reinterpret_cast<typename Kernel::SharedStorage*>(shared_bytes));
#endif
}

// Checks the GPU and raises the kernel's dynamic shared-memory limit, once per (kernel, device): a driver call per
// launch would cost more than the whole GEMM at small M.
template <class G>
const char* prepare_device(int device) {
  static std::atomic<uint64_t> ready_devices{0};
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (ready_devices.load(std::memory_order_acquire) & bit) != 0) return nullptr;
  int major = 0, shared_optin = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return "the sm_80 INT8 GEMM could not query the GPU";
  if (major < 8) return "the sm_80 INT8 GEMM needs a GPU of compute capability 8.0 or newer";
  if (G::kSharedBytes > shared_optin) return "the sm_80 INT8 GEMM tile needs more shared memory than this GPU has";
  if (G::kSharedBytes >= (48 << 10) &&
      cudaFuncSetAttribute(int8_gemm_kernel<typename G::Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           G::kSharedBytes) != cudaSuccess)
    return "the sm_80 INT8 GEMM could not raise its shared-memory limit";
  ready_devices.fetch_or(bit, std::memory_order_release);
  return nullptr;
}

template <class T, class ElementD>
const char* run_tile(Int8GemmArgs const& a, cudaStream_t stream) {
  using G = Int8Gemm<T, ElementD>;
  using Kernel = typename G::Kernel;
  auto args = G::arguments(a);
  if (Kernel::can_implement(args) != cutlass::Status::kSuccess)
    return "CUTLASS cannot implement this GEMM shape (needs K % 16 == 0 and N % 8 == 0)";
  if (const char* error = prepare_device<G>(a.device)) return error;
  typename Kernel::Params params(args, a.sm_count, /*sm_occupancy=*/1);  // both only matter for stream-K
  dim3 grid = params.get_grid_dims();
  int8_gemm_kernel<Kernel><<<grid, Kernel::kThreadCount, G::kSharedBytes, stream>>>(params);
  return cudaGetLastError() == cudaSuccess ? nullptr : "CUTLASS sm_80 GEMM launch failed";
}

template <class T>
const char* run_tile_for_dtype(Int8GemmArgs const& a, cudaStream_t stream) {
  switch (a.out_dtype) {
    case OutDtype::kBFloat16: return run_tile<T, cutlass::bfloat16_t>(a, stream);
    case OutDtype::kFloat16: return run_tile<T, cutlass::half_t>(a, stream);
    default: return "the sm_80 INT8 GEMM writes bfloat16 or float16 only";
  }
}

int64_t tile_count(Int8GemmArgs const& a, int tile_m, int tile_n) {
  return ((int64_t(a.M) + tile_m - 1) / tile_m) * ((int64_t(a.N) + tile_n - 1) / tile_n);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace
}  // namespace sm80

// Tile choice: 128x128 when its grid gives every SM at least one tile, else 64x64. Larger tiles load fewer bytes
// per multiply-add, but a grid smaller than the GPU leaves SMs idle, which costs more (split-K, the usual remedy,
// is not available: the 2.x visitor epilogue supports neither serial nor parallel split-K). Measured with this code
// on an H200: 64x64 is 1.9x faster than 128x128 at M = 200, K = 4096, N = 1024; a 128x256 tile (3 stages, one CTA
// per SM) lost to 128x128 by 8-13% at M = 12800 and won only at M = 3200, K = 4096, N = 1024 (by 8%): not built.
//   0: 128x128x64, 4 stages   when ceil(M / 128) * ceil(N / 128) >= SMs
//   1:  64x64x64,  6 stages   otherwise
int sm80_gemm_tile_for(const Int8GemmArgs& args) {
  using Large = sm80::Tile128::Threadblock;
  const int64_t sms = args.sm_count > 0 ? args.sm_count : 108;
  return sm80::tile_count(args, Large::kM, Large::kN) >= sms ? 0 : 1;
}

// The tiled GEMM without split-K or stream-K needs no workspace.
size_t sm80_gemm_workspace_size(const Int8GemmArgs&) { return 0; }

// run_sm80_gemm with the tile forced (0 or 1, as in sm80_gemm_tile_for); for tests and tile sweeps.
const char* run_sm80_gemm_tile(const Int8GemmArgs& a, int tile, void* /*workspace*/, cudaStream_t stream) {
  if (a.M < 0 || a.N <= 0 || a.K <= 0) return "the sm_80 INT8 GEMM needs M >= 0, N > 0 and K > 0";
  if (a.K % 16 != 0 || a.N % 8 != 0) return "the sm_80 INT8 GEMM needs K % 16 == 0 and N % 8 == 0";
  if (a.xq == nullptr || a.wq == nullptr || a.out == nullptr || a.epi.act_scale.ptr == nullptr ||
      a.epi.w_scale == nullptr || (a.epi.act_zero.ptr != nullptr && a.epi.wsum == nullptr))
    return "the sm_80 INT8 GEMM got a null xq, wq, out, act_scale, w_scale, or wsum (needed with act_zero)";
  // 16-byte vector loads and stores: A and B rows, D rows, and the per-column vectors.
  if (!sm80::aligned16(a.xq) || !sm80::aligned16(a.wq) || !sm80::aligned16(a.out) ||
      !sm80::aligned16(a.epi.w_scale) || !sm80::aligned16(a.epi.wsum) || !sm80::aligned16(a.epi.bias))
    return "the sm_80 INT8 GEMM needs 16-byte aligned xq, wq, out, w_scale, wsum and bias";
  if (a.M == 0) return nullptr;
  switch (tile) {
    case 0: return sm80::run_tile_for_dtype<sm80::Tile128>(a, stream);
    case 1: return sm80::run_tile_for_dtype<sm80::Tile64>(a, stream);
    default: return "the sm_80 INT8 GEMM tile index must be 0 or 1";
  }
}

const char* run_sm80_gemm(const Int8GemmArgs& args, void* workspace, cudaStream_t stream) {
  return run_sm80_gemm_tile(args, sm80_gemm_tile_for(args), workspace, stream);
}

}  // namespace ptq4arvg
