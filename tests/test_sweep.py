"""Vectorised sweeps (train/sweep.py): replicas trained as one vmapped program are the same
runs as separate ones, in ordinary work dirs, and resume exactly."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from helpers import SYNTHETIC, TINY
from mscenario.flat import flatten
from mscenario import config as config_lib
from mscenario.api import Run
from mscenario.data.schema import FeatureSchema, MultiFeature, SparseFeature
from mscenario.errors import ConfigError
from mscenario.train import loop, sweep

SEEDS = (5, 6)
RATES = (1e-3, 3e-3)
SMOOTH = "--config.model.activation=gelu"


def _config(tmp_path, *extra):
  return config_lib.load_config(SYNTHETIC, [*TINY, f"--config.data.cache_dir={tmp_path}/cache",
                                            *extra])


def _params(workdir: str, which: str) -> dict:
  state = Run.open(workdir).state(which)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(state)}


def test_sweep_equals_separate_runs_and_resumes(tmp_path):
  """Interrupted after epoch 1's last step (before its validation) and resumed, each replica
  ends with its separate run's results.json and parameters, to rounding.

  Not bit for bit: XLA compiles the replica axis into a differently shaped program and sums
  some reductions in another order (1-ulp differences from the first steps, measured even for
  a one-replica sweep and for lax.map instead of vmap; <= 1.2e-7 in every parameter after 62
  steps, <= 1e-8 in any metric). GELU keeps those ulps from crossing a ReLU kink and growing
  (see test_sharding.py)."""
  swept_keys = (f"--config.sweep.seed={','.join(map(str, SEEDS))}",
                f"--config.sweep.learning_rate={','.join(map(str, RATES))}")
  cfg = _config(tmp_path, *swept_keys, "--config.train.stop_after_steps=31", SMOOTH)
  assert sweep.train(cfg, str(tmp_path / "sweep"), log=lambda *_: None) == []
  cfg = _config(tmp_path, *swept_keys, SMOOTH)
  swept = sweep.train(cfg, str(tmp_path / "sweep"), log=lambda *_: None)
  summary = json.load(open(tmp_path / "sweep" / sweep.SWEEP_FILE))
  names = [f"seed={s},learning_rate={r}" for s, r in zip(SEEDS, RATES)]
  assert summary["replicas"] == names
  assert summary["test_auc"]["values"] == [r["overall"]["auc"] for r in swept]
  for seed, rate, name in zip(SEEDS, RATES, names):
    loop.train(_config(tmp_path, f"--config.seed={seed}", f"--config.train.learning_rate={rate}",
                       SMOOTH), str(tmp_path / f"alone{seed}"), log=lambda *_: None)
    replica = tmp_path / "sweep" / name
    a = flatten(json.load(open(replica / "results.json")), sep="/")
    b = flatten(json.load(open(tmp_path / f"alone{seed}" / "results.json")), sep="/")
    assert a.keys() == b.keys()
    for k in a:
      if isinstance(a[k], float):
        # AUC and gAUC are rank statistics: a 1e-7 change can swap one near-tied pair of
        # predictions (one pair in s0's ~700 rows moves the AUC by ~1e-6).
        tol = 2e-5 if k.rsplit("/", 1)[-1] in ("auc", "gauc") else 1e-6
        assert abs(a[k] - b[k]) <= tol, (k, a[k], b[k])
      else:
        assert a[k] == b[k], k
    for which in ("best", "latest"):
      pa, pb = _params(str(replica), which), _params(str(tmp_path / f"alone{seed}"), which)
      assert pa.keys() == pb.keys()
      for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # The replicas really differ (their own split, init and batch order).
  assert swept[0]["overall"]["auc"] != swept[1]["overall"]["auc"]


def test_vmap_and_map_agree(tmp_path):
  """The replica axis as vmap (accelerators) and as lax.map (CPU default) trains the same
  replicas: the latest states after 20 steps agree to rounding."""
  seeds = ",".join(map(str, SEEDS))
  for mode in ("vmap", "map"):
    cfg = _config(tmp_path, f"--config.sweep.seed={seeds}", f"--config.sweep.vectorize={mode}",
                  "--config.train.stop_after_steps=20", SMOOTH)
    assert sweep.train(cfg, str(tmp_path / mode), log=lambda *_: None) == []
  for seed in SEEDS:
    a = _params(str(tmp_path / "vmap" / f"seed={seed}"), "latest")
    b = _params(str(tmp_path / "map" / f"seed={seed}"), "latest")
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  with pytest.raises(ConfigError, match="vectorize"):
    sweep.vectorize_mode(_config(tmp_path, "--config.sweep.vectorize=pmap"))


def test_union_layout_round_trip():
  """Each replica's feature blocks land at the union offsets, alignment rows after them."""
  a = FeatureSchema(sparse=(SparseFeature("u", 5), SparseFeature("i", 9)),
                    multi=(MultiFeature("g", 4, 3),), dense=(), scenario_names=("x",))
  b = FeatureSchema(sparse=(SparseFeature("u", 7), SparseFeature("i", 3)),
                    multi=(MultiFeature("g", 4, 3),), dense=(), scenario_names=("x",))
  union = sweep.union_schema([a, b])
  assert [f.vocab_size for f in (*union.sparse, *union.multi)] == [7, 9, 4]
  assert union.table_rows % 256 == 0
  for schema in (a, b):
    rows = sweep.row_map(schema, union)
    assert len(rows) == schema.table_rows and len(set(rows.tolist())) == len(rows)
    for f, own, off in zip((*schema.sparse, *schema.multi), schema.embedding_offsets,
                           union.embedding_offsets):
      np.testing.assert_array_equal(rows[own:own + f.vocab_size], off + np.arange(f.vocab_size))
    table = np.random.default_rng(0).normal(size=(schema.table_rows, 2)).astype(np.float32)
    state = {"params": {"embedding": {"table": table}, "dense": np.ones(3)}}
    target = {"params": {"embedding": {"table": np.zeros((union.table_rows, 2))},
                         "dense": np.ones(3)}}
    moved = sweep.to_union(state, rows, target)
    assert moved["params"]["embedding"]["table"].shape == (union.table_rows, 2)
    back = sweep.from_union(moved, rows)
    np.testing.assert_array_equal(back["params"]["embedding"]["table"], table)
    unused = np.setdiff1d(np.arange(union.table_rows), rows)
    assert not np.asarray(moved["params"]["embedding"]["table"])[unused].any()


def test_bad_sweeps_are_clear_errors(tmp_path):
  cfg = _config(tmp_path, "--config.sweep.seed=(1,1)")
  with pytest.raises(ConfigError, match="same run"):
    sweep.sweep_values(cfg)
  cfg = _config(tmp_path)
  with cfg.sweep.unlocked():
    cfg.sweep.dropout = (0.1, 0.2)
  with pytest.raises(ConfigError, match="not sweepable"):
    sweep.sweep_values(cfg)
  with pytest.raises(ConfigError, match="same number"):
    sweep.sweep_values(_config(tmp_path, "--config.sweep.seed=1,2",
                               "--config.sweep.learning_rate=0.1,0.2,0.3"))
  assert sweep.sweep_values(_config(tmp_path)) == {}
  names = [n for n, _ in sweep.replica_configs(_config(tmp_path, "--config.sweep.seed=3,4"))]
  assert names == ["seed=3", "seed=4"]
  assert os.path.basename(names[0]) == "seed=3"
