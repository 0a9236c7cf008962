// sm_90a INT8 GEMM, tile configuration 64x256_pingpong (see gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace ptq4arvg {
namespace {
using namespace cute;
using C = sm90::Config<Shape<_64, _256, _128>, Shape<_1, _1, _1>, sm90::schedule::Pingpong, sm90::schedule::EpiPingpong, sm90::schedule::Persistent>;
}  // namespace

const Sm90GemmConfig& sm90_config_64x256_pingpong() {
  static const Sm90GemmConfig config{"64x256_pingpong", &C::workspace_size, &C::run};
  return config;
}
}  // namespace ptq4arvg
