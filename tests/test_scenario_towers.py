"""ScenarioMLPs (each row through its own scenario's copy, rows packed by scenario) computes
what running each scenario's rows alone through StackedMLP and keeping that scenario's copy
computes: outputs, parameter gradients and BatchNorm statistics."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mscenario.models.layers import ScenarioMLPs, StackedMLP

N = 3


def _data(b=70, f=6, seed=0, counts=None):
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.normal(size=(b, f)), jnp.float32)
  if counts is None:
    s = r.integers(0, N, b)
  else:  # exact per-scenario counts (0 allowed), shuffled
    s = r.permutation(np.repeat(np.arange(N), counts))
  y = jnp.asarray(r.integers(0, 2, b), jnp.float32)
  return x, jnp.asarray(s, jnp.int32), y


def _reference(variables, x, s, train, args):
  """Per scenario: its rows alone through StackedMLP, copy s kept. Returns (out [B, 1],
  new batch_stats or None)."""
  ref = StackedMLP(N, *args)
  out = jnp.zeros((x.shape[0], 1), jnp.float32)
  stats = variables.get("batch_stats")
  new_stats = stats
  for k in range(N):
    rows = np.flatnonzero(np.asarray(s) == k)
    if rows.size == 0:
      continue
    if train and stats is not None:
      y, upd = ref.apply(variables, x[rows], train=True, mutable=["batch_stats"])
      new_stats = jax.tree.map(lambda new, cur: cur.at[k].set(new[k]), upd["batch_stats"],
                               new_stats)
    else:
      y = ref.apply(variables, x[rows], train=train)
    out = out.at[rows].set(y[:, k])
  return out, new_stats


@pytest.mark.parametrize("hidden,batch_norm,counts", [
    ((8, 5), True, (30, 0, 40)),       # an empty scenario keeps its running statistics
    ((8,), False, (1, 50, 19)),
])
def test_scenario_mlps_equal_per_scenario_stacked_mlp(hidden, batch_norm, counts):
  x, s, y = _data(counts=counts)
  args = (hidden, "relu", 0.0, "float32", batch_norm, 1)
  fast = ScenarioMLPs(N, *args)
  variables = fast.init(jax.random.PRNGKey(0), x, s)
  ref_vars = StackedMLP(N, *args).init(jax.random.PRNGKey(0), x)
  # Same tree and the same initial values: checkpoints of either layout load in the other.
  assert jax.tree.structure(variables) == jax.tree.structure(ref_vars)
  jax.tree.map(np.testing.assert_array_equal, variables, ref_vars)
  # Copies differ from one another, running statistics are not the init's.
  key = jax.random.PRNGKey(3)
  variables = jax.tree.map(lambda v: v + 0.3 * jax.random.uniform(key, v.shape), variables)

  for train in (False, True):
    kwargs = {"mutable": ["batch_stats"]} if train and batch_norm else {}
    got = fast.apply(variables, x, s, train=train, **kwargs)
    got, upd = (got if kwargs else (got, None))
    want, want_stats = _reference(variables, x, s, train, args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    if kwargs:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                           rtol=2e-5, atol=2e-6),
                   upd["batch_stats"], want_stats)

  def loss(fn, params):
    out = fn({**variables, "params": params})
    return jnp.mean(jax.nn.softplus(-out[:, 0]) * y + jax.nn.softplus(out[:, 0]) * (1 - y))

  def fast_fn(v):
    out = fast.apply(v, x, s, train=True, mutable=["batch_stats"] if batch_norm else False)
    return out[0] if batch_norm else out

  g_fast = jax.grad(lambda p: loss(fast_fn, p))(variables["params"])
  g_ref = jax.grad(lambda p: loss(lambda v: _reference(v, x, s, True, args)[0], p))(
      variables["params"])
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_fast), jax.tree.leaves(g_ref)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max() + 1e-12,
                               err_msg=jax.tree_util.keystr(path))


def test_mmoe_own_tower_rows_same_params_and_scenario_isolation():
  """MMoE with tower_rows='own' has the reference layout's parameters (a checkpoint of either
  loads in the other) and scenario s's tower moves only scenario s's rows, in training mode
  too (its BatchNorm statistics come from its own rows)."""
  from tests.test_models import SCHEMA, init, make_batch, model_cfg
  from mscenario.models import build_model
  from mscenario.errors import ConfigError
  batch = make_batch(b=48)
  own = build_model(model_cfg("mmoe", tower_rows="own"), SCHEMA)
  ref = build_model(model_cfg("mmoe"), SCHEMA)
  variables = init(own, batch)
  jax.tree.map(np.testing.assert_array_equal, variables, init(ref, batch))
  params = jax.tree.map(lambda v: v, variables["params"])
  params["towers"]["Dense_0"]["kernel"] = params["towers"]["Dense_0"]["kernel"].at[1].add(0.5)
  s = np.asarray(batch["scenario"])
  for train in (False, True):
    kw = {"mutable": ["batch_stats"]} if train else {}
    before = own.apply(variables, batch, train=train, **kw)
    after = own.apply({**variables, "params": params}, batch, train=train, **kw)
    before, after = (np.asarray(before[0]), np.asarray(after[0])) if train else (
        np.asarray(before), np.asarray(after))
    np.testing.assert_array_equal(before[s != 1], after[s != 1])
    assert np.abs(before[s == 1] - after[s == 1]).max() > 1e-4
  with pytest.raises(ConfigError, match="tower_rows"):
    build_model(model_cfg("mmoe", tower_rows="mine"), SCHEMA)
