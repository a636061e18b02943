"""Models: shapes, scenario-specific parts really used, embedding collection, STAR's
partitioned norm and grouped matmul, bf16."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mscenario.config import SHARED_MODEL_KEYS, base_config
from mscenario.data.schema import FeatureSchema, MultiFeature, SparseFeature
from mscenario.errors import ConfigError
from mscenario.models import available_models, build_model
from mscenario.models.embedding import EmbeddingCollection
from mscenario.models.layers import pack_by_scenario
from mscenario.models.seed import Seed
from mscenario.models.star import PartitionedNorm

MODELS = ("seed", "sharedbottom", "mmoe", "ple", "star")

SCHEMA = FeatureSchema(
    sparse=(SparseFeature("user_id", 50), SparseFeature("item_id", 40),
            SparseFeature("gender", 4)),
    multi=(MultiFeature("genres", 12, 3),),
    dense=("age", "price"),
    scenario_names=("young", "mid", "old"),
)


def make_batch(b=32, seed=0, scenario=None):
  r = np.random.default_rng(seed)
  sparse = np.stack([r.integers(0, f.vocab_size, b) for f in SCHEMA.sparse], 1)
  multi = r.integers(0, 12, (b, 1, 3))
  multi[: b // 4] = 0  # some rows with only padding
  if scenario is None:
    scenario = r.integers(0, SCHEMA.num_scenarios, b)
  return {
      "sparse": jnp.asarray(sparse, jnp.int32),
      "multi": jnp.asarray(multi, jnp.int32),
      "dense": jnp.asarray(r.normal(size=(b, SCHEMA.num_dense)), jnp.float32),
      "scenario": jnp.asarray(scenario, jnp.int32),
      "label": jnp.asarray(r.integers(0, 2, b), jnp.float32),
  }


SMALL = {"hidden": (16, 8), "expert_hidden": (8,), "tower_hidden": (4,), "aux_hidden": (8,)}


def model_cfg(name, **overrides):
  """c.model for `name` with small layers; overrides go to the shared keys or its subtree."""
  c = base_config().model
  c.name = name
  c.embed_dim = 4
  c.embed_init_std = 0.5  # visible embeddings, so every part of the model matters at init
  own = c[name] if name in c else {}
  for k, v in {**{k: v for k, v in SMALL.items() if k in own}, **overrides}.items():
    if k in SHARED_MODEL_KEYS:
      c[k] = v
    else:
      own[k] = v
  return c


def init(model, batch, seed=0):
  return nn.meta.unbox(model.init(jax.random.PRNGKey(seed), batch, train=False))


def test_registry_lists_all_models():
  zoo = {"pepnet", "m2m", "adasparse", "sarnet", "m3oe"}  # tests/test_models_zoo.py
  assert set(available_models()) == set(MODELS) | zoo


def test_unknown_model_and_bad_values_are_config_errors():
  with pytest.raises(ConfigError, match="unknown model"):
    build_model(model_cfg("nope"), SCHEMA)
  with pytest.raises(ConfigError, match="scenario_matmul"):
    build_model(model_cfg("star", scenario_matmul="sparse"), SCHEMA)
  with pytest.raises(ConfigError, match="unknown features"):
    build_model(model_cfg("seed", user_features=("nope",)), SCHEMA)
  model = build_model(model_cfg("sharedbottom", activation="wiggle"), SCHEMA)
  with pytest.raises(ConfigError, match="activation"):
    model.init(jax.random.PRNGKey(0), make_batch(), train=False)


@pytest.mark.parametrize("name", MODELS)
def test_shapes_finite_and_train_step(name):
  batch = make_batch()
  model = build_model(model_cfg(name, dropout=0.1), SCHEMA)
  variables = init(model, batch)
  assert variables["params"]["embedding"]["table"].shape == (SCHEMA.table_rows, 4)
  assert SCHEMA.table_rows % 256 == 0 and SCHEMA.table_rows >= SCHEMA.total_embedding_rows
  logits = model.apply(variables, batch, train=False)
  assert logits.shape == (32,) and logits.dtype == jnp.float32
  assert bool(jnp.isfinite(logits).all())

  def loss(params):
    out, updates = model.apply({**variables, "params": params}, batch, train=True,
                               rngs={"dropout": jax.random.PRNGKey(1)},
                               mutable=["batch_stats"])
    return jnp.mean(jax.nn.softplus(-out) * batch["label"]
                    + jax.nn.softplus(out) * (1 - batch["label"])), updates

  (value, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      variables["params"])
  assert bool(jnp.isfinite(value))
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  # The table gets gradient only on rows the batch used.
  table_grad = np.asarray(grads["embedding"]["table"])
  assert np.abs(table_grad).sum() > 0
  # Running statistics exist and move in training.
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])


@pytest.mark.parametrize("name", MODELS)
def test_scenario_id_changes_logits(name):
  one = make_batch(b=1)
  batch = jax.tree.map(lambda a: jnp.repeat(a, 3, axis=0), one)
  batch["scenario"] = jnp.arange(3, dtype=jnp.int32)
  model = build_model(model_cfg(name), SCHEMA)
  logits = np.asarray(model.apply(init(model, batch), batch, train=False))
  assert len(set(np.round(logits, 7).tolist())) == 3, logits


def _perturb_scenario(params, path, scenario, width=1):
  """Add noise to rows [scenario*width, (scenario+1)*width) of every leaf under path."""
  def bump(x):  # random, not constant: a constant shift of a gate is softmax-invariant
    rows = slice(scenario * width, (scenario + 1) * width)
    noise = jax.random.normal(jax.random.PRNGKey(7), x[rows].shape)
    return x.at[rows].add(0.5 * noise)
  sub = params
  for p in path[:-1]:
    sub = sub[p]
  new = jax.tree.map(bump, sub[path[-1]])
  out = jax.tree.map(lambda x: x, params)
  node = out
  for p in path[:-1]:
    node[p] = dict(node[p])
    node = node[p]
  node[path[-1]] = new
  return out


@pytest.mark.parametrize("name,path,width,train", [
    ("star", ("fcn_0", "scenario_kernel"), 1, False),
    ("star", ("fcn_1", "scenario_kernel"), 1, True),
    ("star", ("partitioned_norm", "scenario_scale"), 1, True),
    ("sharedbottom", ("towers",), 1, False),
    ("mmoe", ("towers",), 1, False),
    ("mmoe", ("gates",), 1, False),
    ("ple", ("cgc_0", "specific_experts"), 2, False),
    ("ple", ("towers",), 1, False),
])
def test_scenario_params_only_affect_their_scenario(name, path, width, train):
  batch = make_batch(b=48)
  overrides = {"specific_experts": 2} if name == "ple" else {}
  model = build_model(model_cfg(name, **overrides), SCHEMA)
  variables = init(model, batch)
  params = _perturb_scenario(variables["params"], path, scenario=1, width=width)

  def run(p):
    kwargs = {"mutable": ["batch_stats"]} if train else {}
    out = model.apply({**variables, "params": p}, batch, train=train, **kwargs)
    return np.asarray(out[0] if train else out)

  before, after = run(variables["params"]), run(params)
  s = np.asarray(batch["scenario"])
  np.testing.assert_array_equal(before[s != 1], after[s != 1])
  assert np.abs(before[s == 1] - after[s == 1]).max() > 1e-4


def test_embedding_collection_one_table_lookup_and_pooling():
  batch = make_batch(b=16)
  module = EmbeddingCollection(SCHEMA, 5, init_std=1.0)
  boxed = module.init(jax.random.PRNGKey(0), batch["sparse"], batch["multi"])
  spec = nn.get_partition_spec(boxed)["params"]["table"]
  assert tuple(spec) == ("vocab", "embed")
  variables = nn.meta.unbox(boxed)
  assert list(variables["params"]) == ["table"]
  table = np.asarray(variables["params"]["table"])
  assert SCHEMA.total_embedding_rows == 50 + 40 + 4 + 12
  assert table.shape == (256, 5)  # padded to a multiple of TABLE_ROW_ALIGN
  out = np.asarray(module.apply(variables, batch["sparse"], batch["multi"]))
  assert out.shape == (16, 4, 5)

  offsets = SCHEMA.embedding_offsets
  sparse, multi = np.asarray(batch["sparse"]), np.asarray(batch["multi"])
  for b in range(16):
    for k in range(3):
      np.testing.assert_allclose(out[b, k], table[offsets[k] + sparse[b, k]], rtol=1e-6)
    ids = [i for i in multi[b, 0] if i != 0]
    expected = (np.mean([table[offsets[3] + i] for i in ids], axis=0) if ids
                else np.zeros(5, np.float32))
    np.testing.assert_allclose(out[b, 3], expected, rtol=1e-5, atol=1e-6)
  assert (multi[:4] == 0).all() and np.all(out[:4, 3] == 0)


def test_multi_pooling_ignores_padding_values():
  batch = make_batch(b=4)
  module = EmbeddingCollection(SCHEMA, 3, init_std=1.0)
  variables = nn.meta.unbox(module.init(jax.random.PRNGKey(0), batch["sparse"],
                                        batch["multi"]))
  a = jnp.asarray([[[5, 7, 0]], [[5, 0, 7]], [[5, 7, 7]], [[0, 0, 0]]], jnp.int32)
  out = np.asarray(module.apply(variables, batch["sparse"], a))[:, 3]
  np.testing.assert_allclose(out[0], out[1], rtol=1e-6)     # position of padding irrelevant
  assert not np.allclose(out[0], out[2])                      # padding is not a 7
  # Changing the padding row of the table changes nothing.
  table = variables["params"]["table"]
  pad_row = SCHEMA.embedding_offsets[3]
  moved = {"params": {"table": table.at[pad_row].add(3.0)}}
  np.testing.assert_array_equal(np.asarray(module.apply(moved, batch["sparse"], a))[:, 3], out)


def test_partitioned_norm_uses_per_scenario_statistics():
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(64, 5)), jnp.float32)
  scenario = jnp.asarray(r.integers(0, 3, 64), jnp.int32)
  norm = PartitionedNorm(3)
  variables = norm.init(jax.random.PRNGKey(0), x, scenario, train=False)
  y, upd = norm.apply(variables, x, scenario, True, mutable=["batch_stats"])
  shifted = jnp.where((scenario == 0)[:, None], x * 3.0 + 10.0, x)
  y2, upd2 = norm.apply(variables, shifted, scenario, True, mutable=["batch_stats"])
  s = np.asarray(scenario)
  np.testing.assert_allclose(np.asarray(y2)[s != 0], np.asarray(y)[s != 0], rtol=1e-6)
  for k in range(3):  # each scenario is normalised to its own zero mean / unit variance
    rows = np.asarray(y2)[s == k]
    np.testing.assert_allclose(rows.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(rows.var(0), 1, atol=1e-3)
  mean, mean2 = np.asarray(upd["batch_stats"]["mean"]), np.asarray(upd2["batch_stats"]["mean"])
  np.testing.assert_allclose(mean2[1:], mean[1:], rtol=1e-6)
  assert not np.allclose(mean2[0], mean[0])
  # A scenario absent from the batch keeps its running statistics.
  _, upd3 = norm.apply(variables, x, jnp.zeros_like(scenario), True, mutable=["batch_stats"])
  np.testing.assert_array_equal(np.asarray(upd3["batch_stats"]["var"])[1:], 1.0)
  # Eval uses the running statistics of the row's own scenario.
  stats = {"mean": jnp.asarray([[0.0] * 5, [1.0] * 5, [2.0] * 5]),
           "var": jnp.ones((3, 5)) * 4.0}
  y_eval = norm.apply({**variables, "batch_stats": stats}, x, scenario, False)
  expected = (np.asarray(x) - s[:, None]) / np.sqrt(4.0 + 1e-5)
  np.testing.assert_allclose(np.asarray(y_eval), expected, rtol=1e-5, atol=1e-6)


def test_star_shift_in_one_scenario_leaves_others_unchanged():
  # batch_norm=False: the aux MLP's plain BatchNorm would (correctly) mix scenarios.
  model = build_model(model_cfg("star", batch_norm=False), SCHEMA)
  batch = make_batch(b=48)
  variables = init(model, batch)
  s = np.asarray(batch["scenario"])
  shifted = dict(batch, dense=jnp.where((batch["scenario"] == 0)[:, None],
                                        batch["dense"] + 7.0, batch["dense"]))
  a, _ = model.apply(variables, batch, train=True, mutable=["batch_stats"])
  b, _ = model.apply(variables, shifted, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(a)[s != 0], np.asarray(b)[s != 0], rtol=1e-6)
  assert np.abs(np.asarray(a)[s == 0] - np.asarray(b)[s == 0]).max() > 1e-4


@pytest.mark.parametrize("scenario", [
    None,                               # mixed
    np.zeros(37, np.int32),             # one scenario only
    np.r_[np.zeros(30), np.full(7, 2)].astype(np.int32),  # scenario 1 absent
])
def test_star_grouped_equals_dense(scenario):
  b = 37 if scenario is not None else 40
  batch = make_batch(b=b, scenario=scenario)
  grouped = build_model(model_cfg("star"), SCHEMA)
  dense = build_model(model_cfg("star", scenario_matmul="dense"), SCHEMA)
  variables = init(grouped, batch)
  variables["params"] = jax.tree.map(  # make scenario weights differ from one another
      lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(3), x.shape),
      variables["params"])
  for train in (False, True):
    kw = {"mutable": ["batch_stats"]} if train else {}
    g = grouped.apply(variables, batch, train=train, **kw)
    d = dense.apply(variables, batch, train=train, **kw)
    g, d = (g[0], d[0]) if train else (g, d)
    np.testing.assert_allclose(np.asarray(g), np.asarray(d), rtol=1e-5, atol=1e-5)


def test_pack_by_scenario_roundtrip_and_pure_chunks():
  r = np.random.default_rng(1)
  s = jnp.asarray(r.choice(4, 100, p=[0.7, 0.0, 0.2, 0.1]), jnp.int32)
  packing = pack_by_scenario(s, 4, chunk=8)
  x = jnp.arange(100, dtype=jnp.float32) + 1
  packed = np.asarray(packing.pack(x))
  chunk_s = np.asarray(packing.chunk_scenario)
  for c in range(packing.num_chunks):  # every real row sits in a chunk of its scenario
    rows = packed[c][packed[c] > 0].astype(int) - 1
    assert (np.asarray(s)[rows] == chunk_s[c]).all()
  np.testing.assert_array_equal(np.asarray(packing.unpack(packing.pack(x))), np.asarray(x))


def test_seed_default_sides():
  model = build_model(model_cfg("seed"), SCHEMA)
  (user_emb, user_dense), (item_emb, item_dense) = model.sides()
  assert user_emb.tolist() == [0, 2] and user_dense.tolist() == [0]   # user_id, gender; age
  assert item_emb.tolist() == [1, 3] and item_dense.tolist() == [1]   # item_id, genres; price
  explicit = build_model(model_cfg("seed", user_features=("user_id",),
                                   item_features=("item_id",)), SCHEMA)
  (u, ud), (i, idn) = explicit.sides()
  assert u.tolist() == [0] and i.tolist() == [1] and ud.size == 0 and idn.size == 0
  assert isinstance(model, Seed)


@pytest.mark.parametrize("name", MODELS)
def test_bfloat16_runs_with_float32_params_and_logits(name):
  batch = make_batch()
  model = build_model(model_cfg(name, dtype="bfloat16"), SCHEMA)
  variables = init(model, batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["params"]))
  logits, _ = model.apply(variables, batch, train=True, mutable=["batch_stats"])
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
  f32 = build_model(model_cfg(name), SCHEMA).apply(variables, batch, train=False)
  bf16 = model.apply(variables, batch, train=False)
  np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), atol=0.1)


def test_empty_feature_groups_still_work():
  schema = FeatureSchema(sparse=(SparseFeature("item_id", 9),), multi=(), dense=(),
                         scenario_names=("a", "b"))
  batch = {"sparse": jnp.ones((6, 1), jnp.int32), "multi": jnp.zeros((6, 0, 1), jnp.int32),
           "dense": jnp.zeros((6, 0), jnp.float32),
           "scenario": jnp.asarray([0, 1, 0, 1, 0, 1], jnp.int32)}
  for name in MODELS:
    model = build_model(model_cfg(name), schema)
    out = model.apply(init(model, batch), batch, train=False)
    assert out.shape == (6,) and bool(jnp.isfinite(out).all())


# ---- the fast formulations compute what the vmapped ones did ---------------------------
# SharedBottom, MMoE and PLE run their experts / gates / towers as StackedMLP / StackedDense
# (one wide matmul per shared input, fused mixing) instead of flax vmap over copies. These
# are the vmapped formulations they replaced; the param and batch_stats trees are the same,
# so one set of variables drives both.

from mscenario.models.base import ScenarioModel  # noqa: E402
from mscenario.models.layers import MLP, select_scenario, stacked  # noqa: E402
from mscenario.models.ple import CGC  # noqa: E402


class VmapSharedBottom(ScenarioModel):
  tower_hidden: tuple = (64,)

  @nn.compact
  def __call__(self, batch, train=False):
    x = self.inputs(batch)
    h = self.mlp(self.hidden, name="bottom")(x, train)
    s = self.num_scenarios
    towers = self.stacked_mlp(s, self.tower_hidden, output_dim=1, name="towers")
    logits = towers(jnp.broadcast_to(h, (s,) + h.shape), train)[..., 0]
    return select_scenario(logits.T, batch["scenario"]).astype(jnp.float32)


class VmapMMoE(ScenarioModel):
  num_experts: int = 4
  expert_hidden: tuple = (256,)
  tower_hidden: tuple = (64,)

  @nn.compact
  def __call__(self, batch, train=False):
    x = self.inputs(batch)
    s, e = self.num_scenarios, self.num_experts
    experts = self.stacked_mlp(e, self.expert_hidden, name="experts")
    expert_out = experts(jnp.broadcast_to(x, (e,) + x.shape), train)
    gates = stacked(nn.Dense, s, takes_train=False)(e, dtype=self.compute_dtype,
                                                    param_dtype=jnp.float32, name="gates")
    gate = nn.softmax(gates(jnp.broadcast_to(x, (s,) + x.shape)).astype(jnp.float32))
    mixed = jnp.einsum("sbe,ebh->sbh", gate.astype(expert_out.dtype), expert_out)
    towers = self.stacked_mlp(s, self.tower_hidden, output_dim=1, name="towers")
    logits = towers(mixed, train)[..., 0]
    return select_scenario(logits.T, batch["scenario"]).astype(jnp.float32)


class VmapCGC(CGC):
  @nn.compact
  def __call__(self, inputs, train=False):
    s, k, m = self.num_scenarios, self.specific, self.shared
    args = (tuple(self.expert_hidden), self.activation, self.dropout, self.dtype,
            self.batch_norm)
    spec = stacked(MLP, s * k)(*args, name="specific_experts")(
        jnp.repeat(inputs[:s], k, axis=0), train)
    spec = spec.reshape((s, k) + spec.shape[1:])
    shared = stacked(MLP, m)(*args, name="shared_experts")(
        jnp.broadcast_to(inputs[s], (m,) + inputs.shape[1:]), train)
    gates = stacked(nn.Dense, s, takes_train=False)(k + m, name="gates")
    gate = nn.softmax(gates(inputs[:s]))
    out = (jnp.einsum("sbk,skbh->sbh", gate[..., :k], spec)
           + jnp.einsum("sbm,mbh->sbh", gate[..., k:], shared))
    if self.last:
      return out
    g = nn.softmax(nn.Dense(s * k + m, name="shared_gate")(inputs[s]))
    all_experts = jnp.concatenate([spec.reshape((s * k,) + spec.shape[2:]), shared], axis=0)
    return jnp.concatenate([out, jnp.einsum("be,ebh->bh", g, all_experts)[None]], axis=0)


class VmapPLE(ScenarioModel):
  ple_layers: int = 1
  shared_experts: int = 2
  specific_experts: int = 1
  expert_hidden: tuple = (256,)
  tower_hidden: tuple = (64,)

  @nn.compact
  def __call__(self, batch, train=False):
    x = self.inputs(batch)
    s = self.num_scenarios
    h = jnp.broadcast_to(x, (s + 1,) + x.shape)
    for i in range(self.ple_layers):
      h = VmapCGC(s, self.specific_experts, self.shared_experts, tuple(self.expert_hidden),
                  last=i == self.ple_layers - 1, activation=self.activation,
                  batch_norm=self.batch_norm, name=f"cgc_{i}")(h, train)
    towers = self.stacked_mlp(s, self.tower_hidden, output_dim=1, name="towers")
    logits = towers(h, train)[..., 0]
    return select_scenario(logits.T, batch["scenario"]).astype(jnp.float32)


VMAP = {"sharedbottom": VmapSharedBottom, "mmoe": VmapMMoE, "ple": VmapPLE}


def _assert_close_per_leaf(a, b, rtol=1e-5):
  """|a - b| <= rtol * (|b| + max|b| of the leaf): relative, with the leaf's scale as the
  floor for entries that are ~0 (e.g. a gradient that cancels)."""
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max() + 1e-30,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name,overrides", [
    ("sharedbottom", {}),
    # Slow (MSCENARIO_SLOW=1), covered in CI by other cases of the same code: multi-layer and
    # BatchNorm-free StackedMLP towers (the MMoE cases), PLE's BatchNorm experts (the same
    # StackedMLP as MMoE's default case) and its gating (the 3-layer PLE case).
    pytest.param("sharedbottom", {"tower_hidden": (6, 5), "batch_norm": False},
                 marks=pytest.mark.slow),
    # Slow (MSCENARIO_SLOW=1): covered in CI by the default and multi-layer cases.
    pytest.param("mmoe", {"num_experts": 3}, marks=pytest.mark.slow),
    ("mmoe", {"expert_hidden": (8, 6), "tower_hidden": (5, 3)}),
    ("mmoe", {"batch_norm": False}),
    pytest.param("ple", {}, marks=pytest.mark.slow),
    pytest.param("ple", {"specific_experts": 2, "shared_experts": 1, "ple_layers": 2},
                 marks=pytest.mark.slow),
    ("ple", {"specific_experts": 2, "ple_layers": 3, "expert_hidden": (8, 6),
             "batch_norm": False}),
])
def test_fast_models_equal_vmapped_formulation(name, overrides):
  batch = make_batch(b=64)
  cfg = model_cfg(name, **overrides)
  fast = build_model(cfg, SCHEMA)
  fields = {k: v for k, v in vars(fast).items()
            if k in {f.name for f in __import__("dataclasses").fields(VMAP[name])}
            and k not in ("parent", "name")}
  ref = VMAP[name](**fields)
  variables = init(fast, batch)
  assert (jax.tree.structure(variables)
          == jax.tree.structure(init(ref, batch)))          # same tree: checkpoints load
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, init(ref, batch))
  # Scenario-specific weights differ from one another (init would make many equal).
  variables = {**variables, "params": jax.tree.map(
      lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(5), x.shape),
      variables["params"])}
  np.testing.assert_allclose(np.asarray(fast.apply(variables, batch, train=False)),
                             np.asarray(ref.apply(variables, batch, train=False)),
                             rtol=1e-5, atol=1e-6)

  def loss(model, params):
    out, upd = model.apply({**variables, "params": params}, batch, train=True,
                           mutable=["batch_stats"])
    y = batch["label"]
    return jnp.mean(jax.nn.softplus(-out) * y + jax.nn.softplus(out) * (1 - y)), (out, upd)

  (lf, (of, uf)), gf = jax.value_and_grad(lambda p: loss(fast, p), has_aux=True)(
      variables["params"])
  (lr, (or_, ur)), gr = jax.value_and_grad(lambda p: loss(ref, p), has_aux=True)(
      variables["params"])
  np.testing.assert_allclose(float(lf), float(lr), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(of), np.asarray(or_), rtol=1e-5, atol=1e-6)
  _assert_close_per_leaf(uf, ur)
  _assert_close_per_leaf(gf, gr)


def test_stacked_dense_init_matches_vmapped_distribution():
  from mscenario.models.layers import StackedDense
  x = jnp.ones((2, 96))
  fast = StackedDense(8, 64).init(jax.random.PRNGKey(0), x)["params"]
  ref = stacked(nn.Dense, 8, takes_train=False)(64).init(
      jax.random.PRNGKey(0), jnp.ones((8, 2, 96)))["params"]
  assert jax.tree.map(jnp.shape, fast) == jax.tree.map(jnp.shape, ref)
  # lecun-normal with fan-in 96 per copy (not 8 * 96), copies independent; bias zeros.
  for kernel in (fast["kernel"], ref["kernel"]):
    assert abs(float(kernel.std()) * np.sqrt(96) - 1.0) < 0.03
    assert abs(np.corrcoef(np.asarray(kernel[0]).ravel(), np.asarray(kernel[1]).ravel())[0, 1]) < 0.05
  np.testing.assert_array_equal(np.asarray(fast["bias"]), 0.0)
