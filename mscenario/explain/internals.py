"""What a model's scenario machinery does, read from its own computation.

  gates: MMoE / PLE softmax gate weights per row (the 'gates' submodules' outputs, captured
         with Flax's capture_intermediates; the models are not changed) -> mean gate per
         expert x scenario.
  STAR:  the logit with the scenario-specific factors at identity (scenario kernels and
         norm scales 1, scenario biases 0, scenario context at its traffic-weighted mean:
         the shared network alone) next to the full logit.
  input gates: PEPNet's EPNet gate ('ep_gate') and AdaSparse's input pruner ('pruner_0')
         scale every column of x = concat(flatten(embeddings), dense); their per-row outputs
         (captured) -> mean gate per feature x scenario. Hidden-layer gates (PEPNet
         'pp_gate_<l>', AdaSparse 'pruner_<l>') -> mean gate and fraction cut to exactly 0
         (AdaSparse's learned sparsity) per layer x scenario.
  M2M:   the scenario-generated weights of each meta unit (MetaWeights outputs [S, in, out],
         captured) -> their norm per scenario, and the scenario representations.
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


INPUT_GATES = ("ep_gate", "pruner_0")
LAYER_GATE_PREFIXES = ("pp_gate_", "pruner_")
META_UNITS = ("meta_attention", "meta_tower_")
SCENARIO_REPS = ("scenario_mlp", "task_mlp")


def _wanted(name) -> bool:
  return isinstance(name, str) and (name in INPUT_GATES or name in SCENARIO_REPS or any(
      name.startswith(p) for p in LAYER_GATE_PREFIXES + META_UNITS))


def make_capture_fn(model):
  """Jitted (params, model_state, batch) -> {module path: output} of the gate, pruner,
  meta-unit and scenario-representation submodules above ({} when the model has none).
  Outputs are as the module returned them (MetaWeights: (kernel, bias))."""
  @jax.jit
  def capture(params, model_state, batch):
    batch = route_scenarios(model, batch)
    _, inter = model.apply({"params": params, **model_state}, batch, train=False,
                           capture_intermediates=lambda mdl, _: _wanted(mdl.name),
                           mutable=["intermediates"])
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(
        inter.get("intermediates", {}), is_leaf=lambda x: isinstance(x, tuple))[0]
    for path, leaf in flat:
      names = [n for n in _names(path) if isinstance(n, str)]
      if names and names[-1] == "__call__":
        names = names[:-1]
      if not names or not _wanted(names[-1]):
        continue
      value = leaf[0] if isinstance(leaf, tuple) and len(leaf) == 1 else leaf
      out["/".join(names)] = value
    return out
  return capture


def input_columns(model, width: int) -> list[str] | None:
  """The feature each column of x = concat(flatten(embeddings), dense) belongs to (None when
  `width` does not match the model's fields)."""
  schema = model.schema
  fields = [f.name for f in (*schema.sparse, *schema.multi)]
  e = model.embed_dim
  base = getattr(schema, "base", schema)
  dense = list(getattr(base, "dense", ()))
  extra = width - len(fields) * e - len(dense)
  if extra < 0:
    return None
  return ([f for f in fields for _ in range(e)] + dense
          + [f"dense_extra_{k}" for k in range(extra)])


def per_feature(values: np.ndarray, columns: list[str]) -> tuple[list[str], np.ndarray]:
  """[..., W] column values -> (feature names, [..., F] mean over each feature's columns)."""
  names = list(dict.fromkeys(columns))
  cols = np.asarray(columns)
  return names, np.stack([values[..., cols == n].mean(axis=-1) for n in names], axis=-1)


def neutral_gate(model) -> float:
  """The gate value that leaves a column unchanged at initialisation (gamma/2 or beta/2:
  sigmoid(0) times the gate's scale); profiles are read as deviations from it."""
  scale = getattr(model, "gate_gamma", None) or getattr(model, "pruner_beta", None) or 2.0
  return float(scale) / 2.0


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
