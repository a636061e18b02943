"""The best configuration (configs/ml1m_best.py: MMoE + gated item text) plus the
collaborative-filtering features of data.collaborative (issue 14; BENCHMARKS.md §11):
baseline biases on the training stars, item/user-KNN residual scores and support, a rank-64
residual SVD and training counts, out of fold (5 folds) for training rows.
"""
import importlib.util
import os


def get_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ml1m_best.py")
  spec = importlib.util.spec_from_file_location("_ml1m_best", path)
  best = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(best)
  c = best.get_config()
  c.data.collaborative.enabled = True
  return c
