"""STAR on the built-in synthetic multi-scenario world: no download, true click probabilities
known, so the report shows the Bayes-optimal AUC beside the model's."""
from mscenario.config import base_config
from mscenario.data.presets import synthetic


def get_config():
  c = synthetic(base_config())
  c.model.name = "star"
  c.train.batch_size = 2048
  c.train.epochs = 3
  return c
