"""Recipes: small configuration objects naming a method and its options."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from .quantizers import DEFAULT_PERCENTILES, OFFICIAL_PERCENTILES, check_bits

# method → (input transform, static token-wise activation groups, range method)
METHODS: dict[str, tuple[str, bool, str]] = {
    "rtn": ("none", False, "minmax"),
    "smoothquant": ("sq", False, "mse"),
    "sq+stwq": ("sq", True, "mse"),
    "ptq4arvg": ("gps", True, "mse"),
}


@dataclass(frozen=True)
class Recipe:
    """What to do to a model: method, bit widths and the options that change numerics.

    method: "rtn" (per-tensor min/max activations, per-channel min/max weights), "smoothquant" (SmoothQuant
    α migration folded into the preceding op, per-tensor static activations), "sq+stwq" (SmoothQuant plus
    static token-wise groups), "ptq4arvg" (SmoothQuant → symmetric shift → GPS, STWQ, official order).
    statistics: "full" aggregates activation statistics over the whole calibration set; "ema" reproduces
    the official 0.1/0.9 mini-batch blend. calibration_order: "sequential" calibrates the activation
    quantizers block by block so each sees quantized upstream blocks (as the official single-pass
    calibration does); "joint" observes all of them in one pass on full-precision upstream activations.
    percentiles: the range candidates; the default adds 1.0 (min/max) to the official three.
    range_objective: "output" weights each input channel's squared quantization error by the squared
    norm of the weight column it multiplies (a layer-output error proxy, the same one GPS is derived
    from), so ranges are not clipped on channels that smoothing made expensive; "activation" is the
    official plain activation MSE.
    w_symmetric: symmetric weight grids (the official weights are asymmetric); makes 8-bit weights exact
    on the INT8 kernels, whose weights are symmetric int8.
    """

    method: str = "ptq4arvg"
    w_bits: int = 8
    a_bits: int = 8
    quantize_attention: bool = True
    sq_alpha: float = 0.5
    gps_alpha: float = 0.5
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    statistics: Literal["full", "ema"] = "full"
    calibration_order: Literal["sequential", "joint"] = "sequential"
    batch_size: int = 32
    max_samples: int = 2 ** 22
    zero_in_range: bool = False
    range_objective: Literal["output", "activation"] = "output"
    w_symmetric: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        check_bits(self.w_bits)
        check_bits(self.a_bits)
        if self.statistics not in ("full", "ema"):
            raise ValueError(f"statistics must be 'full' or 'ema', got {self.statistics!r}")
        if self.calibration_order not in ("sequential", "joint"):
            raise ValueError(f"calibration_order must be 'sequential' or 'joint', got {self.calibration_order!r}")
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))

    @property
    def transform(self) -> str:
        return METHODS[self.method][0]

    @property
    def token_wise(self) -> bool:
        return METHODS[self.method][1]

    @property
    def range_method(self) -> str:
        return METHODS[self.method][2]

    @property
    def name(self) -> str:
        return f"{self.method}-w{self.w_bits}a{self.a_bits}"

    def faithful(self, **family_options: Any) -> "Recipe":
        """The same recipe with the official code's numerics: three percentile candidates, plus the
        family's own quirks (e.g. statistics="ema" for VAR/PAR, zero_in_range=True for RAR/MAR)."""
        return replace(self, percentiles=OFFICIAL_PERCENTILES, range_objective="activation", **family_options)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        return cls(**data)


def recipe(name: str, **options: Any) -> Recipe:
    """`recipe("ptq4arvg", w_bits=6, a_bits=6)`; also accepts names like "ptq4arvg-w6a6"."""
    if "-w" in name:
        name, bits = name.rsplit("-w", 1)
        w, a = bits.split("a")
        options = {"w_bits": int(w), "a_bits": int(a), **options}
    return Recipe(method=name, **options)
