"""Preparation: protocol numbers on real ML-100K, splits, fitted vocabularies, cache, features."""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest
from ml_collections import ConfigDict

from mscenario import config as config_lib
from mscenario.data import prepare as prepare_lib
from mscenario.data import schema as schema_lib
from mscenario.data import sources
from mscenario.data.transform import as_str_column

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAR_CONFIG = os.path.join(ROOT, "configs", "ml100k_star.py")
QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("MSCENARIO_CACHE", str(tmp_path / "cache"))


def ml100k_config(shared_data, *overrides):
  root = shared_data / "movielens" / "ml-100k"
  return config_lib.load_config(STAR_CONFIG, [f"--config.data.root={root}", *overrides])


@functools.lru_cache(maxsize=None)
def _raw_table(root: str):
  cfg = config_lib.load_config(STAR_CONFIG, [f"--config.data.root={root}"])
  return sources.load_source(cfg.data)


def ml100k_table(shared_data):
  return _raw_table(str(shared_data / "movielens" / "ml-100k"))


def sparse_column(data, name):
  names = [f.name for f in data.schema.sparse]
  return np.asarray(data.arrays["sparse"][:, names.index(name)])


# ---------------------------------------------------------------------------- ML-100K protocol
def test_ml100k_protocol_numbers(shared_data):
  data = prepare_lib.prepare(ml100k_config(shared_data), log=QUIET)
  assert data.meta["num_rows"] == 100_000
  assert len(data.arrays["label"]) == 100_000
  names = data.schema.scenario_names
  assert set(names) == {"young", "adult", "senior"}
  scenario = np.asarray(data.arrays["scenario"])
  label = np.asarray(data.arrays["label"])
  expected = {"young": (26_551, 0.536), "adult": (35_444, 0.541), "senior": (38_005, 0.578)}
  for name, (rows, rate) in expected.items():
    mask = scenario == names.index(name)
    assert mask.sum() == rows, name
    assert label[mask].mean() == pytest.approx(rate, abs=1e-3), name
  # The per-split summary in meta adds up to the same counts.
  for name, (rows, _) in expected.items():
    assert sum(data.meta["splits"][s]["scenarios"][name]["rows"]
               for s in prepare_lib.SPLITS) == rows
  # Random 8:1:1 split: disjoint, covering every row once.
  sizes = {s: len(data.splits[s]) for s in prepare_lib.SPLITS}
  assert sizes == {"train": 80_000, "valid": 10_000, "test": 10_000}
  allrows = np.concatenate([data.splits[s] for s in prepare_lib.SPLITS])
  np.testing.assert_array_equal(np.sort(allrows), np.arange(100_000))
  # Batch-contract dtypes and id conventions.
  assert data.arrays["sparse"].dtype == np.int32 and data.arrays["sparse"].shape == (100_000, 6)
  assert data.arrays["dense"].dtype == np.float32
  assert (np.asarray(data.arrays["sparse"]) >= schema_lib.OOV_ID).all()  # nothing missing
  assert set(np.unique(label)) == {0.0, 1.0}


def test_random_split_reproducible_by_seed(shared_data):
  table = ml100k_table(shared_data)
  d = ml100k_config(shared_data).data
  a = prepare_lib.split_rows(table, d, seed=7)
  b = prepare_lib.split_rows(table, d, seed=7)
  c = prepare_lib.split_rows(table, d, seed=8)
  for s in prepare_lib.SPLITS:
    np.testing.assert_array_equal(a[s], b[s])
  assert not np.array_equal(a["test"], c["test"])
  assert len(np.intersect1d(a["test"], c["test"])) < 2_000  # ~10% overlap expected by chance
  # Through prepare: data.split.seed picks the split and is part of the fingerprint.
  p1 = prepare_lib.prepare(ml100k_config(shared_data, "--config.data.split.seed=7"), log=QUIET)
  p2 = prepare_lib.prepare(ml100k_config(shared_data, "--config.data.split.seed=8"), log=QUIET)
  assert p1.path != p2.path
  for s in prepare_lib.SPLITS:
    np.testing.assert_array_equal(p1.splits[s], a[s])
    np.testing.assert_array_equal(p2.splits[s], c[s])


