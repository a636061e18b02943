"""The integrated-gradients baseline: the "average row" of the training data.

Each sparse / multi-valued feature's baseline embedding is its FREQUENCY-WEIGHTED MEAN
embedding over the training rows (every training row's value counted once, multi-valued
features over their non-padding values), each dense column's baseline its training mean, and
a scenario-context param's baseline the traffic-weighted mean of its scenario rows.

Why not zeros: an all-zero embedding is a point the model never saw (trained rows are not
centred; BatchNorm/PartitionedNorm then normalise it to an arbitrary input), so "how far from
zero" says nothing about the feature. The OOV row is learned only from rare values (or item-id
dropout) and is a specific, often atypical value. The mean embedding is what the model sees
on average, so an attribution reads "how much this row's value moves the logit away from an
average value of the feature", and the baseline's logit is (near) the scenario's mean logit.
The row's scenario (towers, gates), its text vectors and its history metadata stay at their
actual values: the baseline of a row is the average row IN THE SAME SCENARIO.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from mscenario.data.schema import PAD_ID
from mscenario.explain.groups import CONTEXT_PARAMS, Groups
from mscenario.models.embedding import data_schema


@dataclasses.dataclass
class Baseline:
  rows: np.ndarray              # [R, E] baseline embedding of every gathered slot
  dense: np.ndarray             # [D]
  context: dict                 # param path (tuple) -> [E] baseline vector
  feature_means: np.ndarray     # [F, E] per sparse/multi feature (for the report)


def context_paths(params, num_scenarios: int) -> list[tuple]:
  """Paths of per-scenario embedding params ([S, E] leaves named in CONTEXT_PARAMS)."""
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
    if names[-1] in CONTEXT_PARAMS and leaf.ndim == 2 and leaf.shape[0] == num_scenarios:
      out.append(names)
  return out


def get_path(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def compute_baseline(schema, groups: Groups, table: np.ndarray, arrays: dict,
                     train_idx: np.ndarray, params, num_scenarios: int) -> Baseline:
  """Baseline from the training rows `train_idx` of the prepared `arrays` and the run's
  embedding `table` [rows, E] (see the module docstring for why these values)."""
  base = data_schema(schema)
  table = np.asarray(table, np.float32)
  offsets = base.embedding_offsets
  feats = (*base.sparse, *base.multi)
  means = np.zeros((len(feats), table.shape[1]), np.float32)
  sparse = np.asarray(arrays["sparse"][train_idx])
  multi = np.asarray(arrays["multi"][train_idx])
  for k, f in enumerate(feats):
    if k < len(base.sparse):
      ids = sparse[:, k].astype(np.int64)
    else:
      ids = multi[:, k - len(base.sparse)].reshape(-1).astype(np.int64)
      ids = ids[ids != PAD_ID]
    if ids.size == 0:
      continue  # no values in training: the zero vector (what an all-padding row pools to)
    counts = np.bincount(ids, minlength=f.vocab_size)[: f.vocab_size].astype(np.float64)
    means[k] = (counts / counts.sum()) @ table[offsets[k]: offsets[k] + f.vocab_size]
  rows = means[groups.slot_feature] if len(groups.slot_feature) else np.zeros(
      (0, table.shape[1]), np.float32)
  dense = np.asarray(arrays["dense"][train_idx], np.float64).mean(axis=0) if len(
      groups.dense) else np.zeros((0,), np.float64)
  share = np.bincount(np.asarray(arrays["scenario"][train_idx]).astype(np.int64),
                      minlength=num_scenarios)[:num_scenarios].astype(np.float64)
  share = share / max(share.sum(), 1.0)
  context = {p: (share @ np.asarray(get_path(params, p), np.float64)).astype(np.float32)
             for p in context_paths(params, num_scenarios)}
  return Baseline(rows.astype(np.float32), dense.astype(np.float32), context, means)
