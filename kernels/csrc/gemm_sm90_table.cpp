// The sm_90a tile configurations, in the order the dispatcher (ops.cpp) and the benchmark index them.
#include "launchers.h"

namespace ptq4arvg {

const Sm90GemmConfig& sm90_config_64x128_pingpong();
const Sm90GemmConfig& sm90_config_64x256_pingpong();
const Sm90GemmConfig& sm90_config_128x128_pingpong_c2x1();
const Sm90GemmConfig& sm90_config_128x128_coop();
const Sm90GemmConfig& sm90_config_128x256_coop_c2x1();
const Sm90GemmConfig& sm90_config_256x128_coop_c1x2();
const Sm90GemmConfig& sm90_config_128x128_coop_streamk();

namespace {
using Getter = const Sm90GemmConfig& (*)();
constexpr Getter kConfigs[] = {
    &sm90_config_64x128_pingpong,
    &sm90_config_64x256_pingpong,
    &sm90_config_128x128_pingpong_c2x1,
    &sm90_config_128x128_coop,
    &sm90_config_128x256_coop_c2x1,
    &sm90_config_256x128_coop_c1x2,
    &sm90_config_128x128_coop_streamk,
};
}  // namespace

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

// Tile configuration by problem shape: 64-row tiles while M is small, stream-K when even those leave most of
// the SMs idle on a long K loop, 128x128 ping-pong for mid-size M, 256x128 cooperative for large M.
int choose_sm90_config(int64_t M, int64_t N, int64_t K, int sm_count) {
  if (M <= 256) {
    const int64_t tiles = ceil_div(M, 64) * ceil_div(N, 128);
    return (tiles * 2 < sm_count && K >= 2048) ? 6 : 0;
  }
  if (M <= 4096) return 2;
  return 5;
}

int sm90_config_count() { return static_cast<int>(sizeof(kConfigs) / sizeof(kConfigs[0])); }
const Sm90GemmConfig& sm90_config(int index) { return kConfigs[index](); }

}  // namespace ptq4arvg