def test_vocab_fitted_on_train_only(shared_data):
  table = ml100k_table(shared_data)
  raw_item = as_str_column(table.columns["item_id"])
  data = prepare_lib.prepare(ml100k_config(shared_data), log=QUIET)
  assert data.meta["num_rows"] == table.num_rows  # nothing dropped: rows line up with table
  train_items = set(raw_item[data.splits["train"]].tolist())
  test = data.splits["test"]
  unseen = np.array([raw_item[i] not in train_items for i in test])
  assert unseen.any(), "ML-100K test split should hold items never seen in training"
  ids = sparse_column(data, "item_id")
  assert (ids[test[unseen]] == schema_lib.OOV_ID).all()
  assert (ids[test[~unseen]] >= schema_lib.FIRST_ID).all()
  assert (ids[data.splits["train"]] >= schema_lib.FIRST_ID).all()
  item_feature = [f for f in data.schema.sparse if f.name == "item_id"][0]
  assert item_feature.vocab_size == len(train_items) + schema_lib.FIRST_ID

  everything = prepare_lib.prepare(ml100k_config(shared_data, "--config.data.fit_on=all"),
                                   log=QUIET)
  assert everything.path != data.path
  ids_all = sparse_column(everything, "item_id")
  np.testing.assert_array_equal(everything.splits["test"], test)
  assert (ids_all[test[unseen]] >= schema_lib.FIRST_ID).all()
  assert len(np.unique(ids_all[test[unseen]])) == len(set(raw_item[test[unseen]].tolist()))


def test_cache_reused_and_keyed_by_settings(shared_data, monkeypatch):
  first = prepare_lib.prepare(ml100k_config(shared_data), log=QUIET)
  assert first.path.startswith(os.environ["MSCENARIO_CACHE"])
  real_load_source = sources.load_source

  def boom(_):
    raise AssertionError("prepare rebuilt instead of reusing the cache")
  monkeypatch.setattr(sources, "load_source", boom)
  second = prepare_lib.prepare(ml100k_config(shared_data), log=QUIET)
  assert second.path == first.path and second.fingerprint == first.fingerprint
  np.testing.assert_array_equal(second.arrays["label"], first.arrays["label"])
  assert isinstance(second.arrays["sparse"], np.memmap)

  # Another label rule is another dataset: new fingerprint, so a rebuild (which now fails).
  other = ml100k_config(shared_data, "--config.data.label.rule=>= 3")
  assert prepare_lib.fingerprint(other.data, other.seed) != first.fingerprint
  with pytest.raises(AssertionError, match="rebuilt"):
    prepare_lib.prepare(other, log=QUIET)
  # The data root is not part of the fingerprint (same files, same dataset).
  moved = ml100k_config(shared_data)
  moved.data.root = str(shared_data / "movielens" / "ml-100k") + "/"
  assert prepare_lib.fingerprint(moved.data, moved.seed) == first.fingerprint

  monkeypatch.setattr(sources, "load_source", real_load_source)
  rebuilt = prepare_lib.prepare(other, log=QUIET)
  assert rebuilt.path != first.path
  assert np.asarray(rebuilt.arrays["label"]).mean() > np.asarray(first.arrays["label"]).mean()


# ---------------------------------------------------------------------------- other splits
def test_temporal_split(shared_data):
  table = ml100k_table(shared_data)
  d = ml100k_config(shared_data, "--config.data.split.kind=temporal").data
  parts = prepare_lib.split_rows(table, d, seed=0)
  t = np.asarray(table.columns["timestamp"], np.float64)
  assert [len(parts[s]) for s in prepare_lib.SPLITS] == [80_000, 10_000, 10_000]
  assert t[parts["train"]].max() <= t[parts["valid"]].min()
  assert t[parts["valid"]].max() <= t[parts["test"]].min()
  # Temporal splits ignore the seed.
  again = prepare_lib.split_rows(table, d, seed=123)
  np.testing.assert_array_equal(again["test"], parts["test"])


def test_leave_last_out_split(shared_data):
  table = ml100k_table(shared_data)
  d = ml100k_config(shared_data, "--config.data.split.kind=leave_last_out").data
  parts = prepare_lib.split_rows(table, d, seed=0)
  t = np.asarray(table.columns["timestamp"], np.float64)
  users = as_str_column(table.columns["user_id"])
  assert len(np.unique(users)) == 943
  assert len(parts["test"]) == len(parts["valid"]) == 943  # every ML-100K user has >= 20 rows
  assert sum(len(p) for p in parts.values()) == table.num_rows
  latest = {}
  for i in np.argsort(t, kind="stable"):  # the last write per user wins: latest timestamp
    latest[users[i]] = i
  train_t_max = {}
  for i in parts["train"]:
    train_t_max[users[i]] = max(train_t_max.get(users[i], -np.inf), t[i])
  test_user = {users[i]: i for i in parts["test"]}
  valid_user = {users[i]: i for i in parts["valid"]}
  assert len(test_user) == len(valid_user) == 943  # exactly one row per user each
  for u, i in test_user.items():
    assert t[i] == t[latest[u]]
    assert t[valid_user[u]] <= t[i]
    assert train_t_max[u] <= t[valid_user[u]]


