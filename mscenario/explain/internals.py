"""What a model's scenario machinery does, read from its own computation.

  gates: MMoE / PLE softmax gate weights per row (the 'gates' submodules' outputs, captured
         with Flax's capture_intermediates; the models are not changed) -> mean gate per
         expert x scenario.
  STAR:  the logit with the scenario-specific factors at identity (scenario kernels and
         norm scales 1, scenario biases 0, scenario context at its traffic-weighted mean:
         the shared network alone) next to the full logit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mscenario.explain.integrated import set_paths
from mscenario.models.fusion import route_scenarios

IDENTITY_ONES = ("scenario_kernel", "scenario_scale", "star_scenario_kernel")
IDENTITY_ZEROS = ("scenario_bias", "star_scenario_bias")


def _names(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)


def make_gate_fn(model):
  """Jitted (params, model_state, batch) -> {gate name: softmax weights [B, S, E]} for every
  submodule named 'gates' ({} when the model has none)."""
  @jax.jit
  def gates(params, model_state, batch):
    batch = route_scenarios(model, batch)
    b, s = batch["scenario"].shape[0], model.schema.num_scenarios
    _, inter = model.apply({"params": params, **model_state}, batch, train=False,
                           capture_intermediates=lambda mdl, _: mdl.name == "gates",
                           mutable=["intermediates"])
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(inter.get("intermediates", {})):
      names = [n for n in _names(path) if isinstance(n, str)]
      if "gates" not in names or leaf.ndim != 3:
        continue
      if leaf.shape[:2] == (s, b) and b != s:  # scenario-major layout
        leaf = jnp.transpose(leaf, (1, 0, 2))
      if leaf.shape[:2] != (b, s):
        continue
      out["/".join(names[: names.index("gates") + 1])] = jax.nn.softmax(
          leaf.astype(jnp.float32), axis=-1)
    return out
  return gates


def expert_labels(model, num: int) -> list[str]:
  """Names of a gate's experts: PLE's own (scenario-specific) experts come first."""
  k = getattr(model, "specific_experts", None)
  if k is not None and getattr(model, "shared_experts", None) is not None and num == (
      k + model.shared_experts):
    return [f"own_{j}" for j in range(k)] + [f"shared_{j}" for j in range(num - k)]
  return [f"expert_{j}" for j in range(num)]


def identity_params(params, context_baseline: dict):
  """STAR-style params with the scenario-specific factors at identity (None: the model has
  none), the scenario context at its baseline."""
  found = False
  replace = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = _names(path)
    if names[-1] in IDENTITY_ONES:
      replace[names], found = jnp.ones_like(leaf), True
    elif names[-1] in IDENTITY_ZEROS:
      replace[names], found = jnp.zeros_like(leaf), True
  if not found:
    return None
  for p, v in context_baseline.items():
    replace[p] = jnp.broadcast_to(jnp.asarray(v)[None], np.shape(_get(params, p)))
  return set_paths(params, replace)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree
