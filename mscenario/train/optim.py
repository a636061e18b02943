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


SCHEDULES = ("constant", "cosine")


def total_steps(train_cfg, steps_per_epoch: int) -> int:
  """The step count a decay schedule spans: train.lr_decay_steps, or (0) epochs x steps per
  epoch -- the configured run, not where early stopping ends it, so the rate is a pure
  function of the global step and a resumed run (same config) follows the same curve."""
  explicit = int(train_cfg.get("lr_decay_steps", 0))
  return explicit if explicit > 0 else int(train_cfg.epochs) * int(steps_per_epoch)


def schedule(lr: float, train_cfg, steps: int = 0):
  """Learning rate as a function of the optimizer's step count (kept in its state, so it is
  checkpointed): linear warm-up over train.warmup_steps, then train.lr_schedule --
  'constant', or 'cosine' from `lr` down to lr * train.lr_end_fraction at step `steps`
  (held there after; a `mscenario update` continuing past it trains at that floor)."""
  warmup = int(train_cfg.warmup_steps)
  kind = train_cfg.get("lr_schedule", "constant")
  if kind == "constant":
    return optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else lr
  if kind not in SCHEDULES:
    raise ConfigError(f"train.lr_schedule={kind!r}: expected one of {', '.join(SCHEDULES)}")
  if steps <= warmup:
    raise ConfigError(f"train.lr_schedule={kind!r} decays over {steps} steps, not more than "
                      f"train.warmup_steps={warmup}: raise train.epochs or set "
                      "train.lr_decay_steps")
  end = lr * float(train_cfg.get("lr_end_fraction", 0.0))
  return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, steps, end)


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


def make_optimizer(train_cfg, params, clip: bool = True,
                   steps: int = 0) -> optax.GradientTransformation:
  """`params`: the (abstract) params tree; labels are fixed from it up front (a concrete
  labels tree, unlike a callable, lets optax.tree_map_params map shardings onto the state).
  `steps`: the span of a decaying train.lr_schedule (`total_steps`)."""
  dense = _make(train_cfg.optimizer, schedule(train_cfg.learning_rate, train_cfg, steps),
                train_cfg.weight_decay)
  if train_cfg.embed_optimizer == "same":
    embed = _make(train_cfg.optimizer, schedule(train_cfg.learning_rate, train_cfg, steps),
                  train_cfg.weight_decay)
  else:
    embed = _make(train_cfg.embed_optimizer,
                  schedule(train_cfg.embed_learning_rate, train_cfg, steps),
                  train_cfg.embed_weight_decay)
  tx = optax.multi_transform({"dense": dense, "embed": embed}, param_labels(params))
  if clip and train_cfg.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip_norm), tx)
  return tx