def test_leave_last_out_keeps_short_users_in_train(tmp_path):
  rows = ["user_id,item_id,scenario,click,timestamp"]
  rows += [f"u1,i{k},a,{k % 2},{100 - k}" for k in range(4)]  # latest is i0, then i1
  rows += ["u2,i1,a,1,5", "u2,i2,b,0,6"]                      # two rows: all train
  path = tmp_path / "t.csv"
  path.write_text("\n".join(rows) + "\n")
  cfg = table_config(path, "--config.data.split.kind=leave_last_out")
  table = sources.load_source(cfg.data)
  parts = prepare_lib.split_rows(table, cfg.data, seed=0)
  assert parts["test"].tolist() == [0] and parts["valid"].tolist() == [1]
  assert parts["train"].tolist() == [2, 3, 4, 5]


# ---------------------------------------------------------------------------- feature transforms
def table_config(path, *overrides, features=None):
  c = config_lib.base_config()
  d = c.data
  d.source = "table"
  d.name = "tiny"
  d.table.train = str(path)
  d.features = ConfigDict(features or {
      "user_id": {"kind": "sparse", "column": "user_id"},
      "item_id": {"kind": "sparse", "column": "item_id"}})
  d.scenario = ConfigDict({"field": "scenario", "groups": {}, "descriptions": {}})
  d.label = ConfigDict({"field": "click", "rule": "binary"})
  return config_lib.apply_overrides(c, overrides)


def _write_feature_table(path):
  """40 rows: items c0..c3 common, r0/r1 once each; price with two blanks; '|' tags."""
  tags = ["a|b", "", "a", "b|c|d|e", "e|a"]
  lines = ["user_id,item_id,scenario,click,price,tags"]
  for k in range(40):
    item = f"r{k - 38}" if k >= 38 else f"c{k % 4}"
    price = "" if k in (5, 17) else f"{(k * 7) % 13 + 0.5}"
    lines.append(f"u{k % 6},{item},{'ab'[k % 2]},{k % 3 == 0:d},{price},{tags[k % 5]}")
  path.write_text("\n".join(lines) + "\n")
  return tags


def test_hash_buckets_stable_ids(tmp_path):
  path = tmp_path / "h.csv"
  path.write_text("user_id,item_id,scenario,click\n" + "".join(
      f"u{k},{'i1' if k % 2 else 'zz'},a,{k % 2}\n" for k in range(20)))
  cfg = table_config(path, features={
      "item_h": {"kind": "sparse", "column": "item_id", "hash_buckets": 7},
      "user_h": {"kind": "sparse", "column": "user_id", "hash_buckets": 1000}})
  data = prepare_lib.prepare(cfg, log=QUIET)
  sizes = {f.name: f.vocab_size for f in data.schema.sparse}
  assert sizes == {"item_h": 9, "user_h": 1002}
  item = sparse_column(data, "item_h")
  user = sparse_column(data, "user_h")
  assert ((item >= 2) & (item < 9)).all() and ((user >= 2) & (user < 1002)).all()
  # Precomputed (crc32 % buckets + 2): the same in every process, unlike Python's hash().
  assert set(item[0::2].tolist()) == {6}   # 'zz'
  assert set(item[1::2].tolist()) == {5}   # 'i1'
  # A hashed vocabulary applies to unseen values too (no OOV).
  arrays, _, _ = data.transform.apply(_one_row_table("i2"))
  assert arrays["sparse"][0, 0] == 5  # crc32('i2') % 7 + 2


def _one_row_table(item):
  from mscenario.data.table import RawTable
  obj = lambda v: np.array([v], dtype=object)  # noqa: E731
  return RawTable(columns={"user_id": obj("u1"), "item_id": obj(item), "scenario": obj("a"),
                           "click": np.array([1.0])},
                  row_file=np.zeros(1, np.int32), row_line=np.ones(1, np.int64), files=["x"])


