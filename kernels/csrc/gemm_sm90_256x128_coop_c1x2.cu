// sm_90a INT8 GEMM, tile configuration 256x128_coop_c1x2 (see gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace ptq4arvg {
namespace {
using namespace cute;
using C = sm90::Config<Shape<_256, _128, _128>, Shape<_1, _2, _1>, sm90::schedule::Cooperative, sm90::schedule::EpiCooperative, sm90::schedule::Persistent>;
}  // namespace

const Sm90GemmConfig& sm90_config_256x128_coop_c1x2() {
  static const Sm90GemmConfig config{"256x128_coop_c1x2", &C::workspace_size, &C::run};
  return config;
}
}  // namespace ptq4arvg
