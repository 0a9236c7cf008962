"""The ADM (guided-diffusion) evaluator: IS, FID, sFID, Precision and Recall of .npz sample files.

Two feature backends run the same 2015 Inception GraphDef (classify_image_graph_def.pb): `tf`
(tf.compat.v1, as the reference evaluator; TensorFlow is imported only when it is chosen) and `torch`
(the GraphDef converted to torch ops at load time; fast on a GPU). Statistics, IS and precision/recall
are shared. Command line: `python -m evaluation.test REF.npz SAMPLE.npz`.
"""
from evaluation.backends import (FeatureBackend, TFBackend, TorchBackend, default_backend_name,
                                 make_backend)
from evaluation.evaluator import Metrics, evaluate
from evaluation.inception_file import INCEPTION_URL, inception_path, read_graph_bytes
from evaluation.metrics import FIDStatistics, compute_statistics, inception_score
from evaluation.manifold import precision_recall

__all__ = ["FeatureBackend", "TFBackend", "TorchBackend", "default_backend_name", "make_backend", "Metrics",
           "evaluate", "INCEPTION_URL", "inception_path", "read_graph_bytes", "FIDStatistics",
           "compute_statistics", "inception_score", "precision_recall"]