def test_min_count_dense_and_multi(tmp_path):
  path = tmp_path / "f.csv"
  tags = _write_feature_table(path)
  features = {
      "item_id": {"kind": "sparse", "column": "item_id", "min_count": 2},
      "price": {"kind": "dense", "column": "price", "default": 3.0, "normalize": "standard"},
      "tags": {"kind": "multi", "column": "tags", "max_len": 3},
  }
  data = prepare_lib.prepare(table_config(path, features=features), log=QUIET)
  assert data.meta["num_rows"] == 40
  train = data.splits["train"]
  assert len(train) == 32

  # min_count: items seen once ('r0', 'r1', rows 38, 39) -> OOV, when they are in train or not.
  item = sparse_column(data, "item_id")
  assert (item[38:] == schema_lib.OOV_ID).all()
  assert (item[:38] >= schema_lib.FIRST_ID).all()
  commons = {f"c{k}" for k in range(4)}
  seen = {f"c{k % 4}" for k in train if k < 38}
  assert seen <= commons
  vocab = [f for f in data.schema.sparse if f.name == "item_id"][0].vocab_size
  assert vocab == len(seen) + schema_lib.FIRST_ID

  # Dense: standardised with train-only statistics, missing -> default + indicator column.
  assert data.schema.dense == ("price", "price__missing")
  raw = np.array([np.nan if k in (5, 17) else (k * 7) % 13 + 0.5 for k in range(40)])
  fit = raw[train][~np.isnan(raw[train])]
  mean, std = fit.mean(), fit.std()
  all_mean = np.nanmean(raw)
  assert abs(mean - all_mean) > 1e-6, "test needs train stats to differ from all-row stats"
  dense = np.asarray(data.arrays["dense"])
  expected = (np.where(np.isnan(raw), 3.0, raw) - mean) / std
  np.testing.assert_allclose(dense[:, 0], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(dense[:, 1], np.isnan(raw).astype(np.float32))

  # Multi-valued: sorted vocabulary a..e -> 2..6, padded with 0, truncated to max_len 3.
  assert data.schema.multi[0].max_len == 3
  multi = np.asarray(data.arrays["multi"])
  assert multi.shape == (40, 1, 3)
  ids = {t: k + schema_lib.FIRST_ID for k, t in enumerate("abcde")}
  train_tokens = {t for k in train for t in tags[k % 5].split("|") if t}
  for k in range(40):
    want = [ids[t] if t in train_tokens else schema_lib.OOV_ID
            for t in tags[k % 5].split("|") if t][:3]
    want += [schema_lib.PAD_ID] * (3 - len(want))
    assert multi[k, 0].tolist() == want, (k, tags[k % 5])
  assert multi[3, 0].tolist() == [ids["b"], ids["c"], ids["d"]]  # 'b|c|d|e' truncated
  assert multi[1, 0].tolist() == [0, 0, 0]                        # empty -> all padding


def test_multi_default_max_len_is_longest(tmp_path):
  path = tmp_path / "f.csv"
  _write_feature_table(path)
  features = {"tags": {"kind": "multi", "column": "tags"}}
  data = prepare_lib.prepare(table_config(path, "--config.data.fit_on=all",
                                          features=features), log=QUIET)
  assert data.schema.multi[0].max_len == 4
  assert data.schema.multi[0].vocab_size == 5 + schema_lib.FIRST_ID
  assert np.asarray(data.arrays["multi"])[3, 0].tolist() == [3, 4, 5, 6]


def test_split_follows_config_seed_when_split_seed_unset(shared_data):
  # data.split.seed=-1 (the default) means "use config.seed": the cache must not hand a run
  # with seed 2 the split that a run with seed 1 prepared earlier.
  a = prepare_lib.prepare(ml100k_config(shared_data, "--config.seed=1"), log=QUIET)
  b = prepare_lib.prepare(ml100k_config(shared_data, "--config.seed=2"), log=QUIET)
  assert a.path != b.path
  assert not np.array_equal(a.splits["test"], b.splits["test"])
  table = ml100k_table(shared_data)
  d = ml100k_config(shared_data).data
  np.testing.assert_array_equal(b.splits["test"], prepare_lib.split_rows(table, d, 2)["test"])
  # An explicit split seed wins over config.seed (and then config.seed does not matter).
  c = prepare_lib.prepare(ml100k_config(shared_data, "--config.seed=1",
                                        "--config.data.split.seed=2"), log=QUIET)
  np.testing.assert_array_equal(c.splits["test"], b.splits["test"])
