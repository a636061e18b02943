"""STAR on the built-in synthetic multi-scenario world: no download, true click probabilities
known, so the report shows the Bayes-optimal AUC beside the model's.

Training recipe chosen on the scaling curve (benchmarks/scaling.py, BENCHMARKS.md §18): with
3 epochs the model was still learning at every size, and with more epochs it overfits after
4-5 (10^6 rows); decoupled weight decay 0.1 regularises the embedding rows and layers, and
early stopping (patience 2) picks the epoch, so one config serves 10^5 to 10^7 rows.
"""
from mscenario.config import base_config
from mscenario.data.presets import synthetic


def get_config():
  c = synthetic(base_config())
  c.model.name = "star"
  c.train.batch_size = 2048
  c.train.epochs = 10
  c.train.patience = 2
  c.train.weight_decay = 0.1
  return c
