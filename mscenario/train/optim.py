"""Optax optimizers: one for dense layers, one (possibly different) for embedding tables.

Embedding rows see sparse, bursty gradients; recommender practice gives them their own
optimizer and learning rate (Adagrad is the classic choice), so the two are separated with
`optax.multi_transform` keyed on the `embedding` subtree of the params.
"""
from __future__ import annotations

import jax
import optax

from mscenario.errors import ConfigError

EMBED_SUBTREE = "embedding"


def _schedule(lr: float, warmup: int):
  if warmup > 0:
    return optax.linear_schedule(0.0, lr, warmup)
  return lr


def _make(name: str, lr, weight_decay: float) -> optax.GradientTransformation:
  if name == "adamw":
    return optax.adamw(lr, weight_decay=weight_decay)
  if name == "adam":
    tx = optax.adam(lr)
    return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx
  if name == "adagrad":
    tx = optax.adagrad(lr, initial_accumulator_value=0.1)
    return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx
  if name == "sgd":
    tx = optax.sgd(lr)
    return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx
  raise ConfigError(f"optimizer {name!r}: expected adamw, adam, adagrad or sgd")


def param_labels(params):
  """'embed' for everything under params['embedding'], 'dense' for the rest."""
  return {k: jax.tree_util.tree_map(lambda _: "embed" if k == EMBED_SUBTREE else "dense", v)
          for k, v in params.items()}


def make_optimizer(train_cfg, params, clip: bool = True) -> optax.GradientTransformation:
  """`params`: the (abstract) params tree; labels are fixed from it up front (a concrete
  labels tree, unlike a callable, lets optax.tree_map_params map shardings onto the state)."""
  dense = _make(train_cfg.optimizer, _schedule(train_cfg.learning_rate, train_cfg.warmup_steps),
                train_cfg.weight_decay)
  if train_cfg.embed_optimizer == "same":
    embed = _make(train_cfg.optimizer,
                  _schedule(train_cfg.learning_rate, train_cfg.warmup_steps),
                  train_cfg.weight_decay)
  else:
    embed = _make(train_cfg.embed_optimizer,
                  _schedule(train_cfg.embed_learning_rate, train_cfg.warmup_steps),
                  train_cfg.embed_weight_decay)
  tx = optax.multi_transform({"dense": dense, "embed": embed}, param_labels(params))
  if clip and train_cfg.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip_norm), tx)
  return tx
