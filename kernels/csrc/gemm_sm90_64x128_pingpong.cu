// sm_90a INT8 GEMM, tile configuration 64x128_pingpong (see gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace ptq4arvg {
namespace {
using namespace cute;
using C = sm90::Config<Shape<_64, _128, _128>, Shape<_1, _1, _1>, sm90::schedule::Pingpong, sm90::schedule::EpiPingpong, sm90::schedule::Persistent>;
}  // namespace

const Sm90GemmConfig& sm90_config_64x128_pingpong() {
  static const Sm90GemmConfig config{"64x128_pingpong", &C::workspace_size, &C::run};
  return config;
}
}  // namespace ptq4arvg
