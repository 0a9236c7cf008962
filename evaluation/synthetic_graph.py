"""Stand-in GraphDefs with the tensor names and op types of the 2015 Inception graph.

Both feature backends accept them in place of classify_image_graph_def.pb, so the evaluator can be
tested and timed without the real weights:

- `inception_graph_def`: the real Inception-v3 (2015) layout (conv/batchnorm/CheckNumerics/Relu
  blocks, mixed..mixed_10 towers, pool_3, softmax/weights [2048, 1008]) with random weights. Full size
  it has the real shapes and FLOPs (about 95 MB, like the real file); `width` and `image_size` shrink
  it for CPU tests.
- `analytic_graph_def`: a tiny graph with closed-form outputs: pool_3 is the mean of the normalised
  image tiled to 2048 dims, mixed_6/conv is ReLU of the normalised colours tiled to 192 channels
  (channel k = colour k mod 3), softmax/weights = eye(2048, 1008), with a non-uniform bias that the
  IS must ignore.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from evaluation.graph_torch import OPS
from evaluation.graphdef import DT_FLOAT, DT_INT32, DT_UINT8, DataTypeAttr, GraphDef, NodeDef

FLOAT = DataTypeAttr(DT_FLOAT)
BN_EPSILON = 0.001


class GraphBuilder:
    """Appends nodes; with calibration images it also evaluates each new node on them (with the torch
    converter's op implementations), so batch-norm statistics can be set from real activations."""

    def __init__(self, calibration_images: np.ndarray | None = None):
        self.nodes: list[NodeDef] = []
        self.calibration = calibration_images
        self.values: dict[str, torch.Tensor] = {}

    def node(self, name: str, op: str, inputs=(), **attr) -> str:
        node = NodeDef(name=name, op=op, inputs=list(inputs), attr=attr)
        self.nodes.append(node)
        if op == "Const":
            if attr["value"].dtype != object:
                self.values[name] = torch.from_numpy(np.array(attr["value"]))
        elif op == "ExpandDims" and self.calibration is not None:  # where the evaluators feed images
            self.values[name] = torch.from_numpy(self.calibration.astype(np.float32))
        elif all(i in self.values for i in node.data_inputs):
            with torch.no_grad():
                self.values[name] = OPS[op](node, [self.values[i] for i in node.data_inputs])()
        return name

    def const(self, name: str, value) -> str:
        value = np.asarray(value)
        dtype = DataTypeAttr(DT_INT32 if value.dtype.kind == "i" else DT_FLOAT)
        value = value.astype(np.int32 if value.dtype.kind == "i" else np.float32)
        return self.node(name, "Const", dtype=dtype, value=value)

    def graph(self) -> GraphDef:
        # Producer 8: BatchNormWithGlobalNormalization is only accepted in GraphDefs older than v9.
        return GraphDef(nodes=self.nodes, producer=8)

    def checked(self, name: str, op: str, inputs, **attr) -> str:
        """op(inputs) preceded by CheckNumerics + control_dependency, as in the 2015 graph."""
        check = self.node(f"{name}/CheckNumerics", "CheckNumerics", [inputs[0]], T=FLOAT,
                          message=f"{name} has NaN/Inf")
        guarded = self.node(f"{name}/control_dependency", "Identity", [inputs[0], f"^{check}"], T=FLOAT)
        return self.node(name, op, [guarded, *inputs[1:]], T=FLOAT, **attr)

    def conv_block(self, name: str, x: str, filters: np.ndarray, bn: dict, stride: int = 1,
                   padding: str = "SAME") -> str:
        """conv2d_params -> Conv2D -> batchnorm -> CheckNumerics -> control_dependency -> Relu."""
        w = self.const(f"{name}/conv2d_params", filters)
        conv = self.node(f"{name}/Conv2D", "Conv2D", [x, w], T=FLOAT, strides=[1, stride, stride, 1],
                         padding=padding, use_cudnn_on_gpu=True)
        params = [self.const(f"{name}/batchnorm/{key}", bn[key])
                  for key in ("moving_mean", "moving_variance", "beta", "gamma")]
        norm = self.node(f"{name}/batchnorm", "BatchNormWithGlobalNormalization", [conv, *params], T=FLOAT,
                         variance_epsilon=bn.get("epsilon", BN_EPSILON), scale_after_normalization=True)
        return self.checked(name, "Relu", [norm])

    def pool(self, name: str, x: str, kind: str, size: int, stride: int, padding: str) -> str:
        return self.checked(name, kind, [x], ksize=[1, size, size, 1], strides=[1, stride, stride, 1],
                            padding=padding)

    def concat(self, name: str, values: list[str]) -> str:
        dim = self.const(f"{name}/concat_dim", np.int32(3))
        return self.node(name, "Concat", [dim, *values], N=len(values), T=FLOAT)

    def preprocessing(self, image_size: int) -> str:
        """The JPEG front end; the evaluators feed ExpandDims:0, then resize and (x - 128) / 128."""
        contents = self.node("DecodeJpeg/contents", "Const", dtype=DataTypeAttr(7),
                             value=np.array(b"", dtype=object))
        decoded = self.node("DecodeJpeg", "DecodeJpeg", [contents], channels=3)
        cast = self.node("Cast", "Cast", [decoded], SrcT=DataTypeAttr(DT_UINT8), DstT=FLOAT)
        dim = self.const("ExpandDims/dim", np.int32(0))
        expanded = self.node("ExpandDims", "ExpandDims", [cast, dim], T=FLOAT, Tdim=DataTypeAttr(DT_INT32))
        size = self.const("ResizeBilinear/size", np.array([image_size, image_size], np.int32))
        resized = self.node("ResizeBilinear", "ResizeBilinear", [expanded, size], T=FLOAT, align_corners=False)
        sub = self.node("Sub", "Sub", [resized, self.const("Sub/y", np.float32(128.0))], T=FLOAT)
        return self.node("Mul", "Mul", [sub, self.const("Mul/y", np.float32(1 / 128))], T=FLOAT)

    def softmax_head(self, pool3: str, dims: int, weights: np.ndarray, biases: np.ndarray) -> None:
        reshaped = self.node("pool_3/_reshape", "Reshape",
                             [pool3, self.const("pool_3/_reshape/shape", np.array([-1, dims], np.int32))],
                             T=FLOAT, Tshape=DataTypeAttr(DT_INT32))
        w = self.const("softmax/weights", weights)
        b = self.const("softmax/biases", biases)
        matmul = self.node("softmax/logits/MatMul", "MatMul", [reshaped, w], T=FLOAT,
                           transpose_a=False, transpose_b=False)
        logits = self.node("softmax/logits", "BiasAdd", [matmul, b], T=FLOAT)
        self.node("softmax", "Softmax", [logits], T=FLOAT)


# ------------------------------------------------------------------------------------------------
# Inception-v3 (2015 graph layout) with random weights


class _RandomInception:
    def __init__(self, builder: GraphBuilder, width: float, rng: np.random.Generator):
        self.b, self.width, self.rng = builder, width, rng
        self.channels: dict[str, int] = {}
        self.size: dict[str, int] = {}

    def ch(self, n: int) -> int:
        return max(1, round(n * self.width))

    def conv(self, name: str, x: str, out: int, kernel, stride: int = 1, padding: str = "SAME") -> str:
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        cin, cout = self.channels[x], self.ch(out)
        fan_in = kh * kw * cin
        w = self.rng.standard_normal((kh, kw, cin, cout), dtype=np.float32) * np.float32(math.sqrt(2 / fan_in))
        # Batch-norm statistics near those of the calibration activations (else most units die).
        mean, var = np.zeros(cout, np.float32), np.ones(cout, np.float32)
        if x in self.b.values:
            conv = OPS["Conv2D"](NodeDef("calibration", "Conv2D", attr={"strides": [1, stride, stride, 1],
                                                                         "padding": padding}),
                                 [self.b.values[x], torch.from_numpy(w)])()
            mean, var = conv.mean(dim=(0, 1, 2)).numpy(), conv.var(dim=(0, 1, 2)).numpy()
        bn = {"moving_mean": mean + self.rng.normal(0, 0.1, cout) * np.sqrt(var),
              "moving_variance": var * self.rng.uniform(0.8, 1.2, cout) + 1e-3,
              "beta": self.rng.normal(0, 0.2, cout), "gamma": self.rng.uniform(0.8, 1.2, cout)}
        y = self.b.conv_block(name, x, w, bn, stride, padding)
        self.channels[y] = cout
        self.size[y] = _out_size(self.size[x], kh, stride, padding)
        return y

    def pool(self, name: str, x: str, kind: str, size: int, stride: int, padding: str) -> str:
        y = self.b.pool(name, x, kind, size, stride, padding)
        self.channels[y], self.size[y] = self.channels[x], _out_size(self.size[x], size, stride, padding)
        return y

    def concat(self, name: str, values: list[str]) -> str:
        y = self.b.concat(name, values)
        self.channels[y], self.size[y] = sum(self.channels[v] for v in values), self.size[values[0]]
        return y

    def block_35(self, name: str, x: str, pool_features: int) -> str:  # Mixed_5b/5c/5d
        a = self.conv(f"{name}/conv", x, 64, 1)
        b = self.conv(f"{name}/tower/conv_1", self.conv(f"{name}/tower/conv", x, 48, 1), 64, 5)
        c = self.conv(f"{name}/tower_1/conv", x, 64, 1)
        c = self.conv(f"{name}/tower_1/conv_2", self.conv(f"{name}/tower_1/conv_1", c, 96, 3), 96, 3)
        d = self.conv(f"{name}/tower_2/conv", self.pool(f"{name}/tower_2/pool", x, "AvgPool", 3, 1, "SAME"),
                      pool_features, 1)
        return self.concat(f"{name}/join", [a, b, c, d])

    def reduction_17(self, name: str, x: str) -> str:  # Mixed_6a
        a = self.conv(f"{name}/conv", x, 384, 3, 2, "VALID")
        b = self.conv(f"{name}/tower/conv_1", self.conv(f"{name}/tower/conv", x, 64, 1), 96, 3)
        b = self.conv(f"{name}/tower/conv_2", b, 96, 3, 2, "VALID")
        c = self.pool(f"{name}/pool", x, "MaxPool", 3, 2, "VALID")
        return self.concat(f"{name}/join", [a, b, c])

    def block_17(self, name: str, x: str, c7: int) -> str:  # Mixed_6b..6e
        a = self.conv(f"{name}/conv", x, 192, 1)
        b = self.conv(f"{name}/tower/conv", x, c7, 1)
        b = self.conv(f"{name}/tower/conv_2", self.conv(f"{name}/tower/conv_1", b, c7, (1, 7)), 192, (7, 1))
        c = self.conv(f"{name}/tower_1/conv", x, c7, 1)
        for i, (out, kernel) in enumerate([(c7, (7, 1)), (c7, (1, 7)), (c7, (7, 1)), (192, (1, 7))], 1):
            c = self.conv(f"{name}/tower_1/conv_{i}", c, out, kernel)
        d = self.conv(f"{name}/tower_2/conv", self.pool(f"{name}/tower_2/pool", x, "AvgPool", 3, 1, "SAME"), 192, 1)
        return self.concat(f"{name}/join", [a, b, c, d])

    def reduction_8(self, name: str, x: str) -> str:  # Mixed_7a
        a = self.conv(f"{name}/tower/conv_1", self.conv(f"{name}/tower/conv", x, 192, 1), 320, 3, 2, "VALID")
        b = self.conv(f"{name}/tower_1/conv", x, 192, 1)
        b = self.conv(f"{name}/tower_1/conv_2", self.conv(f"{name}/tower_1/conv_1", b, 192, (1, 7)), 192, (7, 1))
        b = self.conv(f"{name}/tower_1/conv_3", b, 192, 3, 2, "VALID")
        c = self.pool(f"{name}/pool", x, "MaxPool", 3, 2, "VALID")
        return self.concat(f"{name}/join", [a, b, c])

    def block_8(self, name: str, x: str, pool_kind: str) -> str:  # Mixed_7b/7c
        a = self.conv(f"{name}/conv", x, 320, 1)
        b = self.conv(f"{name}/tower/conv", x, 384, 1)
        b = self.concat(f"{name}/tower/join", [self.conv(f"{name}/tower/mixed/conv", b, 384, (1, 3)),
                                               self.conv(f"{name}/tower/mixed/conv_1", b, 384, (3, 1))])
        c = self.conv(f"{name}/tower_1/conv_1", self.conv(f"{name}/tower_1/conv", x, 448, 1), 384, 3)
        c = self.concat(f"{name}/tower_1/join", [self.conv(f"{name}/tower_1/mixed/conv", c, 384, (1, 3)),
                                                 self.conv(f"{name}/tower_1/mixed/conv_1", c, 384, (3, 1))])
        d = self.conv(f"{name}/tower_2/conv", self.pool(f"{name}/tower_2/pool", x, pool_kind, 3, 1, "SAME"), 192, 1)
        return self.concat(f"{name}/join", [a, b, c, d])


def _out_size(size: int, kernel: int, stride: int, padding: str) -> int:
    return math.ceil(size / stride) if padding == "SAME" else (size - kernel) // stride + 1


def inception_graph_def(width: float = 1.0, image_size: int = 299, num_classes: int = 1008,
                        seed: int = 0, calibration_images: np.ndarray | None = None,
                        calibrate: bool = True) -> GraphDef:
    """Inception-v3 in the 2015 graph's layout with random weights (width=1, 299: the real shapes).

    Batch-norm statistics are set from the activations of `calibration_images` (uint8 NHWC; default:
    eight 64x64 uniform-noise images), so the random network keeps its units alive; calibrate=False
    skips that (unit statistics; fast, for layout checks).
    """
    rng = np.random.default_rng(seed)
    if calibration_images is None and calibrate:
        calibration_images = rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    b = GraphBuilder(calibration_images if calibrate else None)
    net = _RandomInception(b, width, rng)
    x = b.preprocessing(image_size)
    net.channels[x], net.size[x] = 3, image_size
    x = net.conv("conv", x, 32, 3, 2, "VALID")
    x = net.conv("conv_1", x, 32, 3, 1, "VALID")
    x = net.conv("conv_2", x, 64, 3)
    x = net.pool("pool", x, "MaxPool", 3, 2, "VALID")
    x = net.conv("conv_3", x, 80, 1, 1, "VALID")
    x = net.conv("conv_4", x, 192, 3, 1, "VALID")
    x = net.pool("pool_1", x, "MaxPool", 3, 2, "VALID")
    x = net.block_35("mixed", x, 32)
    x = net.block_35("mixed_1", x, 64)
    x = net.block_35("mixed_2", x, 64)
    x = net.reduction_17("mixed_3", x)
    for name, c7 in [("mixed_4", 128), ("mixed_5", 160), ("mixed_6", 160), ("mixed_7", 192)]:
        x = net.block_17(name, x, c7)
    x = net.reduction_8("mixed_8", x)
    x = net.block_8("mixed_9", x, "AvgPool")
    x = net.block_8("mixed_10", x, "MaxPool")  # the 2015 graph max-pools in its last tower
    pool3 = b.node("pool_3", "AvgPool", [x], T=FLOAT, ksize=[1, net.size[x], net.size[x], 1],
                   strides=[1, 1, 1, 1], padding="VALID")
    dims = net.channels[x]
    # Logits of standard deviation ~1 on the calibration images: a finite float32 softmax (no 0 * log 0).
    pool_rms = float(b.values[pool3].pow(2).mean().sqrt()) if pool3 in b.values else 1.0
    weights = rng.standard_normal((dims, num_classes), dtype=np.float32) * np.float32(
        1 / (pool_rms * math.sqrt(dims)))
    b.softmax_head(pool3, dims, weights, rng.normal(0, 1, num_classes))
    return b.graph()


# ------------------------------------------------------------------------------------------------
# Closed-form stand-in


def analytic_graph_def(num_classes: int = 1008, pool_dims: int = 2048, image_size: int = 299) -> GraphDef:
    """pool_3 = mean over pixels and colours of (x - 128) / 128, tiled to pool_dims;
    mixed_6/conv = ReLU((x - 128) / 128) of a 17x17 grid, channel k = colour k mod 3 (192 channels);
    softmax logits = first num_classes pool dims (+ a non-uniform bias the IS must not use).
    A smaller image_size (>= 17) only makes the resize cheaper; constant images give the same outputs."""
    b = GraphBuilder()
    x = b.preprocessing(image_size)
    cell = image_size // 17  # 299 -> 17x17 cells of 17 pixels (the last 10 rows/columns are dropped)
    grid = b.node("standin/grid", "AvgPool", [x], T=FLOAT, ksize=[1, cell, cell, 1],
                  strides=[1, cell, cell, 1], padding="VALID")
    tile = (np.arange(192)[None, :] % 3 == np.arange(3)[:, None]).astype(np.float32)[None, None]
    identity_bn = {"moving_mean": np.zeros(192), "moving_variance": np.ones(192), "beta": np.zeros(192),
                   "gamma": np.ones(192), "epsilon": 0.0}
    b.conv_block("mixed_6/conv", grid, tile, identity_bn, 1, "VALID")
    mean = b.node("standin/mean", "Conv2D", [grid, b.const("standin/mean/w",
                                                           np.full((1, 1, 3, pool_dims), 1 / 3, np.float32))],
                  T=FLOAT, strides=[1, 1, 1, 1], padding="VALID")
    pool3 = b.node("pool_3", "AvgPool", [mean], T=FLOAT, ksize=[1, 17, 17, 1], strides=[1, 1, 1, 1],
                   padding="VALID")
    bias = np.linspace(-3, 3, num_classes).astype(np.float32)
    b.softmax_head(pool3, pool_dims, np.eye(pool_dims, num_classes, dtype=np.float32), bias)
    return b.graph()


def standin_images(n: int, seed: int, height: int = 24, width: int = 32) -> np.ndarray:
    """uint8 NHWC test images: a random colour per image plus noise, enough variety for full-rank
    stand-in features (also good calibration images for `inception_graph_def`)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))
    return np.clip(base + rng.integers(-40, 40, (n, height, width, 3)), 0, 255).astype(np.uint8)
