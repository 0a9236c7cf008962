"""Builds kernels/_C.so: CUTLASS INT8 GEMMs with fused dequantization (3.x for sm_90a, 2.x for sm_80/86/89) plus the
quantize / fused quantize / dequantize kernels.

    pip install --no-deps nvidia-cutlass==4.2.0.0          # headers only (or set CUTLASS_DIR to a CUTLASS 4.2 tree)
    TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python kernels/setup.py build_ext --inplace

Run from anywhere; the library lands next to this file. TORCH_CUDA_ARCH_LIST defaults to 9.0a (H100/H200). Add
Ampere/Ada targets (e.g. "8.0;8.6;8.9;9.0a") to get the CUTLASS 2.x GEMM and the elementwise kernels there.
Without CUDA nothing needs building: the package falls back to its pure-PyTorch reference path.
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def find_cutlass() -> list[str]:
    """Include folders of the CUTLASS headers: $CUTLASS_DIR, else the nvidia-cutlass wheel's bundled copy."""
    roots = []
    if os.environ.get("CUTLASS_DIR"):
        roots.append(Path(os.environ["CUTLASS_DIR"]).resolve())
    spec = importlib.util.find_spec("cutlass_library")  # located, not imported: importing pulls in generators
    if spec is not None and spec.submodule_search_locations:
        roots.append(Path(list(spec.submodule_search_locations)[0]) / "source")
    for root in roots:
        if (root / "include" / "cutlass" / "cutlass.h").is_file():
            return [str(root / "include"), str(root / "tools" / "util" / "include")]
    sys.exit("CUTLASS headers not found: `pip install --no-deps nvidia-cutlass==4.2.0.0`, or set CUTLASS_DIR to a "
             "folder holding include/cutlass/cutlass.h (a CUTLASS 4.2 checkout)")


def main() -> None:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if torch.version.cuda is None or CUDA_HOME is None:
        sys.exit("building kernels/_C needs a CUDA build of PyTorch and the CUDA toolkit (nvcc); without them the "
                 "package runs its pure-PyTorch reference path and nothing needs building")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    # Build from this folder (the repository's pyproject.toml describes the pure-Python package, not this
    # extension); package_dir makes build_ext --inplace put _C*.so next to this file.
    os.chdir(HERE)
    sources = sorted(f"csrc/{p.name}" for p in (HERE / "csrc").iterdir() if p.suffix in (".cpp", ".cu"))
    nvcc_flags = [
        "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "--expt-extended-lambda",
        "-DCUTLASS_ENABLE_GDC_FOR_SM90",  # programmatic dependent launch: GEMM prologue overlaps the quantize kernel
        # CUTLASS needs the half/bfloat16 operators that PyTorch's default flags switch off. No --use_fast_math:
        # quantization must round exactly like PyTorch.
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
    ]
    setup(
        name="ptq4arvg-kernels",
        ext_modules=[CUDAExtension(
            "kernels._C", sources,
            include_dirs=[str(HERE / "csrc")] + find_cutlass(),
            extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
        )],
        package_dir={"kernels": "."},
        cmdclass={"build_ext": BuildExtension},
        script_args=sys.argv[1:] or ["build_ext", "--inplace"],
    )


if __name__ == "__main__":
    main()
