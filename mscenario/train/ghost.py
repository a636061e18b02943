"""Per-unit gradient norms for DP-SGD without per-unit gradients of the linear layers
("ghost norms").

A unit's gradient of a linear layer y = x W + b is sum_t x_t (x) g_t over the unit's rows
and tokens t (g_t = dloss/dy_t). Its squared Frobenius norm is
sum_{t,t'} (x_t . x_t') (g_t . g_t'): for one row per unit simply |x|^2 |g|^2, computed from
the layer's input and output gradient without forming the [in, out] matrix per unit
(Goodfellow 2015; Li et al., "Large Language Models Can Be Strong Differentially Private
Learners", ICLR 2022; paxml's ghostnorm layers). Materialising per-unit gradients instead is
what made the private step 10-20x the ordinary one: their memory traffic, not arithmetic.

No model needs hooks: every `nn.Dense` and `StackedDense` call is intercepted
(`flax.linen.intercept_methods`); its input is recorded (`sow`) and a zero perturbation is
added to its output (`perturb`), whose gradient is g. Parameters outside those layers
(normalisation scales, scenario tables, STAR's shared and scenario kernels, ...) keep exact
per-unit gradients from `jax.vmap`, which is cheap where they are small; so the norm is
exact for every model, and the two agree to float tolerance (tests/test_privacy.py).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from mscenario.models.layers import StackedDense
from mscenario.models.star import StarLayer

INPUTS = "ghost_inputs"
OUTPUTS = "ghost_outputs"


def _kind(module, method: str, args, kwargs) -> str | None:
  """The ghost rule of a call: 'dense' (nn.Dense), 'copies0' / 'copies1' (StackedDense, the
  copy axis), 'star' (StarLayer.matmul, shared (x) scenario kernels); None = not covered."""
  if method == "__call__" and isinstance(module, nn.Dense):
    return "dense"
  if method == "__call__" and isinstance(module, StackedDense):
    return f"copies{args[1] if len(args) > 1 else kwargs.get('copy_axis', 0)}"
  if method == "matmul" and isinstance(module, StarLayer):
    return "star"
  return None


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  kind = _kind(module, context.method_name, args, kwargs)
  if kind is None or module.scope is None or not module.is_mutable_collection(INPUTS):
    return next_fun(*args, **kwargs)
  y = next_fun(*args, **kwargs)
  name = f"x_{kind}"
  calls = len(module.scope.get_variable(INPUTS, name)) if module.scope.has_variable(
      INPUTS, name) else 0
  module.sow(INPUTS, name, args[0])
  return module.perturb(f"y_{kind}{calls}", y, collection=OUTPUTS)


def apply(model, variables, batch, *, rngs, perturbations=None):
  """model.apply in training mode recording every linear layer's inputs: returns (logits,
  {path: ((x, copy_axis), ...)}). With `perturbations` (the OUTPUTS tree) they are added to
  the layers' outputs; without, zeros are created (the shapes for a first call)."""
  mutable = [INPUTS] if perturbations is not None else [INPUTS, OUTPUTS]
  extra = {OUTPUTS: perturbations} if perturbations is not None else {}
  with nn.intercept_methods(_interceptor):
    logits, coll = model.apply({**variables, **extra}, batch, train=True, rngs=rngs,
                               mutable=mutable)
  return logits, coll


PARAMS = {"star": ("kernel", "bias", "scenario_kernel", "scenario_bias")}


def covered_params(inputs_tree) -> set:
  """Flat param paths whose norms come from ghost norms: those of every recorded layer."""
  out = set()
  for path in traverse_util.flatten_dict(inputs_tree):
    kind = path[-1][len("x_"):]
    out.update(path[:-1] + (name,) for name in PARAMS.get(kind, ("kernel", "bias")))
  return out


def _gram_sq(x, g):
  """|sum_t x_t (x) g_t|^2 for x [T, I], g [T, O] (and the bias part |sum_t g_t|^2)."""
  if x.shape[0] == 1:
    kernel = jnp.sum(x * x) * jnp.sum(g * g)
  elif x.shape[0] ** 2 * (x.shape[1] + g.shape[1]) <= x.shape[0] * x.shape[1] * g.shape[1]:
    kernel = jnp.sum((x @ x.T) * (g @ g.T))
  else:
    kernel = jnp.sum((x.T @ g) ** 2)
  s = jnp.sum(g, axis=0)
  return kernel, jnp.sum(s * s)


