"""train.aux_rating (train/aux.py): the auxiliary loss on the raw feedback is off by default
(the step and the prepared data are exactly as before), changes the gradient and learns when
on, and is refused clearly where the data has no raw feedback. Sweeps run it, and a sweep
whose replicas share one split writes their ensemble's test metrics (train/sweep.py)."""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict
from sklearn.metrics import roc_auc_score

from mscenario import config as config_lib
from mscenario.data import prepare as prepare_lib
from mscenario.errors import ConfigError
from mscenario.parallel import mesh as mesh_lib
from mscenario.train import aux as aux_lib
from mscenario.train import checkpoint as ckpt_lib
from mscenario.train import report as report_lib
from mscenario.train import state as state_lib
from mscenario.train import sweep

QUIET = lambda *_: None  # noqa: E731


def _write_ratings(path, n=3000, seed=0):
  """Stars 1-5 from a user and an item effect; label = stars > 3."""
  rng = np.random.default_rng(seed)
  users, items = rng.integers(0, 60, n), rng.integers(0, 40, n)
  ue, ie = rng.normal(0, 1, 60), rng.normal(0, 1, 40)
  stars = np.clip(np.rint(3 + ue[users] + ie[items] + rng.normal(0, 0.5, n)), 1, 5)
  lines = ["user_id,item_id,scenario,rating"]
  lines += [f"u{u},i{i},{'ab'[u % 2]},{int(s)}" for u, i, s in zip(users, items, stars)]
  path.write_text("\n".join(lines) + "\n")


def _config(tmp_path, *overrides, label=("rating", "> 3")):
  c = config_lib.base_config()
  d = c.data
  d.source, d.name, d.table.train = "table", "stars", str(tmp_path / "r.csv")
  d.cache_dir = str(tmp_path / "cache")
  d.features = ConfigDict({"user_id": {"kind": "sparse", "column": "user_id"},
                           "item_id": {"kind": "sparse", "column": "item_id"}})
  d.scenario = ConfigDict({"field": "scenario", "groups": {}, "descriptions": {}})
  d.label = ConfigDict({"field": label[0], "rule": label[1]})
  return config_lib.apply_overrides(c, ["--config.model.name=sharedbottom",
                                        "--config.model.sharedbottom.hidden=(16,)", *overrides])


def _setup(cfg):
  data = prepare_lib.prepare(cfg, log=QUIET)
  return state_lib.build(cfg, data, mesh_lib.make_mesh(cfg.mesh)), data


def _batch(data, size=512):
  rows = np.asarray(data.splits["train"])[:size]
  batch = {k: np.asarray(data.arrays[k][rows]) for k in state_lib.pipeline.DEVICE_KEYS
           if k in data.arrays}
  batch["weight"] = np.ones(len(rows), np.float32)
  return batch


def _train(setup, batch, steps):
  state, metrics = setup.create_state(), []
  batch = {k: v for k, v in batch.items() if k in setup.batch_shardings}
  for _ in range(steps):
    state, m = setup.train_step(state, batch)
    metrics.append(jax.device_get(m))
  return state, metrics


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


