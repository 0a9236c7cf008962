"""Feature backends: the same Inception GraphDef run by TensorFlow (`tf`) or by PyTorch (`torch`).

A backend turns uint8 NHWC image batches into (pool_3 [N, 2048], mixed_6/conv[..., :7] flattened in
H, W, C order [N, 2023]) float32 activations, and pool_3 activations into class probabilities
softmax(pool_3 @ W) with the weights W of softmax/logits/MatMul and no bias. Everything downstream
(statistics, IS, precision/recall) is shared.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterable

import numpy as np
import torch

POOL_TENSOR = "pool_3:0"
SPATIAL_TENSOR = "mixed_6/conv:0"
SPATIAL_CHANNELS = 7
INPUT_TENSOR = "ExpandDims:0"
LOGITS_MATMUL = "softmax/logits/MatMul"
SOFTMAX_BATCH_SIZE = 512


@contextlib.contextmanager
def full_fp32():
    """Disable TF32 in cuDNN convolutions and cuBLAS matmuls (restored on exit): the reference
    evaluator computes in IEEE float32, and TF32 moves features by ~1e-3."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        matmul = torch.backends.cuda.matmul
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
    else:
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def cudnn_autotune():
    """Fixed shapes: let cuDNN pick its fastest (still IEEE fp32) convolution kernels."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def default_backend_name() -> str:
    """torch on CUDA when available, else tf when installed, else torch on the CPU."""
    if torch.cuda.is_available():
        return "torch"
    return "tf" if tensorflow_available() else "torch"


class FeatureBackend:
    name: str
    default_batch_size: int
    device: torch.device  # where the shared precision/recall code runs

    def activations(self, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def class_probabilities(self, pool_features: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def _check_finite(pool: np.ndarray, spatial: np.ndarray) -> None:
    if not (np.isfinite(pool).all() and np.isfinite(spatial).all()):
        raise FloatingPointError("Inception features contain NaN or Inf (the graph's CheckNumerics would "
                                 "fail): check the .pb file and the input images")


class TorchBackend(FeatureBackend):
    """The GraphDef converted to torch ops at load time (see graph_torch.py); runs on CPU or GPU."""

    name = "torch"
    default_batch_size = 250

    def __init__(self, graph_bytes: bytes, device: torch.device | str | None = None):
        from evaluation.graph_torch import GraphModule
        from evaluation.graphdef import parse_graph_def

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        graph = parse_graph_def(graph_bytes)
        self.net = GraphModule(graph, [INPUT_TENSOR], [POOL_TENSOR, SPATIAL_TENSOR], self.device)
        weights_name = graph.by_name()[LOGITS_MATMUL].data_inputs[1]
        self.softmax_weights = torch.from_numpy(self.net.constant(weights_name)).to(self.device)

    def describe(self) -> str:
        where = str(self.device)
        if self.device.type == "cuda":
            where += f" ({torch.cuda.get_device_name(self.device)}, CUDA {torch.version.cuda})"
        return f"torch {torch.__version__} on {where}"

    def activations(self, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        pools, spatials = [], []
        with full_fp32(), cudnn_autotune():
            for batch in batches:
                images = torch.from_numpy(batch).to(self.device, non_blocking=True).float()
                pool, spatial = self.net(images)
                pools.append(pool.reshape(len(pool), -1))
                spatials.append(spatial[..., :SPATIAL_CHANNELS].reshape(len(spatial), -1))
        pool, spatial = (torch.cat(x).cpu().numpy() for x in (pools, spatials))
        _check_finite(pool, spatial)
        return pool, spatial

    def class_probabilities(self, pool_features: np.ndarray) -> np.ndarray:
        out = []
        with full_fp32(), torch.no_grad():
            for start in range(0, len(pool_features), SOFTMAX_BATCH_SIZE):
                acts = torch.from_numpy(np.ascontiguousarray(pool_features[start:start + SOFTMAX_BATCH_SIZE]))
                out.append(torch.softmax(acts.to(self.device) @ self.softmax_weights, dim=1).cpu())
        return torch.cat(out).numpy()


class TFBackend(FeatureBackend):
    """The reference evaluator's graph with tf.compat.v1 (TensorFlow 2.x, imported only here)."""

    name = "tf"
    default_batch_size = 64

    def __init__(self, graph_bytes: bytes, device: torch.device | str | None = None):
        tf = import_tensorflow()
        self.tf_version = tf.__version__
        self.device = torch.device(device or "cpu")
        self.graph = tf.Graph()
        config = tf.ConfigProto(allow_soft_placement=True)  # lets DecodeJpeg stay on the CPU
        config.gpu_options.allow_growth = True  # TF would otherwise take the whole GPU
        self.session = tf.Session(graph=self.graph, config=config)
        with self.graph.as_default():
            graph_def = tf.GraphDef()
            graph_def.ParseFromString(graph_bytes)
            self.image_input = tf.placeholder(tf.float32, shape=[None, None, None, 3])
            pool, spatial = tf.import_graph_def(graph_def, input_map={INPUT_TENSOR: self.image_input},
                                                return_elements=[POOL_TENSOR, SPATIAL_TENSOR], name="features")
            self.pool, self.spatial = pool, spatial[..., :SPATIAL_CHANNELS]
            # A second import for the softmax weights, as the reference does; only the weights are used.
            (matmul,) = tf.import_graph_def(graph_def, return_elements=[LOGITS_MATMUL], name="softmax")
            self.softmax_input = tf.placeholder(tf.float32, shape=[None, None])
            self.softmax = tf.nn.softmax(tf.matmul(self.softmax_input, matmul.inputs[1]))

    def describe(self) -> str:
        return f"tensorflow {self.tf_version} (tf.compat.v1 session, CPU)"

    def activations(self, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        pools, spatials = [], []
        for batch in batches:
            pool, spatial = self.session.run([self.pool, self.spatial],
                                             {self.image_input: batch.astype(np.float32)})
            pools.append(pool.reshape(len(pool), -1))
            spatials.append(spatial.reshape(len(spatial), -1))
        pool, spatial = np.concatenate(pools), np.concatenate(spatials)
        _check_finite(pool, spatial)
        return pool, spatial

    def class_probabilities(self, pool_features: np.ndarray) -> np.ndarray:
        return np.concatenate([
            self.session.run(self.softmax, {self.softmax_input: pool_features[i:i + SOFTMAX_BATCH_SIZE]})
            for i in range(0, len(pool_features), SOFTMAX_BATCH_SIZE)])


def import_tensorflow():
    """tensorflow.compat.v1, with oneDNN's reordered CPU arithmetic off for reproducible features."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    try:
        import tensorflow.compat.v1 as tf
    except ImportError as error:
        raise ImportError("the tf backend needs TensorFlow: pip install 'tensorflow-cpu==2.21.*' "
                          "(or use --backend torch)") from error
    return tf


BACKENDS = {"torch": TorchBackend, "tf": TFBackend}


def make_backend(name: str | None, graph_bytes: bytes, device: str | None = None) -> FeatureBackend:
    name = name or default_backend_name()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {sorted(BACKENDS)}")
    return BACKENDS[name](graph_bytes, device)