def _as_tokens(x, g, kind: str):
  """One call's unit input/output gradient as tokens: nn.Dense -> x [T, I], g [T, O];
  StackedDense and StarLayer -> x [n, T, I], g [n, T, O] (copies / scenarios first; a
  shared input x [T, I] is the same for every copy)."""
  x, g = x.astype(jnp.float32), g.astype(jnp.float32)
  if kind == "dense":
    return x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  copy_axis = 0 if kind == "star" else int(kind[len("copies"):])
  axis = copy_axis if x.ndim > 2 else 1  # a shared input [T, I] gives [T, n, O]
  g = jnp.moveaxis(g, axis, 0)
  n = g.shape[0]
  g = g.reshape(n, -1, g.shape[-1])
  if x.ndim == 2:
    x = jnp.broadcast_to(x[None], (n,) + x.shape)
  else:
    x = jnp.moveaxis(x, copy_axis, 0).reshape(n, -1, x.shape[-1])
  return x, g


def _star_sq(x, g, kernel, scenario_kernel):
  """Squared norms of one unit's gradients of STAR's W (used as W * W_s by every scenario
  s), of W_s, b and b_s, from x [S, T, I], g [S, T, O]. With one row (T = 1) the kernel
  parts are bilinear forms, sum_{s,s'} (x_s*x_s')^T (W_s*W_s') (g_s*g_s') and
  sum_s (x_s^2)^T (W^2) (g_s^2), never an [I, O] matrix per unit; with several rows the
  per-scenario sums M_s = sum_t x_st (x) g_st are formed (the unit's rows may have different
  scenarios)."""
  if x.shape[1] == 1:
    x1, g1 = x[:, 0], g[:, 0]
    pair_x = x1[:, None] * x1[None]                           # [S, S, I]
    pair_g = g1[:, None] * g1[None]                           # [S, S, O]
    pair_w = scenario_kernel[:, None] * scenario_kernel[None]  # [S, S, I, O]
    shared = jnp.einsum("abi,abio,abo->", pair_x, pair_w, pair_g)
    own = jnp.einsum("si,io,so->", x1 * x1, kernel * kernel, g1 * g1)
  else:
    m = jnp.einsum("sti,sto->sio", x, g)
    shared = jnp.sum(jnp.sum(scenario_kernel * m, axis=0) ** 2)
    own = jnp.sum((kernel[None] * m) ** 2)
  per_scenario_bias = jnp.sum(g, axis=1)                      # [S, O]
  return (shared + own + jnp.sum(jnp.sum(per_scenario_bias, axis=0) ** 2)
          + jnp.sum(per_scenario_bias ** 2))


def ghost_sq_norm(inputs_tree, output_grads, params_flat) -> jax.Array:
  """One unit's squared gradient norm over the params of every recorded layer. Calls of one
  layer share its params: their tokens are concatenated, so the norm is that of the summed
  gradient."""
  total = jnp.float32(0.0)
  grads_flat = traverse_util.flatten_dict(output_grads)
  for path, calls in traverse_util.flatten_dict(inputs_tree).items():
    module, kind = path[:-1], path[-1][len("x_"):]
    pairs = [_as_tokens(x, grads_flat[module + (f"y_{kind}{i}",)], kind)
             for i, x in enumerate(calls)]
    x = jnp.concatenate([a for a, _ in pairs], axis=-2)
    g = jnp.concatenate([b for _, b in pairs], axis=-2)
    if kind == "star":
      total = total + _star_sq(x, g, params_flat[module + ("kernel",)],
                               params_flat[module + ("scenario_kernel",)])
      continue
    has_bias = module + ("bias",) in params_flat
    if x.ndim == 2:
      k, b = _gram_sq(x, g)
    else:
      k, b = jax.vmap(_gram_sq)(x, g)
      k, b = jnp.sum(k), jnp.sum(b)
    total = total + k + (b if has_bias else 0.0)
  return total
