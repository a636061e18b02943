"""Integrated gradients of the model's logit w.r.t. each feature's input, batched and jitted.

  IG_g(x) = sum_k w_k  grad_g f(x' + a_k (x - x')) . (x_g - x'_g)

with midpoint-Riemann nodes a_k = (k + 1/2) / K, w_k = 1/K (default; 'gauss' = Gauss-Legendre).
ReLU networks have a piecewise-constant gradient along the path, where Gauss-Legendre's
spectral accuracy does not apply and evenly spaced points did slightly better (measured).
Path points run as a vmap over POINTS_PER_CALL points inside a lax.scan, all in one jit, so
memory stays B x POINTS_PER_CALL whatever the number of steps. Embedding and dense inputs get their gradients from one reverse pass
(rows are independent in eval mode, so the gradient of sum(logits) w.r.t. row b's inputs is
row b's own); a scenario-context PARAM is shared by the batch, so its term is the
directional derivative along (context - baseline), one forward-mode jvp, which is per row.

The model sees interpolated embeddings through batch['embedding_rows'] (the hook the
trainer's sparse-update path uses), so the models need no change.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mscenario.explain.baseline import get_path
from mscenario.models.fusion import route_scenarios

DEFAULT_STEPS = 256
POINTS_PER_CALL = 32


def path_points(steps: int, rule: str = "midpoint") -> tuple[np.ndarray, np.ndarray]:
  """Quadrature nodes and weights on [0, 1] (weights sum to 1)."""
  if steps < 1:
    raise ValueError(f"steps={steps}: need at least 1 path point")
  if rule == "midpoint":
    return ((np.arange(steps) + 0.5) / steps).astype(np.float32), np.full(steps, 1.0 / steps, np.float32)
  x, w = np.polynomial.legendre.leggauss(steps)
  return ((x + 1.0) / 2.0).astype(np.float32), (w / 2.0).astype(np.float32)


def set_paths(tree: dict, values: dict) -> dict:
  """Copy of the nested dict `tree` with leaves at `values`' paths replaced."""
  tree = dict(tree)
  for path, v in values.items():
    node = tree
    for k in path[:-1]:
      node[k] = dict(node[k])
      node = node[k]
    node[path[-1]] = v
  return tree


def make_logits_fn(model) -> Callable:
  """(params, model_state, batch) -> logits [B], eval mode (the trainer's _apply, inlined)."""
  def logits(params, model_state, batch):
    batch = route_scenarios(model, batch)
    return model.apply({"params": params, **model_state}, batch,
                       train=False).astype(jnp.float32)
  return logits


def make_ig(model, onehot: np.ndarray, context_paths: list, steps: int = DEFAULT_STEPS,
            rule: str = "midpoint"):
  """Jitted (params, model_state, batch, rows, base_rows, base_dense, base_ctx) ->
  (attributions [B, G], logit [B], baseline logit [B]).

  rows [B, R, E]: the row's gathered embeddings; base_rows [R, E]; base_dense [D];
  base_ctx {path: [E]}. G = row groups (onehot [R, G_rows]), dense columns, then one
  context group when `context_paths` is non-empty.
  """
  alphas, weights = path_points(steps, rule)
  per_call = min(POINTS_PER_CALL, steps)
  pad = -steps % per_call  # zero-weight padding points keep the chunks equal
  alphas = np.concatenate([alphas, np.full(pad, 0.5, np.float32)]).reshape(-1, per_call)
  weights = np.concatenate([weights, np.zeros(pad, np.float32)]).reshape(-1, per_call)
  logits_fn = make_logits_fn(model)
  onehot = jnp.asarray(onehot)

  @jax.jit
  def ig(params, model_state, batch, rows, base_rows, base_dense, base_ctx):
    rows = rows.astype(jnp.float32)
    dense = batch["dense"].astype(jnp.float32)
    d_rows = rows - base_rows[None]
    d_dense = dense - base_dense[None]
    full_ctx = {p: get_path(params, p) for p in context_paths}
    d_ctx = {p: full_ctx[p] - base_ctx[p][None] for p in context_paths}

    def f(r, d, ctx):
      return logits_fn(set_paths(params, ctx), model_state,
                       {**batch, "embedding_rows": r, "dense": d})

    def point(a):
      r = base_rows[None] + a * d_rows
      d = base_dense[None] + a * d_dense
      ctx = {p: base_ctx[p][None] + a * d_ctx[p] for p in context_paths}
      out, vjp = jax.vjp(lambda r, d: f(r, d, ctx), r, d)
      g_rows, g_dense = vjp(jnp.ones_like(out))
      parts = [jnp.einsum("bre,bre->br", g_rows, d_rows) @ onehot, g_dense * d_dense]
      if context_paths:
        _, dir_deriv = jax.jvp(lambda c: f(r, d, c), (ctx,), (d_ctx,))
        parts.append(dir_deriv[:, None])
      return jnp.concatenate(parts, axis=1)

    def chunk(total, aw):
      a, w = aw
      return total + jnp.tensordot(w, jax.vmap(point)(a), axes=1), None  # [c, B, G] -> [B, G]

    width = onehot.shape[1] + dense.shape[1] + (1 if context_paths else 0)
    attr, _ = jax.lax.scan(chunk, jnp.zeros((rows.shape[0], width), jnp.float32),
                           (jnp.asarray(alphas), jnp.asarray(weights)))
    logit = f(rows, dense, full_ctx)
    base_logit = f(jnp.broadcast_to(base_rows[None], rows.shape),
                   jnp.broadcast_to(base_dense[None], dense.shape),
                   {p: jnp.broadcast_to(base_ctx[p][None], full_ctx[p].shape)
                    for p in context_paths})
    return attr, logit, base_logit

  return ig
