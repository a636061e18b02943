"""Issue 11 §5 levers for the scaling curve: a decaying learning-rate schedule
(train.lr_schedule) and explicit pairwise embedding interactions (model.interaction)."""
from __future__ import annotations

import json
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from mscenario import cli
from mscenario.config import base_config
from mscenario.data import pipeline
from mscenario.data.schema import FeatureSchema, MultiFeature, SparseFeature
from mscenario.errors import ConfigError
from mscenario.models import build_model
from mscenario.models.embedding import model_input
from mscenario.train.optim import make_optimizer, schedule
from mscenario.train.state import lr_decay_steps
from tests.helpers import SYNTHETIC, TINY


def _train_cfg(**overrides):
  c = base_config().train
  for k, v in overrides.items():
    c[k] = v
  return c


def test_constant_is_the_default_and_unchanged():
  assert base_config().train.lr_schedule == "constant"
  assert schedule(1e-3, _train_cfg()) == 1e-3
  warm = schedule(1e-3, _train_cfg(warmup_steps=10))
  assert float(warm(5)) == pytest.approx(5e-4) and float(warm(50)) == pytest.approx(1e-3)


def test_cosine_values_at_given_steps():
  s = schedule(1e-3, _train_cfg(lr_schedule="cosine"), 100)
  for step, want in [(0, 1e-3), (25, 1e-3 * (1 + np.cos(np.pi / 4)) / 2), (50, 5e-4),
                     (100, 0.0), (1000, 0.0)]:
    assert float(s(step)) == pytest.approx(want, abs=1e-9), step
  floor = schedule(1e-3, _train_cfg(lr_schedule="cosine", lr_end_fraction=0.1), 100)
  assert float(floor(100)) == pytest.approx(1e-4) and float(floor(500)) == pytest.approx(1e-4)
  warm = schedule(1e-3, _train_cfg(lr_schedule="cosine", warmup_steps=10), 110)
  assert float(warm(0)) == 0.0 and float(warm(5)) == pytest.approx(5e-4)
  assert float(warm(10)) == pytest.approx(1e-3) and float(warm(60)) == pytest.approx(5e-4)
  with pytest.raises(ConfigError, match="lr_schedule='step'"):
    schedule(1e-3, _train_cfg(lr_schedule="step"), 100)
  with pytest.raises(ConfigError, match="lr_decay_steps"):
    schedule(1e-3, _train_cfg(lr_schedule="cosine", warmup_steps=10), 10)


def test_optimizer_applies_the_schedule_to_dense_and_embedding_params():
  """SGD makes the applied update -lr(t) * g, so each step shows the rate of that step."""
  cfg = _train_cfg(optimizer="sgd", lr_schedule="cosine", embed_optimizer="sgd",
                   embed_learning_rate=0.1)
  params = {"embedding": {"table": jnp.zeros(2)}, "dense": {"w": jnp.zeros(3)}}
  tx = make_optimizer(cfg, params, steps=8)
  opt = tx.init(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  for t in range(10):
    upd, opt = tx.update(grads, opt, params)
    want = (1 + np.cos(np.pi * min(t, 8) / 8)) / 2
    np.testing.assert_allclose(upd["dense"]["w"], -1e-3 * want, atol=1e-10)
    np.testing.assert_allclose(upd["embedding"]["table"], -0.1 * want, atol=1e-8)


@pytest.mark.parametrize("drop_last", [True, False])
def test_decay_spans_the_configured_run(drop_last):
  """epochs x the pipeline's own batches per epoch (where early stopping ends the run does
  not enter, so a resumed run decays along the same curve)."""
  c = base_config()
  c.train.update(lr_schedule="cosine", epochs=7, batch_size=64, drop_last=drop_last)
  data = types.SimpleNamespace(arrays={}, splits={"train": np.arange(1000)})
  it = pipeline.BatchIterator(data, "train", 64, seed=0, shuffle=True, drop_last=drop_last)
  assert lr_decay_steps(c, data) == 7 * it.num_batches == 7 * (15 if drop_last else 16)
  c.train.lr_decay_steps = 123
  assert lr_decay_steps(c, data) == 123
  c.train.lr_decay_steps = 0
  c.train.embed_update = "lazy_adam"
  with pytest.raises(ConfigError, match="embed_update"):
    lr_decay_steps(c, data)
  c.train.lr_schedule = "constant"
  assert lr_decay_steps(c, data) == 0


def test_schedule_resumes_from_the_checkpointed_state():
  """The rate is a function of the optimizer state's step count alone: a state saved after
  5 steps (through numpy, as a checkpoint) and continued by a freshly built optimizer ends
  bit-identical to 12 uninterrupted steps."""
  cfg = _train_cfg(lr_schedule="cosine", weight_decay=0.1)
  params = {"embedding": {"table": jnp.ones((3, 2))}, "dense": {"w": jnp.ones(4)}}
  grads = [jax.tree_util.tree_map(lambda p, i=i: jnp.sin(p * (i + 1.0)), params)
           for i in range(12)]

  def run(tx, p, opt, gs):
    for g in gs:
      upd, opt = tx.update(g, opt, p)
      p = optax.apply_updates(p, upd)
    return p, opt

  tx = make_optimizer(cfg, params, steps=12)
  ref, _ = run(tx, params, tx.init(params), grads)
  p, opt = run(tx, params, tx.init(params), grads[:5])
  p, opt = jax.tree_util.tree_map(np.asarray, (p, opt))
  tx2 = make_optimizer(cfg, params, steps=12)
  out, _ = run(tx2, p, opt, grads[5:])
  for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out)):
    np.testing.assert_array_equal(a, b)
  const, _ = run(make_optimizer(_train_cfg(weight_decay=0.1), params), params,
                 make_optimizer(_train_cfg(weight_decay=0.1), params).init(params), grads)
  assert not np.allclose(const["dense"]["w"], ref["dense"]["w"])  # the schedule took effect


