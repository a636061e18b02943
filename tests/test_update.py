"""Incremental training (`mscenario update`): vocabulary growth into reserved rows, continuing
from the latest checkpoint, and a new exported version per update."""
from __future__ import annotations

import csv
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from ml_collections import ConfigDict

from mscenario import cli
from mscenario.config import load_config
from mscenario.data import schema as schema_lib
from mscenario.data.table import RawTable
from mscenario.data.transform import Transform
from tests.helpers import SYNTHETIC

SMALL = [
    "--config.data.synthetic.num_rows=4000", "--config.data.synthetic.num_users=200",
    "--config.data.synthetic.num_items=100", "--config.model.name=sharedbottom",
    "--config.model.sharedbottom.hidden=(16,)",
    "--config.model.sharedbottom.tower_hidden=(8,)",
    "--config.train.batch_size=256", "--config.train.eval_batch_size=1024",
    "--config.train.epochs=1", "--config.train.log_every_steps=5",
    "--config.data.reserve_fraction=0.1",
    # No weight decay (configs/synthetic.py has 0.1): reserved rows no update uses must stay
    # exactly as initialised, which decoupled decay would shrink.
    "--config.train.weight_decay=0.0",
]
COLS = ["user_id", "item_id", "gender", "region", "category", "age_bucket", "scenario",
        "item_text", "timestamp", "label"]
NEW_USERS = 30  # more than user_id's reserve (10% of ~200): the rest stay OOV


def _table(columns: dict) -> RawTable:
  n = len(next(iter(columns.values())))
  return RawTable({k: np.asarray(v, dtype=object) for k, v in columns.items()},
                  np.zeros(n, np.int32), np.arange(1, n + 1), ["t.csv"])


def _fit(reserve: float) -> Transform:
  config = load_config(SYNTHETIC, [f"--config.data.reserve_fraction={reserve}"])
  config.data.features = ConfigDict({
      "user_id": {"kind": "sparse", "column": "user_id", "min_count": 1},
      "region": {"kind": "sparse", "column": "region", "hash_buckets": 8}})
  table = _table({"user_id": [f"u{i}" for i in range(20)], "region": ["r"] * 20,
                  "scenario": ["s0"] * 20, "label": ["1"] * 20})
  return Transform.fit(table, config.data, np.arange(20), ["s0"])


def test_reserve_sizes_and_default_unchanged():
  plain, reserved = _fit(0.0), _fit(0.1)
  assert plain.state["vocabs"]["user_id"] == {"values": sorted(f"u{i}" for i in range(20))}
  size = lambda t, name: {f.name: f.vocab_size for f in t.schema.sparse}[name]  # noqa: E731
  assert size(plain, "user_id") == 22
  assert size(reserved, "user_id") == 22 + 2
  assert size(reserved, "region") == size(plain, "region") == 10  # hashed: nothing reserved


def test_grow_first_appearance_order_then_oov():
  t = _fit(0.1)  # 2 reserved user rows
  new = _table({"user_id": ["zz", "u3", "aa", "zz", "mm", None], "region": ["r"] * 6,
                "scenario": ["s0"] * 6, "label": ["0"] * 6})
  growth = t.grow(new, update=1)
  assert t.state["vocabs"]["user_id"]["added"] == ["zz", "aa"]  # first seen, not sorted
  assert growth == [{"update": 1, "feature": "user_id", "added": 2, "reserve_left": 0,
                     "oov_values": 1, "oov_rows": 1}]
  assert t.state["vocab_growth"] == growth
  arrays, _, _ = t.apply(new)
  col = [f.name for f in t.schema.sparse].index("user_id")
  ids = arrays["sparse"][:, col].tolist()
  assert ids == [22, 2 + 13, 23, 22, schema_lib.OOV_ID, schema_lib.PAD_ID]  # u3 sorts 14th
  assert t.grow(new, update=2) == [{"update": 2, "feature": "user_id", "added": 0,
                                    "reserve_left": 0, "oov_values": 1, "oov_rows": 1}]


def _write_csv(path, table, rows, rename_users=None):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(COLS)
    for i in rows:
      row = [table.columns[c][i] for c in COLS]
      if rename_users is not None and table.columns["user_id"][i] in rename_users:
        row[0] = f"new{rename_users[table.columns['user_id'][i]]}"
      w.writerow(row)


