"""data.collaborative online (issue 14 §3): the CF state travels with the run and its exports;
`predict`, a served request and the prepared data give one row the same cf_* values (known and
new users/items), and `update` refits the state on the new events.

One tiny synthetic run (binary feedback) is trained per module; the exported version is
loaded in process with the serving code (which imports no training code: test_layout.py).
"""
from __future__ import annotations

import csv
import json
import types

import numpy as np
import pytest

from mscenario import cli
from mscenario.api import Run
from mscenario.config import load_config
from mscenario.data import collaborative as cf
from mscenario.data import synthetic
from mscenario.data.prepare import prepare
from mscenario.export import writer as export_lib
from mscenario.parallel import mesh as mesh_lib
from mscenario.serve import predictor as pred_lib
from mscenario.train import loop
from mscenario.train.evaluate import add_cf_columns
from tests.helpers import SYNTHETIC

SMALL = [
    "--config.data.synthetic.num_rows=4000", "--config.data.synthetic.num_users=200",
    "--config.data.synthetic.num_items=100", "--config.model.name=sharedbottom",
    "--config.model.sharedbottom.hidden=(16,)",
    "--config.model.sharedbottom.tower_hidden=(8,)",
    "--config.train.batch_size=256", "--config.train.eval_batch_size=1024",
    "--config.train.epochs=1", "--config.train.log_every_steps=5",
    "--config.data.collaborative.enabled=true", "--config.data.collaborative.neighbors=10",
    "--config.data.collaborative.svd_rank=4", "--config.data.collaborative.folds=3",
]
COLS = ["user_id", "item_id", "gender", "region", "category", "age_bucket", "scenario",
        "item_text", "timestamp", "label"]
