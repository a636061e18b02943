"""Built-in data protocols, so configs name a protocol instead of repeating feature lists."""
from __future__ import annotations

from ml_collections import ConfigDict

# Scenario-Wise Rec (KDD 2024) on MovieLens: scenario = user age group.
AGE_GROUPS = {"young": ["1", "18"], "adult": ["25"], "senior": ["35", "45", "50", "56"]}
AGE_DESCRIPTIONS = {
    "young": "Movie recommendations for teenagers and young adults under 25.",
    "adult": "Movie recommendations for adults aged 25 to 34.",
    "senior": "Movie recommendations for mature viewers aged 35 and older.",
}


def scenario_wise_rec(c: ConfigDict, name: str) -> ConfigDict:
  """The benchmark's protocol: label rating > 3, 8:1:1 random split, 6 sparse + 1 dense."""
  if name not in ("ml-1m", "ml-100k"):
    raise ValueError(f"scenario_wise_rec protocol is defined for ml-1m and ml-100k, not {name}")
  d = c.data
  d.source = "movielens"
  d.name = name
  d.features = ConfigDict({
      "user_id": {"kind": "sparse", "column": "user_id", "min_count": 1, "hash_buckets": 0},
      "item_id": {"kind": "sparse", "column": "item_id", "min_count": 1, "hash_buckets": 0},
      "gender": {"kind": "sparse", "column": "gender", "min_count": 1, "hash_buckets": 0},
      "occupation": {"kind": "sparse", "column": "occupation", "min_count": 1,
                     "hash_buckets": 0},
      "zip_code": {"kind": "sparse", "column": "zip_code", "min_count": 1, "hash_buckets": 0},
      # The benchmark uses a movie's first genre as one categorical feature.
      "first_genre": {"kind": "sparse", "column": "genres", "min_count": 1, "hash_buckets": 0},
      "age": {"kind": "dense", "column": "age_bucket", "default": 0.0,
              "normalize": "standard"},
      "title": {"kind": "text", "column": "title"},
  })
  d.scenario = ConfigDict({"field": "age_bucket", "groups": AGE_GROUPS,
                           "order": ("young", "adult", "senior"),
                           "descriptions": AGE_DESCRIPTIONS})
  d.label = ConfigDict({"field": "rating", "rule": "> 3"})
  d.split.kind = "random"
  d.split.ratios = (0.8, 0.1, 0.1)
  # The benchmark's training setup: batch 4096, Adam 1e-3, early stopping on validation AUC.
  c.train.batch_size = 4096
  c.train.learning_rate = 1e-3
  c.train.epochs = 10
  c.train.patience = 2
  return c


def synthetic(c: ConfigDict) -> ConfigDict:
  """Features of the built-in synthetic multi-scenario world (mscenario.data.synthetic)."""
  d = c.data
  d.source = "synthetic"
  d.name = "synthetic"
  d.features = ConfigDict({
      "user_id": {"kind": "sparse", "column": "user_id", "min_count": 1, "hash_buckets": 0},
      "item_id": {"kind": "sparse", "column": "item_id", "min_count": 1, "hash_buckets": 0},
      "gender": {"kind": "sparse", "column": "gender", "min_count": 1, "hash_buckets": 0},
      "region": {"kind": "sparse", "column": "region", "min_count": 1, "hash_buckets": 0},
      "category": {"kind": "sparse", "column": "category", "min_count": 1, "hash_buckets": 0},
      "age_bucket": {"kind": "sparse", "column": "age_bucket", "min_count": 1,
                     "hash_buckets": 0},
      "item_text": {"kind": "text", "column": "item_text"},
  })
  d.scenario = ConfigDict({"field": "scenario", "groups": {}, "order": (),
                           "descriptions": {}})
  d.label = ConfigDict({"field": "label", "rule": "binary"})
  return c
