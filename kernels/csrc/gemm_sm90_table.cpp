// The sm_90a tile configurations. Which one runs for a given shape is decided in Python (kernels/ops.py), which
// passes its index to the int8_linear op.
#include "launchers.h"

#include <cutlass/version.h>

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

int cutlass_version() { return CUTLASS_VERSION; }

int sm90_config_count() { return static_cast<int>(sizeof(kConfigs) / sizeof(kConfigs[0])); }
const Sm90GemmConfig& sm90_config(int index) { return kConfigs[index](); }

}  // namespace ptq4arvg
