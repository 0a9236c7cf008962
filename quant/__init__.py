"""PTQ for autoregressive visual generation models: quantizers, GPS, STWQ, DGC and baselines.

    from quant import quantize, recipe
    handle = quantize(model, adapter, recipe("ptq4arvg", w_bits=6, a_bits=6), calibration)
"""
from .adapter import Adapter, FoldTarget, LayerSpec, MatMulSpec, sequence_positions
from .calibration import CalibrationSet, dgc_features, select_calibration
from .context import TokenGroups, TokenPositions
from .io import load_quantized, save_quantized
from .modules import QuantLinear, QuantMatMul
from .nn_hooks import MatMul
from .pipeline import QuantizedModel, quantize
from .quantizers import Granularity, LogSqrt2Quantizer, UniformQuantizer
from .recipes import METHODS, Recipe, recipe

__all__ = [
    "Adapter", "CalibrationSet", "FoldTarget", "Granularity", "LayerSpec", "LogSqrt2Quantizer", "METHODS",
    "MatMul", "MatMulSpec", "QuantLinear", "QuantMatMul", "QuantizedModel", "Recipe", "TokenGroups",
    "TokenPositions", "UniformQuantizer", "dgc_features", "load_quantized", "quantize", "recipe",
    "save_quantized", "select_calibration", "sequence_positions",
]
