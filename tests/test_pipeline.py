"""BatchIterator: fixed shapes, epoch coverage, reproducible order, resume, eval, host shards."""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest

from mscenario import config as config_lib
from mscenario.data import pipeline
from mscenario.data import prepare as prepare_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 3000  # 80,000 train rows -> 26 full batches and 2,000 rows left over
KEYS = pipeline.DEVICE_KEYS + ("row",)


@pytest.fixture(scope="module")
def data(shared_data_module, tmp_path_factory):
  root = shared_data_module / "movielens" / "ml-100k"
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MSCENARIO_CACHE", str(tmp_path_factory.mktemp("cache")))
    cfg = config_lib.load_config(os.path.join(ROOT, "configs", "ml100k_star.py"),
                                 [f"--config.data.root={root}"])
    prepared = prepare_lib.prepare(cfg, log=lambda *_: None)
  # An extra 'row' column (the row's own index) makes every gathered row identifiable.
  arrays = dict(prepared.arrays, row=np.arange(prepared.meta["num_rows"], dtype=np.int64))
  return dataclasses.replace(prepared, arrays=arrays)


@pytest.fixture(scope="module")
def shared_data_module():
  path = os.path.join(os.path.dirname(ROOT), "shared", "data")
  if not os.path.isdir(path):
    pytest.skip(f"shared data not found at {path}")
  from pathlib import Path
  return Path(path)


def train_iter(data, seed=0, **kw):
  return pipeline.BatchIterator(data, "train", B, seed=seed, shuffle=True, drop_last=True,
                                keys=KEYS, **kw)


def rows_of(batches):
  return np.concatenate([b["row"] for b in batches])


def test_fixed_shapes_and_dtypes(data):
  it = train_iter(data)
  assert it.num_batches == 80_000 // B
  schema = data.schema
  expected = {"sparse": ((B, len(schema.sparse)), np.int32),
              "multi": ((B, 0, 0), np.int32),
              "dense": ((B, schema.num_dense), np.float32),
              "scenario": ((B,), np.int32), "label": ((B,), np.float32),
              "item": ((B,), np.int32), "weight": ((B,), np.float32), "row": ((B,), np.int64)}
  n = 0
  for batch in it.epoch(0):
    assert set(batch) == set(expected)
    for k, (shape, dtype) in expected.items():
      assert batch[k].shape == shape and batch[k].dtype == dtype, k
    assert (batch["weight"] == 1).all()
    n += 1
  assert n == it.num_batches
  # Gathered values are the rows' values.
  np.testing.assert_array_equal(batch["label"], np.asarray(data.arrays["label"])[batch["row"]])
  np.testing.assert_array_equal(batch["sparse"], np.asarray(data.arrays["sparse"])[batch["row"]])


def test_epoch_visits_each_train_row_at_most_once(data):
  it = train_iter(data)
  rows = rows_of(it.epoch(0))
  assert len(rows) == it.num_batches * B == 78_000
  assert len(np.unique(rows)) == len(rows)
  assert np.isin(rows, data.splits["train"]).all()
  # The 2,000 rows dropped this epoch differ between epochs (the reshuffle brings them back).
  dropped0 = np.setdiff1d(data.splits["train"], rows)
  dropped1 = np.setdiff1d(data.splits["train"], rows_of(it.epoch(1)))
  assert len(dropped0) == len(dropped1) == 2_000
  assert len(np.intersect1d(dropped0, dropped1)) < 500


def test_order_depends_on_seed_and_epoch_only(data):
  a0 = rows_of(train_iter(data, seed=1).epoch(0))
  a0_again = rows_of(train_iter(data, seed=1).epoch(0))  # a fresh iterator, same (seed, epoch)
  a1 = rows_of(train_iter(data, seed=1).epoch(1))
  b0 = rows_of(train_iter(data, seed=2).epoch(0))
  np.testing.assert_array_equal(a0, a0_again)
  assert not np.array_equal(a0[:B], a1[:B])
  assert not np.array_equal(a0[:B], b0[:B])
  # Rows are shuffled across the whole split, not only within blocks.
  first = np.sort(a0[:B])
  assert first[-1] - first[0] > 90_000


def test_resume_yields_the_tail(data):
  it = train_iter(data)
  full = list(it.epoch(3))
  for start in (0, 1, 17, it.num_batches - 1, it.num_batches):
    tail = list(train_iter(data).epoch(3, start=start))
    assert len(tail) == len(full) - start
    for got, want in zip(tail, full[start:]):
      for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_eval_covers_every_row_once_in_order(data):
  it = pipeline.BatchIterator(data, "valid", B, seed=0, shuffle=False, drop_last=False,
                              keys=KEYS)
  batches = list(it.epoch(0))
  assert it.num_batches == len(batches) == 4  # 10,000 rows: 3 full + 1,000 + padding
  for b in batches:
    assert b["label"].shape == (B,) and b["sparse"].shape[0] == B
  weight = np.concatenate([b["weight"] for b in batches])
  rows = rows_of(batches)
  assert weight.sum() == 10_000
  np.testing.assert_array_equal(weight[:10_000], 1.0)
  np.testing.assert_array_equal(weight[10_000:], 0.0)
  np.testing.assert_array_equal(rows[weight == 1], data.splits["valid"])
  # Same order every epoch.
  np.testing.assert_array_equal(rows_of(it.epoch(5)), rows)


def test_drop_last_refuses_a_split_smaller_than_a_batch(data):
  from mscenario.errors import ConfigError
  with pytest.raises(ConfigError, match="fewer than one batch"):
    pipeline.BatchIterator(data, "valid", 20_000, seed=0, shuffle=True, drop_last=True)


@pytest.mark.parametrize("split,shuffle,drop_last", [("train", True, True),
                                                     ("valid", False, False),
                                                     ("test", True, False)])
def test_host_shards_concatenate_to_the_global_batch(data, split, shuffle, drop_last):
  def make(index, count):
    return pipeline.BatchIterator(data, split, B, seed=5, shuffle=shuffle, drop_last=drop_last,
                                  keys=KEYS, process_index=index, process_count=count)
  single = list(make(0, 1).epoch(2))
  shards = [list(make(p, 2).epoch(2)) for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == len(single)
  for g, p0, p1 in zip(single, *shards):
    for k in g:
      assert p0[k].shape[0] == B // 2
      np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), g[k], err_msg=k)


def test_batch_size_must_divide_over_processes(data):
  from mscenario.errors import ConfigError
  with pytest.raises(ConfigError, match="divisible"):
    pipeline.BatchIterator(data, "train", 3001, seed=0, shuffle=True, drop_last=True,
                           process_count=2)


def test_to_global_and_prefetch(data):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  it = pipeline.BatchIterator(data, "valid", B, seed=0, shuffle=False, drop_last=False)
  want = list(it.epoch(0))
  got = list(pipeline.prefetch(it.epoch(0), lambda b: pipeline.to_global(b, sharding), 2))
  assert len(got) == len(want)
  for g, w in zip(got, want):
    for k in w:
      assert isinstance(g[k], jax.Array) and g[k].shape == w[k].shape
      np.testing.assert_array_equal(np.asarray(g[k]), w[k])


def test_prefetch_surfaces_errors():
  def broken():
    yield 1
    raise ValueError("bad batch")
  out = pipeline.prefetch(broken(), lambda x: x * 2, 2)
  assert next(out) == 2
  with pytest.raises(ValueError, match="bad batch"):
    next(out)
