"""Auxiliary objective on the raw feedback (issue 14 §2, `train.aux_rating`).

The ML-1M label is `rating > 3`; the 1-5 stars behind it carry finer signal. With
`train.aux_rating.weight > 0` a small second head predicts the raw label values (the prepared
data's `feedback` column) and the step minimises BCE + weight * aux.

Design (model-agnostic, no model changes): every model embeds its inputs through the one
'embedding' module (models/embedding.py, EmbeddingCollection), so the train step captures that
module's output during the ordinary forward pass (Flax `capture_intermediates`) and the head
reads concat(flatten(embeddings), dense) — the shared input representation, whose embeddings
the main head trains too. The head's parameters sit beside the model's in the train state
(params['aux_rating']); the model never sees them, so predict, eval, export and serve score
with the main head alone (state.all_params leaves the head out). Weight 0 builds nothing: the
step is exactly the step without this module.

Targets: 'regression' = squared error on the values scaled to [-1, 1] by the training range;
'ordinal' = CORAL-style cumulative logits, one shared score plus one threshold per cut
between consecutive training values (ML-1M: P(r > 1), ..., P(r > 4)), mean BCE over the
cuts. Both constants come from the training values' levels, which a random split does not
change, so the replicas of a sweep share them.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mscenario.errors import ConfigError
from mscenario.models.embedding import EmbeddingCollection, data_schema

AUX_KEY = "aux_rating"
KINDS = ("regression", "ordinal")
MAX_LEVELS = 32  # ordinal: distinct training values (one logit per cut)


class AuxHead(nn.Module):
  """x [B, F] -> regression [B, 1] or ordinal cumulative logits [B, cuts]."""
  hidden: Sequence[int]
  cuts: int                      # 0 = regression
  init_thresholds: Sequence[float] = ()

  @nn.compact
  def __call__(self, x):
    for i, h in enumerate(self.hidden):
      x = nn.relu(nn.Dense(h, name=f"hidden_{i}")(x))
    if not self.cuts:
      return nn.Dense(1, name="out")(x)
    score = nn.Dense(1, use_bias=False, name="score")(x)
    init = jnp.asarray(self.init_thresholds, jnp.float32)
    thresholds = self.param("thresholds", lambda _: init)
    return score + thresholds[None, :]


@dataclasses.dataclass(frozen=True)
class AuxPlan:
  weight: float
  kind: str
  head: AuxHead
  levels: tuple   # sorted distinct training values
  input_dim: int

  @property
  def key(self) -> tuple:
    """What must agree between the replicas of one sweep program."""
    return (self.weight, self.kind, tuple(self.head.hidden), self.levels, self.input_dim)


def make_plan(config, data, model) -> AuxPlan | None:
  """The aux objective of `config.train.aux_rating`, or None when it is off (weight 0)."""
  cfg = config.train.get("aux_rating", None)
  weight = float(cfg.get("weight", 0.0)) if cfg is not None else 0.0
  if weight == 0.0:
    return None
  if not weight > 0:
    raise ConfigError(f"train.aux_rating.weight={weight}: expected >= 0 (0 = off)")
  kind = cfg.get("kind", "regression")
  if kind not in KINDS:
    raise ConfigError(f"train.aux_rating.kind={kind!r}: expected one of {KINDS}")
  if config.privacy.enabled:
    raise ConfigError("train.aux_rating is not supported with privacy.enabled (the private "
                      "step clips one loss per example); set --config.train.aux_rating.weight=0")
  # Rows to train on carry the raw values; rows to score (predict, export) do not, and the
  # head's shape then comes from the training levels the transform recorded.
  train_values = None
  if "feedback" in data.arrays:
    train_values = np.asarray(data.arrays["feedback"][np.asarray(data.splits["train"])])
    levels = tuple(float(v) for v in np.unique(train_values))
  elif data.transform.state.get("feedback_levels"):
    levels = tuple(float(v) for v in data.transform.state["feedback_levels"])
  else:
    raise ConfigError(
        "train.aux_rating needs the raw label values, but this prepared data has no "
        f"'feedback' column ({data.path or 'rows given'}): prepare it with "
        f"train.aux_rating.weight > 0 (the label field data.label.field="
        f"'{config.data.label.field}' must be numeric, e.g. MovieLens stars), or set "
        "--config.train.aux_rating.weight=0")
  if len(levels) < 2:
    raise ConfigError(f"train.aux_rating: the training rows' feedback holds one value "
                      f"{levels}; nothing to predict")
  hidden = tuple(int(h) for h in cfg.get("hidden", (64,)))
  cuts, init = 0, ()
  if kind == "ordinal":
    if len(levels) > MAX_LEVELS:
      raise ConfigError(f"train.aux_rating.kind='ordinal': the feedback has {len(levels)} "
                        f"distinct values (at most {MAX_LEVELS}); use kind='regression'")
    cuts = len(levels) - 1
    # Thresholds start at the training marginals' logits: P(r > level_k) (zeros where only
    # the shape matters: a restored run).
    above = (np.array([(train_values > v).mean() for v in levels[:-1]])
             if train_values is not None else np.full(cuts, 0.5))
    above = np.clip(above, 1e-4, 1 - 1e-4)
    init = tuple(float(v) for v in np.log(above / (1 - above)))
  base = data_schema(model.schema)
  n_slots = len(base.sparse) + len(base.multi)
  n_dense = int(np.asarray(data.arrays["dense"]).shape[1])
  input_dim = n_slots * int(model.embed_dim) + n_dense
  return AuxPlan(weight, kind, AuxHead(hidden, cuts, init), levels, input_dim)


def plan_key(setup) -> tuple | None:
  """What a sweep's replicas must share of their aux objective (None: off)."""
  return None if setup.aux is None else setup.aux.key