def _ckpt(workdir, which="ckpt"):
  d = os.path.join(workdir, which)
  step = max(int(x) for x in os.listdir(d) if x.isdigit())
  state = ocp.StandardCheckpointer().restore(os.path.join(d, str(step), "state"))
  return step, np.asarray(state["params"]["embedding"]["table"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("upd")
  with pytest.MonkeyPatch.context() as mp:  # module scope: before conftest's autouse fixture
    mp.setenv("MSCENARIO_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    assert cli.main(["train", "--config", SYNTHETIC, "--workdir", str(workdir), *SMALL]) == 0
  return workdir


def test_update_refuses_without_checkpoint(tmp_path, trained, capsys):
  assert cli.main(["update", "--workdir", str(tmp_path), "--data", "x.csv"]) == 2
  for name in ("config.json", "transform.json"):
    (tmp_path / name).write_text((trained / name).read_text())
  assert cli.main(["update", "--workdir", str(tmp_path), "--data", "x.csv"]) == 2
  assert "holds no checkpoint" in capsys.readouterr().err
  assert not (tmp_path / "ckpt").exists()


def test_update_refuses_private_runs(tmp_path, trained, capsys):
  """A DP run's guarantee covers Poisson-sampled, accounted steps; update takes neither."""
  copy = tmp_path / "run"
  shutil.copytree(trained, copy)
  config = json.loads((copy / "config.json").read_text())
  config["privacy"]["enabled"] = True
  (copy / "config.json").write_text(json.dumps(config))
  assert cli.main(["update", "--workdir", str(copy), "--data", "x.csv"]) == 2
  assert "differentially private" in capsys.readouterr().err


def test_update_grows_trains_and_exports(trained, tmp_path):
  from mscenario.data import synthetic
  workdir = trained
  config = load_config(SYNTHETIC, SMALL)
  table = synthetic.load_raw(config.data)
  before = Transform(json.load(open(workdir / "transform.json")))
  uvocab = before.state["vocabs"]["user_id"]
  reserve = uvocab["reserve"]
  assert reserve == int(np.ceil(0.1 * len(uvocab["values"]))) and uvocab["added"] == []
  step0, table0 = _ckpt(workdir)

  # New events: 1500 rows, the users of NEW_USERS of them renamed to never-seen ids.
  rows = np.arange(len(table.columns["label"]) - 1500, len(table.columns["label"]))
  users = list(dict.fromkeys(table.columns["user_id"][rows].tolist()))[:NEW_USERS]
  events = tmp_path / "events.csv"
  _write_csv(events, table, rows, {u: k for k, u in enumerate(users)})

  model_dir = tmp_path / "model"
  assert cli.main(["export", "--workdir", str(workdir), "--out", str(model_dir),
                   "--buckets", "8"]) == 0
  assert cli.main(["update", "--workdir", str(workdir), "--data", str(events), "--out",
                   str(model_dir), "--buckets", "8", "--holdout", "0.2"]) == 0

  # Continued from the checkpoint: one epoch of ceil(1200 / 256) steps.
  rec = [json.loads(l) for l in open(workdir / "updates.jsonl")][-1]
  assert rec["step_from"] == step0 and rec["train_rows"] == 1200
  step1, table1 = _ckpt(workdir)
  assert step1 == rec["step_to"] == step0 + 5
  assert np.isfinite(rec["holdout_auc_after"])
  # Validated on the holdout against best/ (the same rows): promoted into best/ iff better.
  assert np.isfinite(rec["holdout_auc_best"])
  assert rec["promoted"] == (rec["holdout_auc_after"] > rec["holdout_auc_best"])
  assert (_ckpt(workdir, "best")[0] == step1) == rec["promoted"]

  # Growth recorded; the first `reserve` new users got the reserved rows, the rest OOV.
  after = Transform(json.load(open(workdir / "transform.json")))
  added = after.state["vocabs"]["user_id"]["added"]
  assert added == [f"new{k}" for k in range(reserve)]
  g = [x for x in after.state["vocab_growth"] if x["feature"] == "user_id"]
  assert g == [{"update": 1, "feature": "user_id", "added": reserve, "reserve_left": 0,
                "oov_values": NEW_USERS - reserve, "oov_rows": g[0]["oov_rows"]}]
  assert g[0]["oov_rows"] > 0
  assert after.state["updates"][0]["step_to"] == step1

  # Their rows trained; the item feature's unused reserved rows did not move.
  schema = after.schema
  names = [f.name for f in schema.sparse]
  u_off = schema.embedding_offsets[names.index("user_id")]
  first_new = u_off + schema_lib.FIRST_ID + len(uvocab["values"])
  new_rows = slice(first_new, first_new + reserve)
  assert np.all(np.abs(table1[new_rows] - table0[new_rows]).sum(axis=1) > 0)
  i_idx = names.index("item_id")
  i_vocab = after.state["vocabs"]["item_id"]
  if not i_vocab["added"]:
    lo = schema.embedding_offsets[i_idx] + schema_lib.FIRST_ID + len(i_vocab["values"])
    np.testing.assert_array_equal(table1[lo: lo + i_vocab["reserve"]],
                                  table0[lo: lo + i_vocab["reserve"]])

  # Known rows still score finitely; a new version was exported and made current.
  out = tmp_path / "preds.csv"
  assert cli.main(["predict", "--workdir", str(workdir), "--input", str(events), "--output",
                   str(out)]) == 0
  probs = np.array([float(r["probability"]) for r in csv.DictReader(open(out))])
  assert len(probs) == 1500 and np.all(np.isfinite(probs))
  assert sorted(os.listdir(model_dir / "versions")) == ["v0001", "v0002"]
  assert (model_dir / "CURRENT").read_text().strip() == "v0002"
  exported = json.load(open(model_dir / "versions" / "v0002" / "transform.json"))
  assert exported["vocabs"]["user_id"]["added"] == added
  manifest = json.load(open(model_dir / "versions" / "v0002" / "manifest.json"))
  assert manifest["source"]["step"] == step1 and manifest["source"]["checkpoint"] == "latest"

  # The same command again: a no-op that finds its export done (no third version).
  assert cli.main(["update", "--workdir", str(workdir), "--data", str(events), "--out",
                   str(model_dir), "--buckets", "8", "--holdout", "0.2"]) == 0
  assert sorted(os.listdir(model_dir / "versions")) == ["v0001", "v0002"]
  # Killed after the version was renamed into place but before CURRENT moved: the rerun
  # points CURRENT at it instead of exporting again.
  (model_dir / "CURRENT").write_text("v0001\n")
  assert cli.main(["update", "--workdir", str(workdir), "--data", str(events), "--out",
                   str(model_dir), "--buckets", "8", "--holdout", "0.2"]) == 0
  assert sorted(os.listdir(model_dir / "versions")) == ["v0001", "v0002"]
  assert (model_dir / "CURRENT").read_text().strip() == "v0002"


def test_update_with_sparse_embedding_updates(tmp_path):
  """Row-wise Adagrad keeps the table (and its per-row state) outside the Flax params."""
  from mscenario.data import synthetic
  from mscenario.train.update import update_table
  workdir = tmp_path / "run"
  args = [*SMALL, "--config.train.embed_update=rowwise_adagrad",
          "--config.train.embed_learning_rate=0.05"]
  assert cli.main(["train", "--config", SYNTHETIC, "--workdir", str(workdir), *args]) == 0
  config = load_config(SYNTHETIC, args)
  table = synthetic.load_raw(config.data)
  part = table.take(np.arange(600))
  part.columns["item_id"] = np.where(np.arange(600) < 50, 10_000 + np.arange(600) % 5,
                                     part.columns["item_id"])
  d = workdir / "ckpt"
  step0 = max(int(x) for x in os.listdir(d) if x.isdigit())
  t0 = np.asarray(ocp.StandardCheckpointer().restore(d / str(step0) / "state")["embed"]["table"])
  rec = update_table(str(workdir), part, epochs=2)
  assert rec["step_from"] == step0 and rec["step_to"] == step0 + 2 * 3
  t1 = np.asarray(ocp.StandardCheckpointer().restore(
      d / str(rec["step_to"]) / "state")["embed"]["table"])
  after = Transform(json.load(open(workdir / "transform.json")))
  assert after.state["vocabs"]["item_id"]["added"] == [str(10_000 + k) for k in range(5)]
  names = [f.name for f in after.schema.sparse]
  lo = (after.schema.embedding_offsets[names.index("item_id")] + schema_lib.FIRST_ID
        + len(after.state["vocabs"]["item_id"]["values"]))
  assert np.all(np.abs(t1[lo: lo + 5] - t0[lo: lo + 5]).sum(axis=1) > 0)
  np.testing.assert_array_equal(t1[lo + 5: lo + 8], t0[lo + 5: lo + 8])  # unused reserve


def test_update_is_idempotent_and_survives_a_crash_before_the_vocabularies(tmp_path,
                                                                          monkeypatch):
  """The same events twice: the second is a no-op. A crash after the checkpoint but before
  transform.json: the rerun completes without training again. A later `train` on the work
  dir keeps the grown vocabularies."""
  from mscenario.data import synthetic
  from mscenario.train import update as update_lib
  workdir = tmp_path / "run"
  assert cli.main(["train", "--config", SYNTHETIC, "--workdir", str(workdir), *SMALL]) == 0
  config = load_config(SYNTHETIC, SMALL)
  table = synthetic.load_raw(config.data)
  part = table.take(np.arange(600))
  part.columns["user_id"] = np.where(np.arange(600) < 40, "brand-new-user",
                                     part.columns["user_id"]).astype(object)
  step0, _ = _ckpt(workdir)

  real_complete = update_lib._complete

  def crash(*args, **kwargs):
    raise KeyboardInterrupt("killed between checkpoint and transform.json")
  monkeypatch.setattr(update_lib, "_complete", crash)
  with pytest.raises(KeyboardInterrupt):
    update_lib.update_table(str(workdir), part)
  step1, table1 = _ckpt(workdir)
  assert step1 == step0 + 3  # the checkpoint holds the update ...
  assert "updates" not in json.load(open(workdir / "transform.json"))  # ... the vocab not

  monkeypatch.setattr(update_lib, "_complete", real_complete)
  rec = update_lib.update_table(str(workdir), part)
  assert rec["completed_after_crash"] and rec["step_to"] == step1
  step2, table2 = _ckpt(workdir)
  assert step2 == step1  # no second training on the same events
  np.testing.assert_array_equal(table2, table1)
  after = json.load(open(workdir / "transform.json"))
  assert [u["step_to"] for u in after["updates"]] == [step1]
  assert after["vocabs"]["user_id"]["added"] == ["brand-new-user"]

  again = update_lib.update_table(str(workdir), part)
  assert again["already_applied"] and _ckpt(workdir)[0] == step1
  assert len(json.load(open(workdir / "transform.json"))["updates"]) == 1

  # `train` on the updated work dir (resume: nothing left to train) keeps the vocabularies.
  assert cli.main(["train", "--config", SYNTHETIC, "--workdir", str(workdir), *SMALL]) == 0
  kept = json.load(open(workdir / "transform.json"))
  assert kept["vocabs"]["user_id"]["added"] == ["brand-new-user"] and kept["updates"]


def _arrays(workdir, which):
  d = os.path.join(workdir, which)
  step = max(int(x) for x in os.listdir(d) if x.isdigit())
  state = ocp.StandardCheckpointer().restore(os.path.join(d, str(step), "state"))
  return step, [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


def _same(a, b):
  return a[0] == b[0] and len(a[1]) == len(b[1]) and all(
      np.array_equal(x, y) for x, y in zip(a[1], b[1]))


def test_update_keeps_the_validated_best_and_train_and_update_interleave(tmp_path):
  """best/ is the validated model: an update without --holdout continues only the latest
  lineage, so eval/predict/export keep the validated model and `train` on the updated work
  dir reports the same results.json. Then train after update (more epochs: continues the
  updated model), update after train and update after update chain on one latest lineage."""
  from mscenario.data import synthetic
  from mscenario.train.update import update_table
  workdir = tmp_path / "run"
  assert cli.main(["train", "--config", SYNTHETIC, "--workdir", str(workdir), *SMALL]) == 0
  best0, results0 = _arrays(workdir, "best"), (workdir / "results.json").read_text()
  table = synthetic.load_raw(load_config(SYNTHETIC, SMALL).data)

  rec1 = update_table(str(workdir), table.take(np.arange(600)))
  assert not rec1["promoted"] and _ckpt(workdir)[0] == rec1["step_to"] > best0[0]
  assert _same(_arrays(workdir, "best"), best0)
  assert cli.main(["train", "--config", SYNTHETIC, "--workdir", str(workdir), *SMALL]) == 0
  assert (workdir / "results.json").read_text() == results0
  assert _ckpt(workdir)[0] == rec1["step_to"]

  # Train after update: a second epoch on the original data continues the updated model.
  assert cli.main(["train", "--config", SYNTHETIC, "--workdir", str(workdir), *SMALL,
                   "--config.train.epochs=2"]) == 0
  step2 = _ckpt(workdir)[0]
  assert step2 == rec1["step_to"] + best0[0]  # one epoch's steps (best0: after epoch 1)
  kept = json.load(open(workdir / "transform.json"))
  assert [u["update"] for u in kept["updates"]] == [1]
  # Update after train, then update after update: each continues the latest step.
  rec2 = update_table(str(workdir), table.take(np.arange(600, 1200)))
  rec3 = update_table(str(workdir), table.take(np.arange(1200, 1500)))
  assert (rec2["update"], rec2["step_from"]) == (2, step2)
  assert (rec3["update"], rec3["step_from"]) == (3, rec2["step_to"])
  assert _ckpt(workdir)[0] == rec3["step_to"]
  records = [json.loads(line) for line in open(workdir / "updates.jsonl")]
  assert [r["update"] for r in records] == [1, 2, 3]
  after = json.load(open(workdir / "transform.json"))
  assert [u["step_to"] for u in after["updates"]] == [r["step_to"] for r in records]
