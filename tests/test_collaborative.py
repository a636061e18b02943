"""Collaborative features (data/collaborative.py): no leakage, a brute-force reference, and
their place in the prepared data (dense columns, fingerprint, predict-time columns)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from ml_collections import ConfigDict

from mscenario import config as config_lib
from mscenario.data import collaborative as cf
from mscenario.data import prepare as prepare_lib
from mscenario.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = lambda *_: None  # noqa: E731


def small_cfg(**kw) -> ConfigDict:
  c = config_lib.base_config().data.collaborative
  c.update({"neighbors": 3, "svd_rank": 2, "chunk_rows": 4, "folds": 3, **kw})
  return c


def world(seed=0, n_users=12, n_items=10, density=0.5):
  """A small random ratings world: each (user, item) pair at most once, stars 1-5."""
  rng = np.random.default_rng(seed)
  pairs = np.argwhere(rng.random((n_users, n_items)) < density)
  users, items = pairs[:, 0], pairs[:, 1]
  stars = rng.integers(1, 6, len(users)).astype(np.float64)
  order = rng.permutation(len(users))
  return users[order], items[order], stars[order], n_users, n_items


def split(n, seed=1):
  idx = np.random.default_rng(seed).permutation(n)
  cut = int(0.7 * n)
  return np.sort(idx[:cut]), np.sort(idx[cut:])


# ---------------------------------------------------------------------------- leakage
def test_training_row_features_ignore_its_own_rating():
  users, items, stars, nu, ni = world()
  train, _ = split(len(users))
  cfg = small_cfg()
  base, _ = cf.compute(users, items, stars, train, nu, ni, cfg, seed=3, log=QUIET)
  for row in train[:8]:
    changed = stars.copy()
    changed[row] = 6 - changed[row] if changed[row] != 3 else 5.0
    feats, _ = cf.compute(users, items, changed, train, nu, ni, cfg, seed=3, log=QUIET)
    np.testing.assert_allclose(feats[row], base[row], atol=1e-10)
    # ... while other rows (in other folds) do see it: the change is not a no-op.
    assert not np.allclose(feats, base)


def test_heldout_features_ignore_heldout_labels():
  users, items, stars, nu, ni = world(seed=4)
  train, held = split(len(users), seed=5)
  base, _ = cf.compute(users, items, stars, train, nu, ni, small_cfg(), seed=0, log=QUIET)
  changed = stars.copy()
  changed[held] = np.random.default_rng(9).integers(1, 6, len(held))
  feats, _ = cf.compute(users, items, changed, train, nu, ni, small_cfg(), seed=0, log=QUIET)
  np.testing.assert_array_equal(feats, base)


# ---------------------------------------------------------------------------- reference
def reference(users, items, stars, fit_rows, query_u, query_i, nu, ni, cfg):
  """Brute force, dense loops, straight from the definitions (everything but the SVD)."""
  fu, fi, fr = users[fit_rows], items[fit_rows], stars[fit_rows]
  mu = fr.mean()
  bu, bi = np.zeros(nu), np.zeros(ni)
  for _ in range(cfg.bias_passes):
    bi = np.array([sum(fr[k] - mu - bu[fu[k]] for k in range(len(fr)) if fi[k] == j)
                   / (cfg.shrink_item_bias + (fi == j).sum()) for j in range(ni)])
    bu = np.array([sum(fr[k] - mu - bi[fi[k]] for k in range(len(fr)) if fu[k] == v)
                   / (cfg.shrink_user_bias + (fu == v).sum()) for v in range(nu)])
  z = np.zeros((nu, ni))
  rated = np.zeros((nu, ni), bool)
  for k in range(len(fr)):
    z[fu[k], fi[k]] = fr[k] - mu - bu[fu[k]] - bi[fi[k]]
    rated[fu[k], fi[k]] = True

  def sims(m, mask):
    n = m.shape[0]
    s = np.zeros((n, n))
    for a in range(n):
      for b in range(n):
        na, nb = np.linalg.norm(m[a]), np.linalg.norm(m[b])
        if a != b and na > 0 and nb > 0:
          common = (mask[a] & mask[b]).sum()
          s[a, b] = m[a] @ m[b] / (na * nb) * common / (common + cfg.shrink_similarity)
    top = np.zeros_like(s)
    for a in range(n):  # the K largest, positive only
      for b in np.argsort(-s[a], kind="stable")[:cfg.neighbors]:
        if s[a, b] > 0:
          top[a, b] = s[a, b]
    return top

  s_item, s_user = sims(z.T, rated.T), sims(z, rated)
  out = []
  for u, i in zip(query_u, query_i):
    nb = [j for j in range(ni) if s_item[i, j] > 0 and rated[u, j]]
    item_knn = sum(s_item[i, j] * z[u, j] for j in nb) / (sum(s_item[i, j] for j in nb) + 1)
    nv = [v for v in range(nu) if s_user[u, v] > 0 and rated[v, i]]
    user_knn = sum(s_user[u, v] * z[v, i] for v in nv) / (sum(s_user[u, v] for v in nv) + 1)
    out.append([mu + bu[u] + bi[i], bu[u], bi[i], item_knn, np.log1p(len(nb)), user_knn,
                np.log1p(len(nv))])
  return np.array(out)


def test_out_of_fold_features_equal_brute_force_reference():
  users, items, stars, nu, ni = world(seed=11, n_users=9, n_items=8, density=0.6)
  train, held = split(len(users), seed=2)
  cfg = small_cfg(svd_rank=3)
  feats, _ = cf.compute(users, items, stars, train, nu, ni, cfg, seed=5, log=QUIET)
  fold = cf.fold_of(len(train), cfg.folds, 5)
  counts_u = np.bincount(users[train], minlength=nu)
  counts_i = np.bincount(items[train], minlength=ni)
  cols = [cf.FEATURES.index(n) for n in ("cf_baseline", "cf_user_bias", "cf_item_bias",
                                          "cf_item_knn", "cf_item_knn_support", "cf_user_knn",
                                          "cf_user_knn_support")]
  groups = [(train[fold != f], train[fold == f]) for f in range(cfg.folds)] + [(train, held)]
  for fit_rows, query in groups:
    ref = reference(users, items, stars, fit_rows, users[query], items[query], nu, ni, cfg)
    np.testing.assert_allclose(feats[query][:, cols], ref, rtol=1e-9, atol=1e-12)
    # SVD: the rank-3 reconstruction of the fit rows' residual matrix at the queried pairs.
    z = np.zeros((nu, ni))
    base = ref[:, 0]
    fr = reference(users, items, stars, fit_rows, users[fit_rows], items[fit_rows], nu, ni,
                   cfg)
    z[users[fit_rows], items[fit_rows]] = stars[fit_rows] - fr[:, 0]
    u, s, vt = np.linalg.svd(z)
    recon = (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(feats[query][:, cf.FEATURES.index("cf_svd")],
                               recon[users[query], items[query]], atol=1e-8)
    del base
  np.testing.assert_allclose(feats[:, cf.FEATURES.index("cf_user_count")],
                             np.log1p(counts_u[users]))
  np.testing.assert_allclose(feats[:, cf.FEATURES.index("cf_item_count")],
                             np.log1p(counts_i[items]))


def test_chunking_does_not_change_features():
  users, items, stars, nu, ni = world(seed=7, n_users=30, n_items=20, density=0.3)
  train, _ = split(len(users))
  a, _ = cf.compute(users, items, stars, train, nu, ni, small_cfg(chunk_rows=1), 0, QUIET)
  b, _ = cf.compute(users, items, stars, train, nu, ni, small_cfg(chunk_rows=64), 0, QUIET)
  np.testing.assert_allclose(a, b, atol=1e-10)


def test_unknown_ids_fall_back_to_mu():
  users, items, stars, nu, ni = world()
  m = cf.fit(users, items, stars, nu, ni, small_cfg())
  out = cf.score(m, np.array([nu + 5, -1]), np.array([ni + 2, 0]))
  assert np.all(out[:, 0] == m.mu)
  assert np.all(out[:, [1, 3, 4, 5, 6, 7, 8]] == 0)
  m2 = cf.CFModel.load(m.to_bytes())
  np.testing.assert_array_equal(cf.score(m2, users, items), cf.score(m, users, items))


# ---------------------------------------------------------------------------- prepared data
def ml100k(shared_data, *overrides):
  root = shared_data / "movielens" / "ml-100k"
  return config_lib.load_config(os.path.join(ROOT, "configs", "ml100k_star.py"),
                                [f"--config.data.root={root}", *overrides])


def test_off_by_default_keeps_the_fingerprint(shared_data):
  off = ml100k(shared_data)
  assert off.data.collaborative.enabled is False
  key = off.data.to_dict()
  key.pop("collaborative")
  with_key = prepare_lib.fingerprint(off.data, off.seed)
  # Same as a config that never had the subtree (caches built before it stay valid) ...
  stripped = ConfigDict(key)
  assert prepare_lib.fingerprint(stripped, off.seed) == with_key
  # ... and switching it on, or changing one of its settings, is another dataset.
  on = ml100k(shared_data, "--config.data.collaborative.enabled=true")
  on2 = ml100k(shared_data, "--config.data.collaborative.enabled=true",
               "--config.data.collaborative.neighbors=20")
  fps = {with_key, prepare_lib.fingerprint(on.data, on.seed),
         prepare_lib.fingerprint(on2.data, on2.seed)}
  assert len(fps) == 3


@pytest.fixture
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("MSCENARIO_CACHE", str(tmp_path / "cache"))


def test_prepared_ml100k_subset_has_cf_columns_and_predict_needs_them(shared_data, _cache):
  from mscenario.data import sources
  cfg = ml100k(shared_data, "--config.data.collaborative.enabled=true",
               "--config.data.collaborative.neighbors=20",
               "--config.data.collaborative.svd_rank=8")
  data = prepare_lib.prepare(cfg, log=QUIET)
  names = data.schema.dense
  assert names[-len(cf.FEATURES):] == cf.FEATURES and data.schema.num_dense == 1 + len(
      cf.FEATURES)
  dense = np.asarray(data.arrays["dense"])
  assert dense.shape == (100_000, data.schema.num_dense) and np.isfinite(dense).all()
  train = dense[data.splits["train"], 1:]
  np.testing.assert_allclose(train.mean(0), 0, atol=1e-4)
  np.testing.assert_allclose(train.std(0), 1, atol=1e-3)
  assert data.meta["collaborative"]["folds"] == 5
  # Cached with the data, and the reuse gives the same columns.
  again = prepare_lib.prepare(cfg, log=QUIET)
  assert again.path == data.path
  np.testing.assert_array_equal(np.asarray(again.arrays["dense"]), dense)
  # Raw rows without the cf_* columns are refused loudly (never scored with zeros) ...
  table = sources.load_source(cfg.data)
  rows = table.take(np.arange(200))
  with pytest.raises(DataError, match="cf_baseline"):
    data.transform.apply(rows, require_label=False)
  # ... and columns_for from the stored all-training model reproduces the prepared test rows.
  model = cf.CFModel.load(os.path.join(data.path, cf.STATE_FILE))
  test = data.splits["test"][:300]
  raw = table.take(test)  # no skipped rows here, so prepared index == raw index
  for name, col in cf.columns_for(model, data.transform, raw.columns["user_id"],
                                  raw.columns["item_id"]).items():
    raw.columns[name] = col
  arrays, _, _ = data.transform.apply(raw, require_label=False)
  np.testing.assert_allclose(arrays["dense"], dense[test], atol=1e-5)


def test_missing_value_default_is_the_cold_start_fallback():
  """A NaN cf_* value (the server's absent field) means 'no CF knowledge': mu, not 0."""
  from mscenario.data.transform import Transform
  users, items, stars, nu, ni = world()
  train, _ = split(len(users))
  feats, full = cf.compute(users, items, stars, train, nu, ni, small_cfg(), 0, QUIET)
  t = Transform({"dense": {}, "schema": {"dense": []}})
  cf.register(t, feats, train, small_cfg(), full)
  defaults = [t.state["dense"][n]["default"] for n in cf.FEATURES]
  assert defaults[0] == pytest.approx(stars[train].mean()) and defaults[0] > 1
  assert defaults[1:] == [0.0] * (len(cf.FEATURES) - 1)