def init_head(plan: AuxPlan, rng) -> dict:
  return plan.head.init(rng, jnp.zeros((1, plan.input_dim), jnp.float32))["params"]


def with_head(plan: AuxPlan | None, variables: dict, rng) -> dict:
  """Model variables with the head's params added (unchanged when the plan is None)."""
  if plan is None:
    return variables
  params = {**variables["params"], AUX_KEY: init_head(plan, jax.random.fold_in(rng, 0xA0))}
  return {**variables, "params": params}


def model_params(params: dict) -> dict:
  """The model's own params (without the aux head)."""
  if AUX_KEY not in params:
    return params
  return {k: v for k, v in params.items() if k != AUX_KEY}


def is_embedding(module, method_name: str) -> bool:
  """capture_intermediates filter: the output of the model's embedding collection."""
  return isinstance(module, EmbeddingCollection) and method_name == "__call__"


def captured_embeddings(intermediates: dict) -> jax.Array:
  """[B, F, E] from the captured 'intermediates' (the root model's 'embedding' child)."""
  got = intermediates.get("embedding", {}).get("__call__")
  if not got:
    raise ConfigError("train.aux_rating: the model did not embed its inputs through the "
                      "'embedding' module (models/embedding.py embed_batch); it cannot "
                      "take the auxiliary head")
  out = got[0]
  return out[0] if isinstance(out, tuple) else out  # (embeddings, history rows)


def loss(plan: AuxPlan, head_params, emb: jax.Array, batch: dict) -> jax.Array:
  """Weighted mean aux loss of a batch (rows with weight 0, i.e. padding, do not count)."""
  if "feedback" not in batch:
    raise ConfigError("train.aux_rating: the rows being trained on carry no raw label values "
                      "(the 'feedback' column); train with --config.train.aux_rating.weight=0")
  x = jnp.concatenate([emb.reshape(emb.shape[0], -1).astype(jnp.float32),
                       batch["dense"].astype(jnp.float32)], axis=1)
  out = plan.head.apply({"params": head_params}, x).astype(jnp.float32)
  value = batch["feedback"].astype(jnp.float32)
  weight = batch["weight"]
  if plan.kind == "regression":
    lo, hi = plan.levels[0], plan.levels[-1]
    target = (value - (lo + hi) / 2) / ((hi - lo) / 2)
    per_row = jnp.square(out[:, 0] - target)
  else:
    cuts = jnp.asarray(plan.levels[:-1], jnp.float32)
    above = (value[:, None] > cuts[None, :]).astype(jnp.float32)
    per_row = jnp.mean(optax.sigmoid_binary_cross_entropy(out, above), axis=1)
  return jnp.sum(per_row * weight) / jnp.maximum(jnp.sum(weight), 1.0)