LR = "--config.train.learning_rate=0.01"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The ratings file and the plain (aux off) program on it, shared by the tests below."""
  path = tmp_path_factory.mktemp("world")
  _write_ratings(path / "r.csv")
  off, data = _setup(_config(path, LR))
  return path, off, data


def test_weight_zero_is_the_plain_step(world):
  """Weight 0 = a config without the key: same prepared data (same cache key), no head, and
  bit-identical parameters after a few steps."""
  path, off, data = world
  assert off.config.train.aux_rating.weight == 0.0
  without = _config(path, LR)
  with without.unlocked():
    del without.train["aux_rating"]
  b, data_b = _setup(without)
  assert data.path == data_b.path and "feedback" not in data.arrays
  batch = _batch(data)
  sa, ma = _train(off, batch, 3)
  sb, _ = _train(b, batch, 3)
  assert aux_lib.AUX_KEY not in sa.params and set(ma[0]) == {"loss", "grad_norm"}
  for x, y in zip(_leaves(sa.params), _leaves(sb.params)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ["regression",
                                  pytest.param("ordinal", marks=pytest.mark.slow)])
def test_aux_loss_changes_the_gradient_and_learns(world, kind):
  path, off, _ = world
  on, data = _setup(_config(path, "--config.train.aux_rating.weight=0.5", LR,
                            f"--config.train.aux_rating.kind={kind}"))
  stars = np.asarray(data.arrays["feedback"])
  assert sorted(np.unique(stars).tolist()) == [1, 2, 3, 4, 5]
  np.testing.assert_array_equal(np.asarray(data.arrays["label"]), (stars > 3).astype(
      data.arrays["label"].dtype))
  # Rows without stars (predict, export) rebuild the same head from the recorded levels.
  assert data.transform.state["feedback_levels"] == [1.0, 2.0, 3.0, 4.0, 5.0]
  scoring = dataclasses.replace(data, arrays={k: v for k, v in data.arrays.items()
                                              if k != "feedback"})
  assert aux_lib.make_plan(on.config, scoring, on.model).key == on.aux.key
  batch = _batch(data)
  # Same initial model (the head's init takes its own key), different first update.
  init_off, init_on = off.create_state(), on.create_state()
  for x, y in zip(_leaves(init_off.params), _leaves(aux_lib.model_params(init_on.params))):
    np.testing.assert_array_equal(x, y)
  s_off, _ = _train(off, batch, 1)
  s_on, metrics = _train(on, batch, 30)
  first_off = np.asarray(s_off.params["embedding"]["table"])
  s_on1, _ = _train(on, batch, 1)
  assert np.abs(first_off - np.asarray(s_on1.params["embedding"]["table"])).max() > 0
  aux_losses = [float(m["aux_loss"]) for m in metrics]
  assert aux_losses[-1] < 0.7 * aux_losses[0], aux_losses
  # Training only: the model's parameters (what export writes) leave the head out.
  assert aux_lib.AUX_KEY in s_on.params
  assert aux_lib.AUX_KEY not in state_lib.all_params(s_on)


def test_no_raw_feedback_is_refused(tmp_path):
  path = tmp_path / "r.csv"
  path.write_text("user_id,item_id,scenario,click\n" + "".join(
      f"u{k % 7},i{k % 5},{'ab'[k % 2]},{k % 3 == 0:d}\n" for k in range(60)))
  cfg = _config(tmp_path, "--config.train.aux_rating.weight=0.1", label=("click", "binary"))
  with pytest.raises(ConfigError, match="'click' holds only .0.0, 1.0.: no finer signal"):
    prepare_lib.prepare(cfg, log=QUIET)
  # Data prepared without the feedback column (aux off) cannot train the aux head.
  _write_ratings(path)
  data = prepare_lib.prepare(_config(tmp_path), log=QUIET)
  on = _config(tmp_path, "--config.train.aux_rating.weight=0.1")
  with pytest.raises(ConfigError, match="no 'feedback' column"):
    state_lib.build(on, data, mesh_lib.make_mesh(on.mesh))
  with pytest.raises(ConfigError, match="kind='bogus'"):
    _setup(_config(tmp_path, "--config.train.aux_rating.weight=0.1",
                   "--config.train.aux_rating.kind=bogus"))


def test_ensemble_report_scores_the_mean_probability(world):
  _, off, data = world
  labels = np.asarray(data.arrays["label"][data.splits["test"]])
  rng = np.random.default_rng(0)
  members = [np.clip(labels * 0.3 + rng.uniform(0, 0.7, len(labels)), 0, 1) for _ in range(3)]
  got = sweep.ensemble_report(off, members)
  assert got["members"] == 3 and set(got["scenarios"]) == {"a", "b"}
  np.testing.assert_allclose(got["overall"]["auc"],
                             roc_auc_score(labels, np.mean(members, axis=0)), atol=1e-9)
  assert got["overall"]["auc"] > max(roc_auc_score(labels, m) for m in members)
  # Replicas on different splits (the default: the seed draws the split): no ensemble.
  runs = [SimpleNamespace(setup=SimpleNamespace(data=SimpleNamespace(fingerprint=f)))
          for f in ("a", "b")]
  assert sweep.ensemble_probs(runs) is None


@pytest.mark.slow
def test_sweep_with_aux_on_one_split_writes_the_ensemble(tmp_path):
  """A sweep over init seeds with the split seed held: the aux objective runs in the sweep
  program, and sweep.json holds the test AUC of the replicas' mean probability (slow: ~15 s
  of CPU; the fast tests above cover the step and the report)."""
  _write_ratings(tmp_path / "r.csv")
  overrides = ["--config.train.aux_rating.weight=0.5", "--config.train.epochs=1",
               "--config.train.batch_size=256", "--config.data.split.seed=1"]
  cfg = _config(tmp_path, "--config.sweep.seed=1,2", *overrides)
  sweep.train(cfg, str(tmp_path / "sw"), log=QUIET)
  summary = json.load(open(tmp_path / "sw" / sweep.SWEEP_FILE))
  # The replicas differ only in their seed: one program scores both best checkpoints.
  replica = _config(tmp_path, "--config.seed=1", *overrides)
  setup, data = _setup(replica)
  labels = np.asarray(data.arrays["label"][data.splits["test"]])
  probs, aucs = [], []
  for seed in (1, 2):
    ckpts = ckpt_lib.Checkpoints(str(tmp_path / "sw" / f"seed={seed}"), 2)
    state, _ = ckpts.restore_best(setup.abstract_state)
    ckpts.close()
    assert aux_lib.AUX_KEY in state.params  # the head trained in the sweep
    probs.append(report_lib.predict(setup, state, "test"))
    aucs.append(roc_auc_score(labels, probs[-1]))
  np.testing.assert_allclose(summary["test_auc"]["values"], aucs, atol=1e-6)
  assert aucs[0] != aucs[1]
  assert summary["ensemble"]["members"] == 2
  np.testing.assert_allclose(summary["ensemble"]["overall"]["auc"],
                             roc_auc_score(labels, np.mean(probs, axis=0)), atol=1e-6)


def test_update_continues_an_aux_run_on_new_events(tmp_path):
  """`update` of a run trained with the aux objective trains on the events' stars too."""
  from mscenario.train import loop
  from mscenario.train import update as update_lib
  _write_ratings(tmp_path / "r.csv")
  cfg = _config(tmp_path, LR, "--config.train.aux_rating.weight=0.5",
                "--config.train.epochs=1", "--config.data.reserve_fraction=0.1",
                "--config.train.batch_size=256", "--config.train.eval_batch_size=1024")
  workdir = str(tmp_path / "run")
  loop.train(cfg, workdir, log=QUIET)
  # metrics.jsonl logs the aux objective's parts next to the total loss.
  records = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
  steps = [r for r in records if "grad_norm" in r]
  assert steps and all({"aux_loss", "bce"} <= set(r) for r in steps)
  for r in steps:
    assert r["loss"] == pytest.approx(r["bce"] + 0.5 * r["aux_loss"], rel=1e-5)
  _write_ratings(tmp_path / "new.csv", n=600, seed=1)
  table = update_lib.read_events(cfg, str(tmp_path / "new.csv"))
  rec = update_lib.update_table(workdir, table, log=QUIET)
  assert rec["step_to"] > rec["step_from"] and np.isfinite(rec["loss"]).all()
