"""The evaluator pipeline with the torch backend on stand-in GraphDefs (no TensorFlow, no download).

Stand-ins (evaluation/synthetic_graph.py) use the real tensor names and op types: an analytic graph
with closed-form features, and the Inception-v3 2015 layout with random weights at reduced width and
resolution. All numbers here are stand-in numbers, not ImageNet metrics.
"""
import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import evaluate, graph_torch
from evaluation.backends import TorchBackend, default_backend_name
from evaluation.graphdef import (DataTypeAttr, GraphDef, NodeDef, Shape, parse_graph_def,
                                 serialize_graph_def)
from evaluation.inception_file import INCEPTION_FILENAME, inception_path, read_graph_bytes
from evaluation.metrics import compute_statistics, inception_score
from evaluation.npz import NpzImages
from evaluation.synthetic_graph import analytic_graph_def, inception_graph_def, standin_images

REPO_ROOT = Path(__file__).resolve().parents[1]
STANDIN = dict(width=1 / 24, image_size=75)  # pool_3: 85 dims, mixed_6/conv: 3x3x8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def analytic_bytes():
    return serialize_graph_def(analytic_graph_def(image_size=34))  # same outputs as 299, cheaper


@pytest.fixture(scope="module")
def standin_bytes():
    return serialize_graph_def(inception_graph_def(**STANDIN, calibration_images=standin_images(64, 99)))


@pytest.fixture(scope="module")
def standin_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("npz")
    np.savez(folder / "ref.npz", arr_0=standin_images(150, 1))
    np.savez(folder / "sample.npz", arr_0=standin_images(200, 2))
    return folder


@pytest.fixture(scope="module")
def standin_backend(standin_bytes):
    return TorchBackend(standin_bytes, "cpu")


@pytest.fixture(scope="module")
def standin_metrics(standin_backend, standin_files):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no order warning for shuffled samples, no singular sqrtm
        return evaluate(str(standin_files / "ref.npz"), str(standin_files / "sample.npz"), standin_backend,
                        batch_size=32, is_split_size=50, progress=False, log=lambda _: None)


def _features(backend, images, batch_size=64):
    return backend.activations(images[i:i + batch_size] for i in range(0, len(images), batch_size))


# ------------------------------------------------------------------------------------------------
# GraphDef reader / writer


def test_graphdef_round_trip_of_every_attribute_kind():
    node = NodeDef("n", "Op", ["a", "b:1", "^c"], device="/cpu:0", attr={
        "s": "SAME", "i": -5, "f": 0.25, "b": True, "type": DataTypeAttr(1), "shape": Shape([-1, 3]),
        "ints": [1, 2, 3, 1], "floats": [0.5, -1.5], "strings": ["x", "y"], "types": [DataTypeAttr(3)],
        "scalar": np.array(3.5, np.float32), "ints32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "int64": np.array([-(2 ** 40), 7], np.int64), "half": np.array([0.5, -2], np.float16),
        "bools": np.array([True, False]), "text": np.array([b"jpeg", b""], dtype=object)})
    parsed = parse_graph_def(serialize_graph_def(GraphDef([node], producer=21)))
    assert parsed.producer == 21
    back = parsed.nodes[0]
    assert (back.name, back.op, back.inputs, back.device, back.data_inputs) == \
        ("n", "Op", ["a", "b:1", "^c"], "/cpu:0", ["a", "b:1"])
    for key, value in node.attr.items():
        if isinstance(value, np.ndarray):
            assert back.attr[key].dtype == value.dtype and back.attr[key].shape == value.shape, key
            np.testing.assert_array_equal(back.attr[key], value)
        else:
            assert back.attr[key] == value and type(back.attr[key]) is type(value), key


def test_graphdef_reader_rejects_non_graphdef_bytes():
    with pytest.raises(ValueError):
        parse_graph_def(b"\x07not a protobuf")


def test_inception_standin_has_the_real_layout_at_full_size():
    graph = inception_graph_def(calibrate=False)
    nodes = graph.by_name()
    assert nodes["mixed_6/conv"].op == "Relu" and nodes["pool_3"].op == "AvgPool"
    assert nodes["mixed_6/conv/conv2d_params"].attr["value"].shape == (1, 1, 768, 192)
    assert nodes["softmax/weights"].attr["value"].shape == (2048, 1008)
    assert nodes["mixed_10/tower_2/pool"].op == "MaxPool" and nodes["mixed_9/tower_2/pool"].op == "AvgPool"
    params = sum(n.attr["value"].size for n in graph.nodes if n.op == "Const" and n.attr["value"].dtype != object)
    assert 23_500_000 < params < 24_000_000  # Inception-v3 (2015) with its 1008-way softmax


