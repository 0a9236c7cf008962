// sm_90a INT8 GEMM, tile configuration 128x128_coop (see gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace ptq4arvg {
namespace {
using namespace cute;
using C = sm90::Config<Shape<_128, _128, _128>, Shape<_1, _1, _1>, sm90::schedule::Cooperative, sm90::schedule::EpiCooperative, sm90::schedule::Persistent>;
}  // namespace

const Sm90GemmConfig& sm90_config_128x128_coop() {
  static const Sm90GemmConfig config{"128x128_coop", &C::workspace_size, &C::run};
  return config;
}
}  // namespace ptq4arvg
