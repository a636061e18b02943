"""The model zoo (PEPNet, M2M, AdaSparse, SAR-Net, M3oE): shapes, gradients, and that the
scenario-specific parts really are used and only ever touch their own scenario's rows."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mscenario.data.schema import FeatureSchema, SparseFeature
from mscenario.errors import ConfigError
from mscenario.models import available_models, build_model
from mscenario.models.adasparse import Pruner
from mscenario.models.m2m import take_scenario
from tests.test_models import SCHEMA, make_batch, model_cfg

ZOO = ("pepnet", "m2m", "adasparse", "sarnet", "m3oe")
OVERRIDES = {"sarnet": {"specific_experts": 2}}  # two private experts per scenario


def _cfg(name, **overrides):
  return model_cfg(name, **{"dropout": 0.1, **OVERRIDES.get(name, {}), **overrides})


@functools.lru_cache(maxsize=None)
def _model(name):
  return build_model(_cfg(name), SCHEMA)


@functools.lru_cache(maxsize=None)
def _apply(name, train=False):
  """One jitted forward per (model, mode): the tests reuse it across parameter sets."""
  model = _model(name)
  if train:
    rngs = {"dropout": jax.random.PRNGKey(3)}  # the same masks in every call
    return jax.jit(lambda v, b: model.apply(v, b, train=True, rngs=rngs,
                                            mutable=["batch_stats"])[0])
  return jax.jit(lambda v, b: model.apply(v, b, train=False))


def _batch():
  """48 rows; rows 0-2 are one row under scenarios 0, 1, 2 (all other fields equal)."""
  batch = make_batch(b=48)
  batch = {k: v.at[1:3].set(v[0]) for k, v in batch.items()}
  batch["scenario"] = batch["scenario"].at[:3].set(jnp.arange(3, dtype=jnp.int32))
  return batch


@functools.lru_cache(maxsize=None)
def _variables(name):
  """Initial variables on `_batch()` (init is jitted: eager Flax tracing is slow)."""
  model = _model(name)
  init = jax.jit(lambda k, b: model.init(k, b, train=False))
  return nn.meta.unbox(init(jax.random.PRNGKey(0), _batch()))


def test_zoo_is_registered():
  assert set(ZOO) <= set(available_models())


@pytest.mark.parametrize("name", ZOO)
def test_shapes_finite_and_jit_grad_step(name):
  batch = _batch()
  model = _model(name)  # dropout=0.1: the train path with dropout is the one that runs
  variables = _variables(name)
  assert variables["params"]["embedding"]["table"].shape == (SCHEMA.table_rows, 4)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["params"]))
  state = {k: v for k, v in variables.items() if k != "params"}

  def loss(params):
    out, updates = model.apply({"params": params, **state}, batch, train=True,
                               rngs={"dropout": jax.random.PRNGKey(1)},
                               mutable=list(state))
    return jnp.mean(jax.nn.softplus(-out) * batch["label"]
                    + jax.nn.softplus(out) * (1 - batch["label"])), (out, updates)

  (value, (logits, updates)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      variables["params"])
  assert logits.shape == (48,) and logits.dtype == jnp.float32
  assert bool(jnp.isfinite(logits).all()) and bool(jnp.isfinite(value))
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  assert np.abs(np.asarray(grads["embedding"]["table"])).sum() > 0
  assert np.abs(np.asarray(grads["scenario_embedding" if name != "m3oe"
                                 else "star_scenario_bias"])).sum() > 0
  assert jax.tree.structure(updates) == jax.tree.structure(state)


@pytest.mark.parametrize("name", ZOO)
def test_scenario_id_changes_logits(name):
  logits = np.asarray(_apply(name)(_variables(name), _batch()))[:3]  # same row, 3 scenarios
  assert len(set(np.round(logits, 7).tolist())) == 3, logits


def _perturb_rows(params, path, scenario, width=1):
  """Random noise on rows [scenario*width, (scenario+1)*width) of every leaf under path."""
  def bump(x):
    rows = slice(scenario * width, (scenario + 1) * width)
    noise = jax.random.normal(jax.random.PRNGKey(7), x[rows].shape)
    return x.at[rows].add(0.5 * noise)
  out = dict(params)
  node = out
  for p in path[:-1]:
    node[p] = dict(node[p])
    node = node[p]
  node[path[-1]] = jax.tree.map(bump, node[path[-1]])
  return out


@pytest.mark.parametrize("name,path,width,train", [
    # Generated / gated models: the scenario's embedding row is its only private part.
    ("pepnet", ("scenario_embedding",), 1, False),
    ("m2m", ("scenario_embedding",), 1, False),
    ("adasparse", ("scenario_embedding",), 1, False),
    ("sarnet", ("scenario_embedding",), 1, False),
    ("sarnet", ("scenario_scale",), 1, False),
    ("sarnet", ("scenario_shift",), 1, False),
    ("sarnet", ("specific_experts",), 2, False),   # specific_experts=2 per scenario
    ("m3oe", ("star_scenario_kernel",), 1, True),  # LayerNorm only: holds in training too
    ("m3oe", ("star_scenario_bias",), 1, False),
    ("m3oe", ("gates",), 1, False),
    ("m3oe", ("towers",), 1, False),
])
def test_scenario_params_only_affect_their_scenario(name, path, width, train):
  batch = _batch()
  variables = _variables(name)
  params = _perturb_rows(variables["params"], path, scenario=1, width=width)
  run = _apply(name, train)
  before = np.asarray(run(variables, batch))
  after = np.asarray(run({**variables, "params": params}, batch))
  s = np.asarray(batch["scenario"])
  np.testing.assert_array_equal(before[s != 1], after[s != 1])
  assert np.abs(before[s == 1] - after[s == 1]).max() > 1e-4


def test_pepnet_gates_see_priors_but_do_not_train_embeddings_through_the_gate():
  model = _model("pepnet")
  assert model.prior_index().tolist() == [0, 1]             # user_id, item_id by name
  variables = _variables("pepnet")
  gate_params = variables["params"]["ep_gate"]
  # Gates start near 1 (gamma * sigmoid(~0)) so the network starts as a plain MLP.
  x = jnp.zeros((2, gate_params["Dense_0"]["kernel"].shape[0]))
  from mscenario.models.pepnet import GateNU
  g = GateNU(gate_params["Dense_1"]["kernel"].shape[1]).apply({"params": gate_params}, x)
  np.testing.assert_allclose(np.asarray(g), 1.0, atol=1e-6)
  # Fallback: without user_id / item_id names, the first two sparse features.
  schema = FeatureSchema(sparse=(SparseFeature("u", 9), SparseFeature("i", 9),
                                 SparseFeature("c", 5)), multi=(), dense=(),
                         scenario_names=("a", "b"))
  assert build_model(model_cfg("pepnet"), schema).prior_index().tolist() == [0, 1]
  with pytest.raises(ConfigError, match="prior_features"):
    build_model(model_cfg("pepnet", prior_features=("nope",)), SCHEMA)


def test_adasparse_pruner_cuts_small_factors_to_exact_zero():
  pruner = Pruner(6, alpha=1.0, beta=2.0, epsilon=0.5)
  scen = jnp.zeros((4, 2))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)) * 5, jnp.float32)
  variables = pruner.init(jax.random.PRNGKey(0), scen, x)
  pi = np.asarray(pruner.apply(variables, scen, x))
  assert pi.shape == (4, 6) and (pi >= 0).all() and (pi < 2).all()
  assert ((pi == 0) | (pi >= 0.5)).all() and (pi == 0).any()


def test_take_scenario_picks_each_rows_slice():
  values = jnp.arange(3 * 4 * 2, dtype=jnp.float32).reshape(3, 4, 2)
  out = np.asarray(take_scenario(values, jnp.asarray([2, 0, 1, 2])))
  np.testing.assert_array_equal(out, np.asarray(values)[[2, 0, 1, 2], np.arange(4)])


@pytest.mark.parametrize("name", ZOO)
def test_bfloat16_and_empty_feature_groups(name):
  batch = _batch()
  model = build_model(_cfg(name, dtype="bfloat16"), SCHEMA)
  variables = _variables(name)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["params"]))
  bf16 = jax.jit(lambda v, b: model.apply(v, b, train=False))(variables, batch)
  assert bf16.dtype == jnp.float32 and bool(jnp.isfinite(bf16).all())
  f32 = _apply(name)(variables, batch)
  np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), atol=0.1)

  schema = FeatureSchema(sparse=(SparseFeature("item_id", 9),), multi=(), dense=(),
                         scenario_names=("a", "b"))
  small = {"sparse": jnp.ones((6, 1), jnp.int32), "multi": jnp.zeros((6, 0, 1), jnp.int32),
           "dense": jnp.zeros((6, 0), jnp.float32),
           "scenario": jnp.asarray([0, 1, 0, 1, 0, 1], jnp.int32)}
  m = build_model(model_cfg(name), schema)
  out = m.apply(nn.meta.unbox(m.init(jax.random.PRNGKey(0), small, train=False)), small,
                train=False)
  assert out.shape == (6,) and bool(jnp.isfinite(out).all())
