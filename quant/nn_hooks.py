"""Hook points that model code exposes so quantization can wrap them from outside."""
import torch
from torch import nn


class MatMul(nn.Module):
    """`a @ b` as a module, so the two attention products can be replaced by quantized ones.

    Model code calls these only on its explicit attention path; when nothing wraps them it uses
    `F.scaled_dot_product_attention` instead (see each family's `Attention.explicit_matmuls`).
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b