# ------------------------------------------------------------------------------------------------
# Converter ops and preprocessing


def test_legacy_resize_bilinear_examples():
    image = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 2, 2, 1)
    out = graph_torch.legacy_resize_bilinear(image, (3, 3))[0, :, :, 0]
    expected = [[0, 2 / 3, 1], [4 / 3, 2, 7 / 3], [2, 8 / 3, 3]]
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    lower, upper, frac = graph_torch._resize_taps(256, 299, False, torch.device("cpu"))
    source = (lower + frac).numpy()
    np.testing.assert_allclose(source[[0, 1, 2, 298]], [0, 0.8562, 1.7124, 255.1438], atol=1e-4)
    assert upper[-1] == 255 and lower[-1] == 255


def test_same_padding_and_pools_follow_tensorflow():
    assert graph_torch.same_padding(35, 3, 1) == (1, 1)
    assert graph_torch.same_padding(8, 3, 2) == (0, 1)  # the extra pixel goes after
    x = torch.arange(16.0).reshape(1, 4, 4, 1)
    node = NodeDef("p", "AvgPool", attr={"ksize": [1, 3, 3, 1], "strides": [1, 1, 1, 1], "padding": "SAME"})
    corner = graph_torch.OPS["AvgPool"](node, [x])()[0, 0, 0, 0]
    assert corner == pytest.approx((0 + 1 + 4 + 5) / 4)  # padding excluded from the average
    node = NodeDef("p", "AvgPool", attr={"ksize": [1, 2, 2, 1], "strides": [1, 2, 2, 1], "padding": "SAME"})
    uneven = graph_torch.OPS["AvgPool"](node, [torch.arange(9.0).reshape(1, 3, 3, 1)])()
    np.testing.assert_allclose(uneven[0, :, :, 0].numpy(), [[2, 3.5], [6.5, 8]])
    node = NodeDef("p", "MaxPool", attr={"ksize": [1, 2, 2, 1], "strides": [1, 2, 2, 1], "padding": "SAME"})
    negative = graph_torch.OPS["MaxPool"](node, [-torch.arange(1.0, 10.0).reshape(1, 3, 3, 1)])()
    np.testing.assert_allclose(negative[0, :, :, 0].numpy(), [[-1, -3], [-7, -9]])  # -inf padding


