"""The TensorFlow backend (tf.compat.v1, as the reference evaluator) and its agreement with the torch
backend on the same stand-in GraphDefs. Skipped when TensorFlow is not installed."""
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed: pip install 'tensorflow-cpu==2.21.*' "
                                              "(the ptq4arvg[eval-tf] extra) to test the tf backend")

from evaluation import evaluate  # noqa: E402
from evaluation.backends import TFBackend, TorchBackend  # noqa: E402
from evaluation.graph_torch import legacy_resize_bilinear  # noqa: E402
from evaluation.graphdef import parse_graph_def, serialize_graph_def  # noqa: E402
from evaluation.metrics import inception_score  # noqa: E402
from evaluation.synthetic_graph import analytic_graph_def, inception_graph_def, standin_images  # noqa: E402

v1 = tf.compat.v1
STANDIN = dict(width=1 / 24, image_size=75)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def standin_bytes():
    return serialize_graph_def(inception_graph_def(**STANDIN, calibration_images=standin_images(64, 99)))


@pytest.fixture(scope="module")
def backends(standin_bytes):
    return TFBackend(standin_bytes), TorchBackend(standin_bytes, "cpu")


def _features(backend, images, batch_size=64):
    return backend.activations(images[i:i + batch_size] for i in range(0, len(images), batch_size))


def _relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_tensorflow_reads_our_graphdef_bytes(standin_bytes):
    ours = parse_graph_def(standin_bytes)
    theirs = v1.GraphDef()
    theirs.ParseFromString(standin_bytes)
    assert [(n.name, n.op, list(n.input)) for n in theirs.node] == [(n.name, n.op, n.inputs) for n in ours.nodes]
    assert theirs.versions.producer == ours.producer
    for node, mine in zip(theirs.node, ours.nodes):
        if node.op == "Const" and node.name != "DecodeJpeg/contents":
            np.testing.assert_array_equal(tf.make_ndarray(node.attr["value"].tensor), mine.attr["value"])
        if node.op == "Conv2D":
            assert list(node.attr["strides"].list.i) == mine.attr["strides"]
            assert node.attr["padding"].s.decode() == mine.attr["padding"]


def test_our_reader_reads_tensorflow_serialized_graphs():
    graph = tf.Graph()
    values = {"scalar": np.float32(1.5), "filled": np.full((4, 5), 2.5, np.float32),  # TF stores one value
              "dense": np.arange(12, dtype=np.float32).reshape(3, 4), "int64": np.array([-3, 2 ** 40], np.int64),
              "int32": np.array([[1, -2]], np.int32), "flags": np.array([True, False, True]),
              "half": np.array([0.5, -1.25], np.float16), "double": np.array([1e-300, 3.0])}
    with graph.as_default():
        for name, value in values.items():
            tf.constant(value, name=name)
        tf.constant([b"abc", b""], name="strings")
        x = v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        tf.nn.max_pool2d(x, [1, 3, 3, 1], [1, 2, 2, 1], "SAME", name="pool")
    data = graph.as_graph_def().SerializeToString()
    nodes = parse_graph_def(data).by_name()
    for name, value in values.items():
        got = nodes[name].attr["value"]
        assert got.dtype == value.dtype and got.shape == np.shape(value), name
        np.testing.assert_array_equal(got, value)
    assert list(nodes["strings"].attr["value"]) == [b"abc", b""]
    assert nodes["pool"].attr["ksize"] == [1, 3, 3, 1] and nodes["pool"].attr["padding"] == "SAME"
    assert nodes["x"].attr["shape"].dims == [-1, 8, 8, 3]


def test_tf_backend_analytic_features_of_constant_images():
    colours = np.random.default_rng(0).integers(0, 256, (70, 3)).astype(np.uint8)
    colours[:3] = [[255, 255, 255], [0, 0, 0], [128, 128, 128]]
    images = np.broadcast_to(colours[:, None, None, :], (70, 37, 53, 3)).copy()
    pool, spatial = _features(TFBackend(serialize_graph_def(analytic_graph_def())), images)
    u = (colours.astype(np.float64) - 128) / 128
    np.testing.assert_allclose(pool, np.repeat(u.mean(1, keepdims=True), 2048, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pool[:3, 0], [0.9921875, -1, 0], atol=1e-6)
    np.testing.assert_allclose(spatial, np.tile(np.maximum(u[:, np.arange(7) % 3], 0), (1, 17 * 17)), atol=1e-6)


def test_tf_softmax_uses_the_matmul_weights_without_bias():
    backend = TFBackend(serialize_graph_def(analytic_graph_def(image_size=34)))
    labels = np.arange(10_000) % 10
    features = np.zeros((10_000, 2048), np.float32)
    features[np.arange(10_000), labels] = 50.0
    assert inception_score(backend.class_probabilities(features)) == pytest.approx(10.0, rel=1e-5)


@pytest.mark.parametrize("shape, size, align_corners", [((3, 256, 256, 3), (299, 299), False),
                                                        ((2, 37, 53, 3), (299, 299), False),
                                                        ((2, 5, 7, 1), (9, 4), True)])
def test_legacy_resize_matches_tensorflow(shape, size, align_corners):
    images = np.random.default_rng(1).integers(0, 256, shape).astype(np.float32)
    with tf.Graph().as_default(), v1.Session() as session:
        expected = session.run(v1.image.resize_bilinear(images, size, align_corners=align_corners))
    got = legacy_resize_bilinear(torch.from_numpy(images), size, align_corners).numpy()
    assert np.abs(got - expected).max() < 1e-4  # values up to 255: float32 rounding only


def test_tf_legacy_resize_example():
    with tf.Graph().as_default(), v1.Session() as session:
        out = session.run(v1.image.resize_bilinear(np.array([[[[0.0], [1.0]], [[2.0], [3.0]]]]), [3, 3]))
    np.testing.assert_allclose(out[0, :, :, 0], [[0, 2 / 3, 1], [4 / 3, 2, 7 / 3], [2, 8 / 3, 3]], atol=1e-6)


def test_backends_agree_on_features(backends):
    tf_backend, torch_backend = backends
    images = standin_images(100, 7, 29, 41)
    (tf_pool, tf_spatial), (pool, spatial) = _features(tf_backend, images), _features(torch_backend, images, 32)
    assert tf_pool.shape == pool.shape and tf_spatial.shape == spatial.shape
    assert _relative(pool, tf_pool) < 1e-4 and _relative(spatial, tf_spatial) < 1e-4
    tf_probs, probs = tf_backend.class_probabilities(tf_pool), torch_backend.class_probabilities(tf_pool)
    assert _relative(probs, tf_probs) < 1e-4


def test_backends_agree_on_metrics(tmp_path, backends):
    ref, sample = tmp_path / "ref.npz", tmp_path / "sample.npz"
    np.savez(ref, arr_0=standin_images(150, 1))
    np.savez_compressed(sample, arr_0=standin_images(200, 2))
    results = [evaluate(str(ref), str(sample), backend, is_split_size=50, progress=False, log=lambda _: None)
               for backend in backends]
    tf_metrics, torch_metrics = results
    assert tf_metrics.backend.startswith("tensorflow 2.") and torch_metrics.backend.startswith("torch")
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        a, b = getattr(tf_metrics, key), getattr(torch_metrics, key)
        assert b == pytest.approx(a, rel=1e-3), key
    assert tf_metrics.fid > 1.0 and 0 < tf_metrics.precision < 1