def _final(workdir):
  ckpt = os.path.join(workdir, "ckpt")
  step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  state = ocp.StandardCheckpointer().restore(os.path.join(ckpt, str(step), "state"))
  return step, state["params"], json.load(open(os.path.join(workdir, "results.json")))


@pytest.mark.slow  # 2 tiny runs (~140 s under load); the fast version is the test above
def test_cosine_run_stopped_and_resumed_equals_uninterrupted(tmp_path):
  args = ["train", "--config", SYNTHETIC, *TINY, "--config.train.lr_schedule=cosine",
          "--config.train.checkpoint_every_steps=10", "--config.train.patience=0"]
  assert cli.main([*args, "--workdir", str(tmp_path / "ref")]) == 0
  cut = tmp_path / "cut"
  cli.main([*args, "--workdir", str(cut), "--config.train.stop_after_steps=40"])
  assert not (cut / "results.json").exists()
  assert cli.main([*args, "--workdir", str(cut)]) == 0
  step_a, params_a, res_a = _final(tmp_path / "ref")
  step_b, params_b, res_b = _final(cut)
  assert step_a == step_b
  for a, b in zip(jax.tree_util.tree_leaves(params_a), jax.tree_util.tree_leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert res_a == res_b


SCHEMA = FeatureSchema(
    sparse=(SparseFeature("user_id", 10), SparseFeature("item_id", 8),
            SparseFeature("gender", 3)),
    multi=(MultiFeature("genres", 6, 2),),
    dense=("age",),
    scenario_names=("a", "b"),
)
E = 4


def _batch(b=6):
  r = np.random.default_rng(0)
  return {
      "sparse": jnp.asarray(np.stack([np.arange(b) % 10, r.integers(0, 8, b),
                                      r.integers(0, 3, b)], 1), jnp.int32),
      "multi": jnp.asarray(r.integers(0, 6, (b, 1, 2)), jnp.int32),
      "dense": jnp.asarray(r.normal(size=(b, 1)), jnp.float32),
      "scenario": jnp.asarray(np.arange(b) % 2, jnp.int32),
      "label": jnp.asarray(np.arange(b) % 2, jnp.float32),
  }


class _Inputs(nn.Module):
  interaction: str

  @nn.compact
  def __call__(self, batch):
    return model_input(SCHEMA, E, 0.5, batch, self.interaction)


def test_dot_features_follow_the_user_embedding():
  batch = _batch()
  params = nn.meta.unbox(_Inputs("dot").init(jax.random.PRNGKey(0), batch))
  x = _Inputs("dot").apply(params, batch)
  plain = _Inputs("none").apply(params, batch)
  width = 4 * E + 1  # 3 sparse + 1 pooled multi slots, 1 dense
  assert plain.shape == (6, width) and x.shape == (6, width + 6)  # 4 slots: 6 pairs
  np.testing.assert_array_equal(x[:, :width], plain)
  table = params["params"]["embedding"]["table"]
  offsets = SCHEMA.embedding_offsets
  user_row = int(batch["sparse"][0, 0]) + offsets[0]
  item_rows = batch["sparse"][:, 1] + offsets[1]
  np.testing.assert_allclose(x[:, width], np.sum(table[batch["sparse"][:, 0] + offsets[0]]
                                                 * table[item_rows], -1), rtol=1e-6)
  new = jax.random.normal(jax.random.PRNGKey(1), (E,))
  moved = jax.tree_util.tree_map(lambda t: t, params)
  moved["params"]["embedding"]["table"] = table.at[user_row].set(new)
  y = _Inputs("dot").apply(moved, batch)
  # Row 0's user.item and user.gender terms follow the new vector; the item.gender term and
  # every other row (other users) are unchanged.
  np.testing.assert_allclose(y[0, width], new @ table[item_rows[0]], rtol=1e-6)
  np.testing.assert_allclose(y[0, width + 1],
                             new @ table[int(batch["sparse"][0, 2]) + offsets[2]], rtol=1e-6)
  assert y[0, width] != x[0, width]
  np.testing.assert_array_equal(y[0, width + 3], x[0, width + 3])
  np.testing.assert_array_equal(y[1:], x[1:])
  with pytest.raises(ConfigError, match="model.interaction='fm'"):
    _Inputs("fm").init(jax.random.PRNGKey(0), batch)


def test_star_with_dot_interaction_builds_from_config():
  c = base_config().model
  assert c.interaction == "none"
  c.update(name="star", embed_dim=E, interaction="dot")
  c.star.update(hidden=(8, 4), aux_hidden=(4,))
  model = build_model(c, SCHEMA)
  batch = _batch()
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch, train=False))
  norm = nn.meta.unbox(variables)["params"]["partitioned_norm"]
  assert jax.tree_util.tree_leaves(norm)[0].shape[-1] == 4 * E + 1 + 6
