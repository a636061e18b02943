"""Sparse embedding updates: untouched rows stay bit-identical, touched rows match a dense
reference implementation of the same optimizer on the full table."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mscenario.config import load_config
from mscenario.data import pipeline
from mscenario.data.prepare import prepare
from mscenario.models.embedding import stacked_ids
from mscenario.parallel import mesh as mesh_lib
from mscenario.train import loop, sparse
from mscenario.train.steps import weighted_bce
from tests.helpers import SYNTHETIC, TINY, tiny


def _setup(kind, lr=0.05):
  config = load_config(SYNTHETIC, [*tiny("sharedbottom"),
                                   f"--config.train.embed_update={kind}",
                                   f"--config.train.embed_learning_rate={lr}"])
  data = prepare(config, log=lambda *_: None)
  mesh = mesh_lib.make_mesh(config.mesh)
  setup = loop.build(config, data, mesh)
  it = pipeline.BatchIterator(data, "train", config.train.batch_size, seed=0, shuffle=True,
                              drop_last=True)
  batches = [pipeline.to_global(b, mesh_lib.batch_sharding(mesh))
             for b, _ in zip(it.epoch(0), range(2))]
  return setup, batches


def _copy(tree):
  return jax.tree_util.tree_map(lambda x: jnp.array(np.asarray(x)), tree)


def _full_table_grad(setup, state, batch):
  """Gradient of the loss w.r.t. the whole table, through the model's own (dense) lookup."""
  model = setup.model

  def loss_fn(table):
    params = {**state.params, "embedding": {"table": table}}
    logits, _ = model.apply({"params": params, **state.model_state}, batch, train=True,
                            rngs={"dropout": jax.random.fold_in(state.rng, state.step)},
                            mutable=list(state.model_state))
    return weighted_bce(logits, batch["label"], batch["weight"])

  return np.asarray(jax.grad(loss_fn)(state.embed["table"]))


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "lazy_adam"])
def test_sparse_update_matches_dense_reference(kind):
  lr = 0.05
  setup, batches = _setup(kind, lr)
  state = setup.create_state()
  table = np.asarray(state.embed["table"]).copy()
  opt = {k: np.asarray(v).copy() for k, v in state.embed["opt"].items()}
  for step, batch in enumerate(batches):
    before = _copy(state)
    grad = _full_table_grad(setup, before, batch)
    ids = np.unique(np.asarray(stacked_ids(setup.data.schema, batch["sparse"], batch["multi"])))
    touched = np.zeros(table.shape[0], bool)
    touched[ids] = True
    # Dense reference: the same optimizer over every row, masked to the touched rows.
    if kind == "rowwise_adagrad":
      acc = opt["acc"] + np.where(touched, (grad ** 2).mean(axis=1), 0.0)
      delta = -lr * grad / (np.sqrt(acc)[:, None] + sparse.EPS)
      opt = {"acc": acc}
    else:
      m = np.where(touched[:, None], sparse.B1 * opt["m"] + (1 - sparse.B1) * grad, opt["m"])
      v = np.where(touched[:, None], sparse.B2 * opt["v"] + (1 - sparse.B2) * grad ** 2,
                   opt["v"])
      t = step + 1
      delta = -lr * (m / (1 - sparse.B1 ** t)) / (np.sqrt(v / (1 - sparse.B2 ** t))
                                                  + sparse.ADAM_EPS)
      opt = {"m": m, "v": v}
    expected = np.where(touched[:, None], table + delta, table)
    state, _ = setup.train_step(before, batch)
    got = np.asarray(state.embed["table"])
    # Rows the batch did not touch are bit-identical; touched rows match the reference.
    np.testing.assert_array_equal(got[~touched], table[~touched])
    # Adam's m/sqrt(v) magnifies float32 rounding of tiny gradients: a looser atol there.
    atol = 1e-6 if kind == "rowwise_adagrad" else 2e-5
    np.testing.assert_allclose(got[touched], expected[touched], rtol=1e-5, atol=atol)
    assert np.abs(got[touched] - table[touched]).max() > 0
    for k in opt:
      # Rows hit many times sum their gradients in a different order in the two paths.
      np.testing.assert_allclose(np.asarray(state.embed["opt"][k]), opt[k], rtol=1e-4,
                                 atol=1e-6)
    table = got


def test_rowwise_adagrad_keeps_one_float_per_row():
  setup, _ = _setup("rowwise_adagrad")
  state = setup.create_state()
  rows = state.embed["table"].shape[0]
  assert state.embed["opt"]["acc"].shape == (rows,)
  # The table is not an optax-managed param in sparse mode (no dense moments over it).
  sizes = [x.size for x in jax.tree_util.tree_leaves(state.opt_state)]
  assert all(s < rows * state.embed["table"].shape[1] for s in sizes)


def test_sparse_training_learns(tmp_path):
  from mscenario import cli
  import json
  import os
  rc = cli.main(["train", "--config", SYNTHETIC, "--workdir", str(tmp_path), *TINY,
                 "--config.train.embed_update=rowwise_adagrad",
                 "--config.train.embed_learning_rate=0.05"])
  assert rc == 0
  res = json.load(open(os.path.join(tmp_path, "results.json")))
  assert res["overall"]["auc"] > 0.6
