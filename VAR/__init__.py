"""VAR (next-scale prediction) family: model, tokenizer, presets, loading and sampling.

    from VAR import presets, load_var, autoregressive_infer_cfg
    var, vae = load_var(16, device='cuda')                  # released weights, strict load
    var, vae = presets.create('var_tiny')                   # random toy model for tests
"""
from . import presets
from .loading import CheckpointError, load_var
from .model import FFN, VAR, AdaLNBeforeHead, AdaLNSelfAttn, SelfAttention
from .sampling import RECIPE, Generation, SamplingRecipe, autoregressive_infer_cfg, make_sample_fn, to_uint8
from .vqvae import VQVAE, VectorQuantizer2

__all__ = ['presets', 'CheckpointError', 'load_var', 'FFN', 'VAR', 'AdaLNBeforeHead', 'AdaLNSelfAttn', 'SelfAttention',
           'RECIPE', 'Generation', 'SamplingRecipe', 'autoregressive_infer_cfg', 'make_sample_fn', 'to_uint8', 'VQVAE',
           'VectorQuantizer2']