def test_analytic_features_of_constant_images():
    """70 constant-colour 37x53 images (not a batch multiple, non-square, not 299): closed form."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (70, 3)).astype(np.uint8)
    colours[:3] = [[255, 255, 255], [0, 0, 0], [128, 128, 128]]
    images = np.broadcast_to(colours[:, None, None, :], (70, 37, 53, 3)).copy()
    pool, spatial = _features(TorchBackend(serialize_graph_def(analytic_graph_def()), "cpu"), images)
    u = (colours.astype(np.float64) - 128) / 128
    assert pool.shape == (70, 2048) and spatial.shape == (70, 17 * 17 * 7)
    np.testing.assert_allclose(pool, np.repeat(u.mean(1, keepdims=True), 2048, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pool[:3, 0], [0.9921875, -1, 0], atol=1e-6)  # 255, 0, 128
    per_position = np.maximum(u[:, np.arange(7) % 3], 0)  # channel k = colour k mod 3, H, W, C order
    np.testing.assert_allclose(spatial, np.tile(per_position, (1, 17 * 17)), atol=1e-6)


def test_softmax_weights_are_the_matmul_input_without_bias(analytic_bytes):
    backend = TorchBackend(analytic_bytes, "cpu")
    np.testing.assert_array_equal(backend.softmax_weights.numpy(), np.eye(2048, 1008, dtype=np.float32))
    labels = np.arange(10_000) % 10
    features = np.zeros((10_000, 2048), np.float32)
    features[np.arange(10_000), labels] = 50.0
    probs = backend.class_probabilities(features)
    assert inception_score(probs) == pytest.approx(10.0, rel=1e-5)  # the biased logits would not give 10
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)


def test_jpeg_front_end_is_not_converted(analytic_bytes):
    from evaluation.graph_torch import GraphModule
    with pytest.raises(NotImplementedError, match="needs the string tensor DecodeJpeg/contents:0"):
        GraphModule(parse_graph_def(analytic_bytes), [], ["pool_3:0"])


def test_unsupported_op_is_reported(analytic_bytes):
    graph = parse_graph_def(analytic_bytes)
    next(n for n in graph.nodes if n.name == "Sub").op = "Erf"
    with pytest.raises(NotImplementedError, match="op Erf"):
        TorchBackend(serialize_graph_def(graph), "cpu")


def test_features_do_not_depend_on_batch_size(standin_bytes):
    backend = TorchBackend(standin_bytes, "cpu")
    images = standin_images(20, 3)
    pool_a, spatial_a = _features(backend, images, 20)
    pool_b, spatial_b = _features(backend, images, 7)
    # Only the convolution kernels' summation order may change with the batch shape.
    assert np.abs(pool_a - pool_b).max() < 1e-4 * np.abs(pool_a).max()
    assert np.abs(spatial_a - spatial_b).max() < 1e-4 * np.abs(spatial_a).max()


# ------------------------------------------------------------------------------------------------
# npz reading and the input contract


@pytest.mark.parametrize("save, fortran", [(np.savez, False), (np.savez_compressed, False),
                                           (np.savez, True), (np.savez_compressed, True)])
def test_npz_readers_give_identical_batches(tmp_path, save, fortran):
    images = standin_images(23, 4, 9, 11)
    path = tmp_path / "x.npz"
    save(path, arr_0=np.asfortranarray(images) if fortran else images)
    with NpzImages(path) as reader:
        assert reader.info.shape == images.shape and reader.info.dtype == np.uint8
        if save is np.savez:
            assert isinstance(reader._array, np.memmap)  # uncompressed: memory-mapped in place
        if save is np.savez_compressed and not fortran:
            assert reader._array is None  # streamed out of the zip
        batches = list(reader.batches(5))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert all(b.flags.c_contiguous and b.flags.writeable for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), images)


def test_npz_reader_handles_large_zip64_offsets(tmp_path):
    path = tmp_path / "zip64.npz"
    images = standin_images(4, 5, 8, 8)
    with zipfile.ZipFile(path, "w", allowZip64=True) as zf:
        zf.writestr("labels.npy", b"\0" * 1000)
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, images)
    with NpzImages(path) as reader:
        np.testing.assert_array_equal(np.concatenate(list(reader.batches(3))), images)


def _write(folder, name, **arrays):
    path = folder / f"{name}.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("sample, message", [
    (dict(images=np.zeros((10, 16, 16, 3), np.uint8)), "missing arr_0"),
    (dict(arr_0=np.zeros((10, 16, 16, 3), np.float32)), "expected uint8"),
    (dict(arr_0=np.zeros((10, 3, 16, 16), np.uint8)), "NCHW"),
    (dict(arr_0=np.zeros((10, 8, 8, 3), np.uint8)), "reference resolution"),
    (dict(arr_0=np.zeros((10, 16, 16), np.uint8)), "grayscale"),
    (dict(arr_0=np.zeros((10, 16, 16, 1), np.uint8)), "grayscale"),
    (dict(arr_0=np.zeros((10, 16, 16, 4), np.uint8)), "RGBA"),
    (dict(arr_0=np.zeros((4, 16, 16, 3), np.uint8)), "split needs 5"),
])
def test_input_contract_errors(tmp_path, analytic_bytes, sample, message):
    ref = _write(tmp_path, "ref", arr_0=standin_images(10, 0, 16, 16))
    with pytest.raises(ValueError, match=message):
        evaluate(ref, _write(tmp_path, "sample", **sample), TorchBackend(analytic_bytes, "cpu"),
                 is_split_size=5, progress=False, log=lambda _: None)


def test_reference_with_partial_cached_statistics_is_rejected(tmp_path, analytic_bytes):
    images = standin_images(10, 0, 16, 16)
    ref = _write(tmp_path, "ref", arr_0=images, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="lacks"):
        evaluate(ref, _write(tmp_path, "sample", arr_0=images), TorchBackend(analytic_bytes, "cpu"),
                 is_split_size=5, progress=False, log=lambda _: None)


# ------------------------------------------------------------------------------------------------
# End to end (stand-in network)


def test_evaluate_reference_against_itself(standin_backend, standin_files):
    ref = str(standin_files / "ref.npz")
    metrics = evaluate(ref, ref, standin_backend, is_split_size=50, progress=False, log=lambda _: None)
    assert abs(metrics.fid) < 1e-4 and abs(metrics.sfid) < 1e-4
    assert metrics.precision == 1.0 and metrics.recall == 1.0
    assert metrics.inception_score > 1.0 and metrics.num_samples == 150


def test_evaluate_matches_the_metric_functions(standin_backend, standin_metrics):
    from evaluation.manifold import precision_recall
    backend, metrics = standin_backend, standin_metrics
    ref_pool, ref_spatial = _features(backend, standin_images(150, 1))
    pool, spatial = _features(backend, standin_images(200, 2))
    assert metrics.fid == pytest.approx(compute_statistics(pool).frechet_distance(compute_statistics(ref_pool)), rel=1e-6)
    assert metrics.sfid == pytest.approx(compute_statistics(spatial).frechet_distance(compute_statistics(ref_spatial)), rel=1e-6)
    assert metrics.inception_score == pytest.approx(inception_score(backend.class_probabilities(pool), 50), rel=1e-6)
    assert (metrics.precision, metrics.recall) == precision_recall(ref_pool, pool)
    assert metrics.fid > 1.0 and 0 < metrics.precision < 1 and 0 < metrics.recall <= 1
    assert set(metrics.timings) >= {"reference activations", "sample activations", "precision/recall"}
    assert not metrics.warnings


def test_cached_statistics_are_used_and_sample_mu_warns(tmp_path, standin_backend, standin_files):
    backend = standin_backend
    images = np.load(standin_files / "sample.npz")["arr_0"]
    pool, spatial = _features(backend, images)
    pool_stats, spatial_stats = compute_statistics(pool), compute_statistics(spatial)
    ref = _write(tmp_path, "ref", arr_0=standin_images(150, 1), mu=pool_stats.mu, sigma=pool_stats.sigma,
                 mu_s=spatial_stats.mu, sigma_s=spatial_stats.sigma)
    metrics = evaluate(ref, str(standin_files / "sample.npz"), backend, is_split_size=50, progress=False,
                       log=lambda _: None)
    assert abs(metrics.fid) < 1e-4 and abs(metrics.sfid) < 1e-4  # cached = the samples' own statistics
    sample = _write(tmp_path, "sample", arr_0=images[:50], mu=pool_stats.mu, sigma=pool_stats.sigma,
                    mu_s=spatial_stats.mu, sigma_s=spatial_stats.sigma)
    with pytest.warns(UserWarning, match="carries cached statistics"):
        metrics = evaluate(ref, sample, backend, is_split_size=50, progress=False, log=lambda _: None)
    assert abs(metrics.fid) < 1e-4  # the sample's cached statistics, not its 50 images
    assert any("cached statistics" in w for w in metrics.warnings)


def test_class_sorted_samples_warn(tmp_path, standin_backend, standin_files, standin_metrics):
    backend = standin_backend
    images = np.load(standin_files / "sample.npz")["arr_0"]
    probabilities = backend.class_probabilities(_features(backend, images)[0])
    order = np.argsort(probabilities.argmax(1), kind="stable")
    sorted_path = _write(tmp_path, "sorted", arr_0=images[order])
    with pytest.warns(UserWarning, match="sorted by class"):
        metrics = evaluate(str(standin_files / "ref.npz"), sorted_path, backend, is_split_size=100,
                           progress=False, log=lambda _: None)
    assert metrics.inception_score < inception_score(probabilities, 100)  # unsorted: no warning (fixture)
    assert metrics.inception_score == pytest.approx(inception_score(probabilities[order], 100), rel=1e-6)
    assert metrics.fid == pytest.approx(standin_metrics.fid, rel=1e-6)  # only the IS depends on order


# ------------------------------------------------------------------------------------------------
# Command line, backend choice, imports, weights file


def _cli(args, cwd):
    env = dict(os.environ, PYTHONPATH="", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_as_script_and_module(tmp_path, standin_bytes, standin_files):
    graph = tmp_path / "standin.pb"
    graph.write_bytes(standin_bytes)
    common = [str(standin_files / "ref.npz"), str(standin_files / "sample.npz"), "--inception", str(graph),
              "--backend", "torch", "--device", "cpu", "--is-split-size", "50", "--quiet"]
    script = _cli([str(REPO_ROOT / "evaluation" / "test.py"), *common, "--json", str(tmp_path / "a.json")], tmp_path)
    assert script.returncode == 0, script.stderr
    module = _cli(["-m", "evaluation.test", *common, "--json", str(tmp_path / "b.json")], REPO_ROOT)
    assert module.returncode == 0, module.stderr
    for key in ("Inception Score:", "FID:", "sFID:", "Precision:", "Recall:", "backend torch"):
        assert key in script.stdout
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert a[key] == b[key] and np.isfinite(a[key])
    assert a["backend"].startswith("torch") and a["num_samples"] == 200


def test_import_does_not_load_tensorflow():
    probe = "import sys, evaluation, evaluation.test; print('tensorflow' in sys.modules)"
    result = _cli(["-c", probe], REPO_ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


def test_default_backend_choice(monkeypatch):
    import evaluation.backends as backends
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "tensorflow_available", lambda: True)
    assert default_backend_name() == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_backend_name() == "tf"
    monkeypatch.setattr(backends, "tensorflow_available", lambda: False)
    assert default_backend_name() == "torch"


def test_inception_file_download_and_checksum(tmp_path, analytic_bytes):
    source = tmp_path / "served.pb"
    source.write_bytes(analytic_bytes)
    cache = tmp_path / "cache"
    path = inception_path(cache_dir=cache, url=source.as_uri())
    assert path == cache / INCEPTION_FILENAME and path.read_bytes() == analytic_bytes
    assert not list(cache.glob("*.tmp"))
    assert read_graph_bytes(path) == analytic_bytes  # records sha256 on first use
    assert (cache / f"{INCEPTION_FILENAME}.sha256").read_text().split()[1] == str(len(analytic_bytes))
    assert inception_path(cache_dir=cache, url="file:///nowhere") == path  # cached: no download
    path.write_bytes(analytic_bytes[:-1] + b"\0")
    with pytest.raises(ValueError, match="sha256"):
        read_graph_bytes(path)


def test_inception_file_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQ4ARVG_CACHE", str(tmp_path / "root"))
    expected = tmp_path / "root" / "inception" / INCEPTION_FILENAME
    with pytest.raises(FileNotFoundError) as error:
        inception_path(url=(tmp_path / "missing.pb").as_uri())
    assert INCEPTION_FILENAME in str(error.value) and str(expected) in str(error.value)
    assert not expected.with_name(INCEPTION_FILENAME + ".tmp").exists()
    with pytest.raises(FileNotFoundError, match="downloads are disabled"):
        inception_path(download=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        inception_path(tmp_path / "given.pb")


# ------------------------------------------------------------------------------------------------
# Golden values (real assets only)

ADM_GUIDED_UPSAMPLED_256 = {"inception_score": 215.8370361328125, "fid": 3.9425574129223264,
                            "sfid": 6.140433703346162, "precision": 0.8265, "recall": 0.5309}


def test_golden_values_with_the_real_assets():
    """The reference evaluator's published output for ADM-G+U 256 (a GPU run of 60k images)."""
    assets = os.environ.get("PTQ4ARVG_EVAL_ASSETS")
    if not assets:
        pytest.skip("set PTQ4ARVG_EVAL_ASSETS to a folder holding classify_image_graph_def.pb, "
                    "VIRTUAL_imagenet256_labeled.npz and admnet_guided_upsampled_imagenet256.npz")
    folder = Path(assets)
    backend = TorchBackend(read_graph_bytes(folder / INCEPTION_FILENAME))
    metrics = evaluate(str(folder / "VIRTUAL_imagenet256_labeled.npz"),
                       str(folder / "admnet_guided_upsampled_imagenet256.npz"), backend, progress=False)
    for key in ("inception_score", "fid", "sfid"):
        assert getattr(metrics, key) == pytest.approx(ADM_GUIDED_UPSAMPLED_256[key], rel=5e-3), key
    for key in ("precision", "recall"):  # float16 distances: a few tenths of a point between kernels
        assert getattr(metrics, key) == pytest.approx(ADM_GUIDED_UPSAMPLED_256[key], abs=0.01), key
