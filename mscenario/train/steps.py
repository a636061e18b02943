"""TrainState and the pure train / eval steps (jitted by the loop with explicit shardings)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mscenario.data.schema import OOV_ID
from mscenario.models.embedding import batch_ids
from mscenario.models.fusion import route_scenarios
from mscenario.train import aux as aux_lib
from mscenario.train import sparse


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  model_state: Any      # non-trainable collections, e.g. batch-norm running statistics
  opt_state: Any
  rng: jax.Array        # raw uint32 key; dropout keys are fold_in(rng, step)
  embed: Any = None     # sparse-update mode: {'table': [R, E], 'opt': {...}}; else {}


def weighted_bce(logits: jax.Array, labels: jax.Array, weight: jax.Array) -> jax.Array:
  per_row = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels)
  return jnp.sum(per_row * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def drop_item_ids(batch: dict, rng: jax.Array, slot: int, rate: float) -> dict:
  """Replace known ids of sparse feature `slot` by OOV with probability `rate` (train only).

  Missing (PAD) stays missing; the text tables read batch['item'], which is untouched, so a
  text-fused model still sees the item's text when its id is dropped.
  """
  if rate <= 0.0 or slot < 0:
    return batch
  ids = batch["sparse"][:, slot]
  drop = jax.random.bernoulli(jax.random.fold_in(rng, 0x1D), rate, ids.shape)
  new = jnp.where(drop & (ids > OOV_ID), jnp.asarray(OOV_ID, ids.dtype), ids)
  return {**batch, "sparse": batch["sparse"].at[:, slot].set(new)}


def _apply(model, params, model_state, batch, train, rng):
  """Model forward; returns (logits, updated model_state).

  Only 'batch_stats' is mutable: other collections (the frozen 'text' tables) pass
  through unchanged, so training can never write to them.
  """
  batch = route_scenarios(model, batch)
  mutable = [k for k in model_state if k == "batch_stats"] if train else False
  variables = {"params": aux_lib.model_params(params), **model_state}
  if mutable:
    logits, new_state = model.apply(variables, batch, train=True, rngs={"dropout": rng},
                                    mutable=mutable)
    return logits, {**model_state, **new_state}
  rngs = {"dropout": rng} if rng is not None else None
  return model.apply(variables, batch, train=train, rngs=rngs), model_state


def _apply_with_embeddings(model, params, model_state, batch, rng):
  """Training forward that also returns the embedding collection's output [B, F, E] (for the
  aux head, train/aux.py): one pass, the embeddings captured on the way."""
  batch = route_scenarios(model, batch)
  mutable = [k for k in model_state if k == "batch_stats"] + ["intermediates"]
  variables = {"params": aux_lib.model_params(params), **model_state}
  logits, new_state = model.apply(variables, batch, train=True, rngs={"dropout": rng},
                                  mutable=mutable, capture_intermediates=aux_lib.is_embedding)
  emb = aux_lib.captured_embeddings(new_state.pop("intermediates"))
  return logits, {**model_state, **new_state}, emb


def _losses(model, params, model_state, batch, rng, aux):
  """(BCE + weight * aux loss, (model_state, {'aux_loss'})) of the aux objective."""
  logits, new_ms, emb = _apply_with_embeddings(model, params, model_state, batch, rng)
  main = weighted_bce(logits, batch["label"], batch["weight"])
  aux_loss = aux_lib.loss(aux, params[aux_lib.AUX_KEY], emb, batch)
  return main + aux.weight * aux_loss, (new_ms, {"aux_loss": aux_loss, "bce": main})


def make_train_step(model, tx, schema=None, embed_update: str = "dense",
                    embed_lr: float = 0.0, clip_norm: float = 0.0,
                    item_id_dropout: tuple[int, float] = (-1, 0.0), aux=None):
  """Pure step (state, batch) -> (state, metrics).

  item_id_dropout = (sparse slot of the item id, rate): see drop_item_ids.
  aux: a train/aux.py AuxPlan (BCE + weight * aux loss; metrics gain 'aux_loss' and 'bce'),
  or None: the plain BCE step.

  Dense mode: the table is a Flax param updated by `tx` like everything else. Sparse modes
  (see train/sparse.py): the table lives in `state.embed`, the model receives the gathered
  rows, and only those rows are updated; `clip_norm` then clips dense and row gradients
  together (in dense mode clipping is part of `tx`).
  """
  if embed_update == "dense":
    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
      rng = jax.random.fold_in(state.rng, state.step)
      batch = drop_item_ids(batch, rng, *item_id_dropout)

      def loss_fn(params):
        if aux is not None:
          return _losses(model, params, state.model_state, batch, rng, aux)
        logits, new_ms = _apply(model, params, state.model_state, batch, True, rng)
        return weighted_bce(logits, batch["label"], batch["weight"]), (new_ms, {})

      (loss, (new_ms, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      new_state = state.replace(step=state.step + 1,
                                params=optax.apply_updates(state.params, updates),
                                opt_state=opt_state, model_state=new_ms)
      return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **extra}
    return train_step

  sparse.check_kind(embed_update)

  def sparse_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    batch = drop_item_ids(batch, rng, *item_id_dropout)
    table = state.embed["table"]
    ids = batch_ids(schema, batch)
    uniq, inv = sparse.unique_rows(ids, table.shape[0])
    rows = sparse.gather(table, uniq)

    def loss_fn(params, rows):
      feed = {**batch, "embedding_rows": rows[inv]}
      if aux is not None:
        return _losses(model, params, state.model_state, feed, rng, aux)
      logits, new_ms = _apply(model, params, state.model_state, feed, True, rng)
      return weighted_bce(logits, batch["label"], batch["weight"]), (new_ms, {})

    (loss, (new_ms, extra)), (grads, row_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, rows)
    norm = optax.tree.norm((grads, row_grads))
    if clip_norm > 0:
      scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
      grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
      row_grads = row_grads * scale
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    table, embed_opt = sparse.apply_update(embed_update, table, state.embed["opt"], uniq,
                                           row_grads, embed_lr, state.step)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state, model_state=new_ms,
                              embed={"table": table, "opt": embed_opt})
    return new_state, {"loss": loss, "grad_norm": norm, **extra}

  return sparse_step


def make_eval_step(model, schema=None):
  """(params, model_state, embed, batch) -> probabilities [B]."""
  def eval_step(params, model_state, embed, batch: dict) -> jax.Array:
    if embed:
      ids = batch_ids(schema, batch)
      batch = {**batch, "embedding_rows": embed["table"].at[ids].get(mode="fill",
                                                                     fill_value=0)}
    logits, _ = _apply(model, params, model_state, batch, False, None)
    return jax.nn.sigmoid(logits.astype(jnp.float32))

  return eval_step
