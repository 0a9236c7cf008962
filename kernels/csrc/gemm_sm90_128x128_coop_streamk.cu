// sm_90a INT8 GEMM, tile configuration 128x128_coop_streamk (see gemm_sm90.cuh).
// CUTLASS 4.2's stream-K scheduler does not compile with the PDL hooks (is_last_tile binds a const member to a
// non-const reference), so this configuration is launched without programmatic dependent launch.
#undef CUTLASS_ENABLE_GDC_FOR_SM90
#include "gemm_sm90.cuh"

namespace ptq4arvg {
namespace {
using namespace cute;
using C = sm90::Config<Shape<_128, _128, _128>, Shape<_1, _1, _1>, sm90::schedule::Cooperative, sm90::schedule::EpiCooperative, sm90::schedule::StreamK>;
}  // namespace

const Sm90GemmConfig& sm90_config_128x128_coop_streamk() {
  static const Sm90GemmConfig config{"128x128_coop_streamk", &C::workspace_size, &C::run};
  return config;
}
}  // namespace ptq4arvg
