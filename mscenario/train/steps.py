"""TrainState and the pure train / eval steps (jitted by the loop with explicit shardings)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  model_state: Any      # non-trainable collections, e.g. STAR's per-scenario batch_stats
  opt_state: Any
  rng: jax.Array        # raw uint32 key; dropout keys are fold_in(rng, step)


def weighted_bce(logits: jax.Array, labels: jax.Array, weight: jax.Array) -> jax.Array:
  per_row = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels)
  return jnp.sum(per_row * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def make_train_step(model, tx):
  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    mutable = list(state.model_state.keys())

    def loss_fn(params):
      variables = {"params": params, **state.model_state}
      if mutable:
        logits, new_model_state = model.apply(variables, batch, train=True,
                                              rngs={"dropout": dropout_rng}, mutable=mutable)
      else:
        logits = model.apply(variables, batch, train=True, rngs={"dropout": dropout_rng})
        new_model_state = state.model_state
      return weighted_bce(logits, batch["label"], batch["weight"]), new_model_state

    (loss, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=new_model_state)
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  return train_step


def make_eval_step(model):
  def eval_step(params, model_state, batch: dict) -> jax.Array:
    logits = model.apply({"params": params, **model_state}, batch, train=False)
    return jax.nn.sigmoid(logits.astype(jnp.float32))

  return eval_step