READ = ["user_id", "item_id", "gender", "region", "category", "age_bucket"]  # what requests send
CF = [cf.FEATURES.index(n) for n in cf.FEATURES]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, model_dir, config, prepared data, raw table, test predictions of the best
  checkpoint on the prepared rows)."""
  workdir = tmp_path_factory.mktemp("cf_run")
  model_dir = tmp_path_factory.mktemp("cf_model")
  assert cli.main(["train", "--config", SYNTHETIC, "--workdir", str(workdir), *SMALL]) == 0
  assert cli.main(["export", "--workdir", str(workdir), "--out", str(model_dir),
                   "--buckets", "8"]) == 0
  config = load_config(SYNTHETIC, SMALL)
  data = prepare(config, log=lambda *_: None)
  _, _, setup, state, _ = export_lib.restore(str(workdir))
  setup = loop.build(setup.config, data, mesh_lib.make_mesh(setup.config.mesh))
  probs = loop.predict(setup, state, "test")
  return workdir, model_dir, config, data, synthetic.load_raw(config.data), probs


def _columns(table, rows, **replace):
  out = {c: [table.columns[c][i].item() if hasattr(table.columns[c][i], "item")
             else table.columns[c][i] for i in rows] for c in COLS}
  for c, v in replace.items():
    out[c] = [v] * len(rows)
  return out


def _requests(cols):
  n = len(cols["user_id"])
  return [{"scenario": cols["scenario"][j], "items": [{c: cols[c][j] for c in READ}]}
          for j in range(n)]


def _served(model, cols):
  """(probabilities, model-input dense rows) of single-item requests, one per row."""
  reqs = _requests(cols)
  dense = model.encode([model.parse(r) for r in reqs])["dense"]
  return np.concatenate([model.predict(r) for r in reqs]), dense


def _offline_dense(workdir, cols):
  """The dense model input `predict` builds for these raw rows (via the run's CF state)."""
  from mscenario.data.table import RawTable
  transform = Run.open(str(workdir)).workdir.read_transform()
  n = len(cols["user_id"])
  table = RawTable({c: np.array(v, dtype=object if isinstance(v[0], str) else None)
                    for c, v in cols.items()}, np.zeros(n, np.int32), np.arange(1, n + 1),
                   ["rows"])
  add_cf_columns(str(workdir), transform, table)
  return transform.apply(table, require_label=False)[0]["dense"]


def test_served_and_predicted_rows_equal_the_prepared_ones(run):
  workdir, model_dir, config, data, table, probs = run
  assert (workdir / cf.STATE_FILE).exists()  # carried by the run, not only by the cache
  test = data.splits["test"][:64]  # synthetic data skips no row: prepared index == raw index
  cols = _columns(table, test)
  prepared = np.asarray(data.arrays["dense"])[test]
  # predict: same cf_* (bit for bit) and the same probabilities as the prepared test rows.
  np.testing.assert_array_equal(_offline_dense(workdir, cols), prepared)
  np.testing.assert_allclose(Run.open(str(workdir)).predict(cols), probs[:64], atol=1e-6)
  # serve: the exported version computes them itself from user and item ids.
  model = pred_lib.load(str(model_dir))
  assert model.manifest["collaborative"]["file"] == cf.STATE_FILE
  served, dense = _served(model, cols)
  np.testing.assert_array_equal(dense, prepared)
  np.testing.assert_allclose(served, probs[:64], atol=1e-6)
  # cf_* are computed, never sent: a request carrying one is refused, not silently used.
  bad = _requests(cols)[0]
  bad["items"][0]["cf_baseline"] = 4.0
  with pytest.raises(pred_lib.RequestError, match="cf_baseline"):
    model.parse(bad)


def test_new_users_and_items_fall_back_the_same_online_and_offline(run):
  workdir, model_dir, _, data, table, _ = run
  model = pred_lib.load(str(model_dir))
  state = cf.CFModel.load(str(workdir / cf.STATE_FILE))
  rows = data.splits["test"][:16]
  names = list(cf.FEATURES)
  j = {n: names.index(n) for n in names}
  for replace in ({"user_id": "never-seen-user"}, {"item_id": "never-seen-item"},
                  {"user_id": "never-seen-user", "item_id": "never-seen-item"}):
    cols = _columns(table, rows, **replace)
    served, dense = _served(model, cols)
    np.testing.assert_array_equal(dense, _offline_dense(workdir, cols))
    np.testing.assert_allclose(Run.open(str(workdir)).predict(cols), served, atol=1e-6)
    raw = cf.score(state, state.user_ids(cols["user_id"]), state.item_ids(cols["item_id"]))
    item = state.item_bias[state.item_ids(cols["item_id"])]
    user = state.user_bias[state.user_ids(cols["user_id"])]
    if "user_id" in replace:  # no user signal; the item's own (bias, count) stays
      assert np.all(raw[:, [j["cf_user_bias"], j["cf_item_knn"], j["cf_user_knn"],
                            j["cf_svd"], j["cf_user_count"]]] == 0)
    if "item_id" in replace:
      assert np.all(raw[:, [j["cf_item_bias"], j["cf_item_knn"], j["cf_user_knn"],
                            j["cf_svd"], j["cf_item_count"]]] == 0)
    np.testing.assert_allclose(raw[:, j["cf_baseline"]], state.mu + user + item)
    if len(replace) == 1:  # the other side's knowledge is used, not thrown away
      known = "cf_item_count" if "user_id" in replace else "cf_user_count"
      assert np.all(raw[:, j[known]] > 0)


def test_update_refits_the_state_on_the_new_events(run, tmp_path):
  workdir, model_dir, _, data, table, _ = run
  before = cf.CFModel.load(str(workdir / cf.STATE_FILE))
  # New events: 300 test rows (never in the CF fit), 60 of them by a user never seen before.
  rows = data.splits["test"][-300:]
  events = tmp_path / "events.csv"
  with open(events, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(COLS)
    for k, i in enumerate(rows):
      row = [table.columns[c][i] for c in COLS]
      if k < 60:
        row[0] = "cf-new-user"
      w.writerow(row)
  cols = _columns(table, rows[60:80])
  cols_new = _columns(table, rows[:20], user_id="cf-new-user")
  old = cf.score(before, before.user_ids(cols["user_id"]), before.item_ids(cols["item_id"]))
  assert cli.main(["update", "--workdir", str(workdir), "--data", str(events), "--out",
                   str(model_dir), "--buckets", "8"]) == 0
  after = cf.CFModel.load(str(workdir / cf.STATE_FILE))
  assert len(after.values) == len(before.values) + 300
  assert after.meta["applied"] == [json.load(open(workdir / "transform.json"))
                                   ["updates"][0]["fingerprint"]]
  # The events are in: the new user has a CF id and counts; known users' counts grew by
  # their event rows; and the state equals a fit from scratch on old + new interactions.
  new_uid = after.user_ids(["cf-new-user"])[0]
  assert new_uid >= len(before.user_bias) and after.user_count[new_uid] == 60
  uid = after.user_ids(cols["user_id"])
  extra = np.array([sum(table.columns["user_id"][i] == u for i in rows[60:])
                    for u in cols["user_id"]])
  np.testing.assert_array_equal(after.user_count[uid], before.user_count[uid] + extra)
  events_u = np.concatenate([[new_uid] * 60, after.user_ids(table.columns["user_id"][rows[60:]])])
  scratch = cf.fit(np.concatenate([before.users, events_u]),
                   np.concatenate([before.items, after.item_ids(table.columns["item_id"][rows])]),
                   np.concatenate([before.values, table.columns["label"][rows].astype(float)]),
                   len(after.user_bias), len(after.item_bias),
                   types.SimpleNamespace(**before.meta["config"]),
                   seed=before.meta["seed"])
  new = cf.score(after, uid, after.item_ids(cols["item_id"]))
  np.testing.assert_array_equal(new, cf.score(scratch, uid, after.item_ids(cols["item_id"])))
  assert not np.allclose(new, old)
  # predict and the exported update (v0002) both use the refitted state, identically.
  model = pred_lib.load(str(model_dir))
  assert model.version == "v0002"
  for c in (cols, cols_new):
    np.testing.assert_array_equal(_served(model, c)[1], _offline_dense(workdir, c))
  raw = cf.score(after, after.user_ids(cols_new["user_id"]), after.item_ids(cols_new["item_id"]))
  assert np.all(raw[:, cf.FEATURES.index("cf_user_count")] == np.log1p(60))
  # A rerun of the same update adds nothing (the state records the events' fingerprint).
  blob = (workdir / cf.STATE_FILE).read_bytes()
  assert cli.main(["update", "--workdir", str(workdir), "--data", str(events)]) == 0
  assert (workdir / cf.STATE_FILE).read_bytes() == blob
  # A rerun after a kill between the state's write and transform.json refits nothing twice.
  fingerprint = after.meta["applied"][0]
  again = cf.refit(after, None, None, None, "user_id", "item_id", fingerprint)
  assert again is after
