"""A tiny STAR run on a TFDS dataset (tests/test_tfds_source.py builds it): the feature names
of the dataset are mapped to the canonical ones with data.tfds.columns, as for a table."""
from ml_collections import ConfigDict

from mscenario.config import base_config


def get_config():
  c = base_config()
  d = c.data
  d.source = "tfds"
  d.name = "tiny_recs"
  d.tfds.name = "mscenario_tiny_recs"
  d.tfds.data_dir = ""  # set with --config.data.tfds.data_dir
  d.tfds.splits = ("train", "validation", "test")
  d.tfds.columns = ConfigDict({"genre": "cat", "label": "click"})
  d.features = ConfigDict({
      "user_id": {"kind": "sparse", "column": "user_id", "min_count": 1, "hash_buckets": 0},
      "item_id": {"kind": "sparse", "column": "item_id", "min_count": 1, "hash_buckets": 0},
      "genre": {"kind": "sparse", "column": "genre", "min_count": 1, "hash_buckets": 0},
      "price": {"kind": "dense", "column": "price", "default": 0.0, "normalize": "standard"},
  })
  d.scenario = ConfigDict({"field": "scenario", "groups": {}, "order": (), "descriptions": {}})
  d.label = ConfigDict({"field": "label", "rule": "binary"})
  c.model.name = "star"
  c.model.embed_dim = 8
  c.model.star.hidden = (16,)
  c.model.star.aux_hidden = (8,)
  c.train.batch_size = 128
  c.train.eval_batch_size = 1024
  c.train.epochs = 1
  c.train.log_every_steps = 2
  return c
