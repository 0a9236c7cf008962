"""CUDA graphs for VAR's KV-cache sampling: one graph per scale replays the transformer forward.

At batch 100 the first scales run a few hundred tokens through every block: the GPU finishes each kernel
before the host has launched the next one, so sampling is bound by Python and launch overhead there. A graph
per scale launches the whole forward (all blocks and the head) at once.

    graphs = ScaleGraphs(var)
    gen = autoregressive_infer_cfg(var, vae, labels, forward_scale=graphs)   # inside torch.autocast(..., cache_enabled=False)

The first batch captures the graphs (each scale is run once eagerly to warm up, then captured and replayed);
later batches of the same size only copy their inputs and replay. The graphs write the KV cache into the
buffers allocated by the first batch, which this object keeps alive. Autocast's weight cache must be off
(`cache_enabled=False`): cached casts would be freed when the autocast region ends while the graphs still read
them. A new batch size captures new graphs. The logits returned for every scale are views of one buffer,
overwritten by the next scale: clone them to keep them.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .model import VAR


class ScaleGraphs:
    """`forward_scale` for `autoregressive_infer_cfg`: graph per scale, captured on first use, replayed after.

    The graphs hold the model as it was when they were captured: make a new ScaleGraphs (or a new sampler with
    `make_sample_fn(..., cuda_graphs=True)`) after changing the model's modules or weights.
    """

    def __init__(self, var: VAR) -> None:
        self.var = var
        self._reset(None)

    def _reset(self, key) -> None:
        self.key = key
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None
        self.static_ada: Optional[List[torch.Tensor]] = None
        self.static_cond: Optional[torch.Tensor] = None
        self.logits: Optional[torch.Tensor] = None
        self.inputs: Optional[torch.Tensor] = None
        self.kv_buffers: list = []

    def __call__(self, si: int, x_BlC: torch.Tensor, cond_BD: torch.Tensor,
                 ada_outs: Optional[List[torch.Tensor]]) -> torch.Tensor:
        if ada_outs is None:
            raise ValueError('CUDA-graph sampling needs the per-batch adaLN outputs (reuse_ada_lin=True)')
        if torch.is_autocast_enabled('cuda') and torch.is_autocast_cache_enabled():
            raise RuntimeError('CUDA-graph sampling needs torch.autocast(..., cache_enabled=False): cached weight '
                               'casts are freed when the autocast region ends, while the graphs keep reading them')
        key = (tuple(x_BlC.shape[:1]) + tuple(x_BlC.shape[2:]), x_BlC.dtype, x_BlC.device,
               torch.get_autocast_dtype('cuda') if torch.is_autocast_enabled('cuda') else None)
        if si == 0:
            if key != self.key:
                self._reset(key)
            self._load_batch(cond_BD, ada_outs)
        elif key != self.key:
            raise RuntimeError(f'scale {si} runs with inputs {key}, but scale 0 ran with {self.key}')
        if si not in self.graphs:
            return self._capture(si, x_BlC)
        graph, static_x, out = self.graphs[si]
        static_x.copy_(x_BlC)
        graph.replay()
        return out

    def _load_batch(self, cond_BD: torch.Tensor, ada_outs: List[torch.Tensor]) -> None:
        if self.static_ada is None:
            self.static_cond = cond_BD.clone()
            self.static_ada = [a.clone() for a in ada_outs]
        else:
            self.static_cond.copy_(cond_BD)
            for static, a in zip(self.static_ada, ada_outs):
                static.copy_(a)

    def _forward(self, static_x: torch.Tensor) -> torch.Tensor:
        return self.var.forward_blocks(static_x, self.static_cond, attn_bias=None, ada_outs=self.static_ada)

    def _capture(self, si: int, x_BlC: torch.Tensor) -> torch.Tensor:
        attns = [block.attn for block in self.var.blocks]
        before = [(a.cached_k, a.cached_v) for a in attns]
        if self.logits is None:  # one input and one output buffer for all scales, outside the graphs' pool
            last = self.var.patch_nums[-1] ** 2
            self.logits = torch.empty(x_BlC.shape[0], last, self.var.V, device=x_BlC.device)
            self.inputs = x_BlC.new_empty(x_BlC.shape[0] * last * x_BlC.shape[2])
        static_x = self.inputs[:x_BlC.numel()].view(x_BlC.shape)  # the scales run one after another
        static_x.copy_(x_BlC)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy initialisations must not happen during capture
            self._forward(static_x)
        torch.cuda.current_stream().wait_stream(side)
        for a, (k, v) in zip(attns, before):  # the warm-up appended this scale to the cache: take it back
            a.cached_k, a.cached_v = k, v
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
            self.kv_buffers = [a._kv_buffer for a in attns]  # the graphs write into these from now on
        graph = torch.cuda.CUDAGraph()
        out = self.logits[:, :x_BlC.shape[1]]
        with torch.cuda.graph(graph, pool=self.pool):
            out.copy_(self._forward(static_x))
        graph.replay()  # capturing ran nothing
        self.graphs[si] = (graph, static_x, out)
        return out
