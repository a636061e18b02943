"""Collaborative-filtering features from the training split's feedback (data.collaborative).

Why: the neural models see ids and a binary label; classic CF on the raw feedback (biases on
the 1-5 stars, neighbourhood scores on the residuals, a low-rank factorisation) carries signal
they leave on the table (issue 14). Computed once in data preparation and appended to the
prepared `dense` array as the columns named in FEATURES, so every model gets them unchanged.

Leakage: a training row's features come from a CF model fitted on the *other* K-1 folds of the
training rows (out of fold), so its own feedback never reaches them; validation and test rows
use the CF model fitted on all training rows. Validation/test feedback is never read. The
training counts (cf_user_count, cf_item_count) count rows, not feedback, so they use all
training rows everywhere (the same distribution in every split).

Online (predict, export/serve, update): the all-training-rows model travels with the run
(STATE_FILE: the work dir, each exported version). Stored compactly: biases, the top-K
neighbour lists, the SVD factors, counts, the raw-id -> CF-id keys and the training
interactions (user, item, feedback); the residual matrix the KNN scores read is rebuilt from
the interactions at load, bit for bit as fitted. `add_columns` computes a raw row's cf_* values
exactly as data preparation did for validation/test rows; `refit` adds `update`'s new events
(new users and items get new CF ids) and fits again on all interactions. A user or item the
state has never seen is the OOV id (1), which has no training rows: a new user gets the item's
signals only (baseline mu + b_i, item count), a new item the user's only, both new mu.

Scale: scipy.sparse matrices throughout; similarities are computed in row chunks and cut to
the top-K neighbours per chunk; scoring gathers from (chunk x items) blocks, so nothing of
size users x items is ever dense.

Length: the CF model (fit, score, serialise) and its out-of-fold use in preparation and
update stay together: the leakage rule lives in how the two combine, and the service loads
the same class.
"""
from __future__ import annotations

import dataclasses
import io
import json
import types

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from mscenario.data.schema import FIRST_ID, OOV_ID
from mscenario.data.transform import MISSING, as_str_column
from mscenario.errors import ConfigError, MscenarioError

# The appended dense columns, in order (raw values; the prepared array holds them standardised
# with the training rows' mean and std, stored in the transform state like any dense feature).
FEATURES = (
    "cf_baseline",          # mu + b_u + b_i: regularised baseline predictor of the feedback
    "cf_user_bias",         # b_u (shrunk by shrink_user_bias)
    "cf_item_bias",         # b_i (shrunk by shrink_item_bias)
    "cf_item_knn",          # sum_j s_ij z_uj / (sum_j |s_ij| + 1), j in i's top-K items u rated
    "cf_item_knn_support",  # log1p(number of i's top-K neighbour items the user rated)
    "cf_user_knn",          # sum_v s_uv z_vi / (sum_v |s_uv| + 1), v in u's top-K users who rated i
    "cf_user_knn_support",  # log1p(number of u's top-K neighbour users who rated the item)
    "cf_svd",               # rank-k truncated SVD of the residual matrix, reconstructed at (u, i)
    "cf_user_count",        # log1p(training rows of the user)
    "cf_item_count",        # log1p(training rows of the item)
)
STATE_FILE = "collaborative.npz"  # the all-training-rows CF model (prepared data, work dir, export)
STATE_VERSION = 2  # 2: compact, with interactions + id keys (refit by update); 1: residual only
_BLOCK_FLOATS = 1 << 25  # largest dense (chunk x n) block: 256 MiB of float64
_PAIR_ENTRIES = 1 << 22  # neighbour entries gathered at once while scoring (~150 MiB)


@dataclasses.dataclass
class CFModel:
  """CF model fitted on one set of training interactions (ids index the rows/columns)."""
  mu: float
  user_bias: np.ndarray        # [n_users]
  item_bias: np.ndarray        # [n_items]
  residual: sp.csr_matrix      # [n_users, n_items] z = r - baseline (mean over duplicates)
  rated: sp.csr_matrix         # [n_users, n_items] 1 where the pair has feedback
  item_neighbors: sp.csr_matrix  # [n_items, n_items] row i: i's top-K shrunk cosine sims
  user_neighbors: sp.csr_matrix  # [n_users, n_users]
  user_factors: np.ndarray     # [n_users, k] U * sigma
  item_factors: np.ndarray     # [n_items, k] V
  user_count: np.ndarray       # [n_users] training rows (all training rows)
  item_count: np.ndarray       # [n_items]
  # The interactions fitted on (CF ids, feedback): what `refit` adds new events to.
  users: np.ndarray | None = None
  items: np.ndarray | None = None
  values: np.ndarray | None = None
  # Raw id of CF id FIRST_ID + k (the training vocabulary, then ids added by `refit`).
  user_keys: np.ndarray | None = None
  item_keys: np.ndarray | None = None
  # {"version", "config": data.collaborative, "seed", "applied": [update fingerprints]}
  meta: dict = dataclasses.field(default_factory=dict)
  _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  _DERIVED = ("residual", "rated")  # rebuilt from the interactions at load
  _OWN = ("meta", "_cache")

  def to_bytes(self) -> bytes:
    """npz bytes. With interactions: the compact form (no residual/rated; feedback as float32
    when that is exact); without (a fold model): the residual matrices themselves."""
    compact = self.users is not None
    out = {"mu": np.float64(self.mu),
           "meta": np.asarray(json.dumps({**self.meta, "version": STATE_VERSION
                                          if compact else 1}))}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.name in ("mu", *self._OWN) or v is None or (compact and f.name in self._DERIVED):
        continue
      if sp.issparse(v):
        for part in ("data", "indices", "indptr"):
          out[f"{f.name}.{part}"] = getattr(v, part)
        out[f"{f.name}.shape"] = np.asarray(v.shape)
      elif f.name == "values" and np.array_equal(v.astype(np.float32), v):
        out[f.name] = v.astype(np.float32)  # stars, 0/1 labels: exact in float32
      elif f.name in ("users", "items") and (not len(v) or v.max() < 2**31):
        out[f.name] = v.astype(np.int32)
      else:
        out[f.name] = v
    buf = io.BytesIO()
    np.savez(buf, **out)
    return buf.getvalue()

  @classmethod
  def load(cls, path_or_bytes) -> "CFModel":
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    z = np.load(src, allow_pickle=False)
    kw = {}
    for f in dataclasses.fields(cls):
      if f"{f.name}.data" in z:
        kw[f.name] = sp.csr_matrix((z[f"{f.name}.data"], z[f"{f.name}.indices"],
                                    z[f"{f.name}.indptr"]), shape=tuple(z[f"{f.name}.shape"]))
      elif f.name in z and f.name not in cls._OWN:
        kw[f.name] = z[f.name]
    kw["mu"] = float(kw["mu"])
    kw["meta"] = json.loads(str(z["meta"])) if "meta" in z else {"version": 1}
    if "users" in kw:  # compact: the residual exactly as `fit` built it
      kw["users"] = kw["users"].astype(np.int64)
      kw["items"] = kw["items"].astype(np.int64)
      kw["values"] = kw["values"].astype(np.float64)
      kw["residual"], kw["rated"] = _residual(kw["users"], kw["items"], kw["values"],
                                              kw["mu"], kw["user_bias"], kw["item_bias"])
    return cls(**kw)

  # -- raw ids -> CF ids -------------------------------------------------------------------
  def set_keys(self, user_vocab, item_vocab) -> None:
    """The raw ids behind CF ids FIRST_ID.. (the transform's user / item vocabularies)."""
    self.user_keys = np.asarray(list(user_vocab), dtype=str)
    self.item_keys = np.asarray(list(item_vocab), dtype=str)
    self._cache.clear()

  def _ids(self, side: str, raw) -> np.ndarray:
    keys = getattr(self, f"{side}_keys")
    if keys is None:
      raise MscenarioError("this collaborative state has no id keys (written before they "
                           "were stored): call set_keys(user_vocab, item_vocab) first")
    if side not in self._cache:
      order = np.argsort(keys, kind="stable")
      self._cache[side] = (keys[order], order)
    sorted_keys, order = self._cache[side]
    values = as_str_column(np.asarray(raw))
    if not len(values):
      return np.zeros(0, np.int64)
    uniq, inv = np.unique(values, return_inverse=True)
    if not len(sorted_keys):
      return np.full(len(values), OOV_ID, np.int64)
    pos = np.minimum(np.searchsorted(sorted_keys, uniq), len(sorted_keys) - 1)
    found = sorted_keys[pos] == uniq
    return np.where(found, FIRST_ID + order[pos], OOV_ID)[inv].astype(np.int64)

  def user_ids(self, raw) -> np.ndarray:
    """CF ids of raw user ids (OOV_ID for users the state has never seen)."""
    return self._ids("user", raw)

  def item_ids(self, raw) -> np.ndarray:
    return self._ids("item", raw)

  def pair_index(self):
    """(positions, values): z[u, i] of any pairs without densifying. `positions` has the
    residual's sparsity with entry k stored as k + 1, so a CSR lookup (scipy's per-row
    search) returns 0 for "u did not rate i" even where the stored residual is 0; `values`
    are the residuals. Built once per model."""
    if "pairs" not in self._cache:
      z = self.residual
      positions = sp.csr_matrix((np.arange(1, z.nnz + 1, dtype=np.float64), z.indices,
                                 z.indptr), shape=z.shape)
      self._cache["pairs"] = (positions, np.asarray(z.data, np.float64))
    return self._cache["pairs"]


# ---------------------------------------------------------------------------- fitting
def _pair_matrix(users, items, values, shape) -> sp.csr_matrix:
  """Mean value per (user, item) pair as CSR; every pair with feedback is stored (even 0)."""
  key = users.astype(np.int64) * shape[1] + items.astype(np.int64)
  uniq, inv = np.unique(key, return_inverse=True)
  mean = np.bincount(inv, values, len(uniq)) / np.bincount(inv, minlength=len(uniq))
  rows, cols = uniq // shape[1], uniq % shape[1]
  indptr = np.zeros(shape[0] + 1, np.int64)
  np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
  return sp.csr_matrix((mean, cols.astype(np.int32), indptr), shape=shape)


def _top_k_cosine(x: sp.csr_matrix, k: int, shrink: float, chunk: int) -> sp.csr_matrix:
  """Row-row cosine of x, times n_common / (n_common + shrink), top-k positive per row."""
  n = x.shape[0]
  ones = x.copy()
  ones.data = np.ones_like(ones.data)
  xt, ot = x.T.tocsr(), ones.T.tocsr()
  norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
  inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
  k = min(k, n - 1)
  chunk = max(1, min(chunk, _BLOCK_FLOATS // max(n, 1)))
  indptr, indices, data = [0], [], []
  for a in range(0, n, chunk):
    b = min(a + chunk, n)
    dots = (x[a:b] @ xt).toarray()
    common = (ones[a:b] @ ot).toarray()
    sim = dots * inv[a:b, None] * inv[None, :] * (common / (common + shrink))
    sim[np.arange(b - a), np.arange(a, b)] = 0.0  # never its own neighbour
    if k <= 0:
      top = np.zeros((b - a, 0), np.int64)
    else:
      top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    top = np.sort(top, axis=1)  # CSR wants sorted column indices per row
    vals = np.take_along_axis(sim, top, axis=1)
    keep = vals > 0
    indices.append(top[keep])  # row-major: rows stay in order
    data.append(vals[keep])
    indptr.extend(indptr[-1] + np.cumsum(keep.sum(axis=1)))
  cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa
  return sp.csr_matrix((cat(data, np.float64), cat(indices, np.int32), np.asarray(indptr)),
                       shape=(n, n))


def fit(users, items, values, n_users: int, n_items: int, cfg, user_count=None,
        item_count=None, seed: int = 0) -> CFModel:
  """Fit biases, residual neighbourhoods and the residual SVD on these interactions only
  (kept in the model, so that `refit` can add to them)."""
  users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
  r = np.asarray(values, np.float64)
  mu = float(r.mean()) if len(r) else 0.0
  n_u = np.bincount(users, minlength=n_users).astype(np.float64)
  n_i = np.bincount(items, minlength=n_items).astype(np.float64)
  bu, bi = np.zeros(n_users), np.zeros(n_items)
  for _ in range(max(int(cfg.bias_passes), 1)):  # alternating shrunk means (Koren 2010)
    bi = np.bincount(items, r - mu - bu[users], n_items) / (cfg.shrink_item_bias + n_i)
    bu = np.bincount(users, r - mu - bi[items], n_users) / (cfg.shrink_user_bias + n_u)
  z, rated = _residual(users, items, r, mu, bu, bi)
  k, chunk, shrink = int(cfg.neighbors), int(cfg.chunk_rows), float(cfg.shrink_similarity)
  item_nb = _top_k_cosine(z.T.tocsr(), k, shrink, chunk)
  user_nb = _top_k_cosine(z, k, shrink, chunk)
  rank = min(int(cfg.svd_rank), min(n_users, n_items) - 1)
  if rank > 0 and z.nnz:
    v0 = np.random.default_rng(seed).standard_normal(min(n_users, n_items))
    u, s, vt = svds(z, k=rank, v0=v0)
    uf, vf = u * s, vt.T
    # Users / items without feedback have exactly zero rows in the true SVD (ARPACK leaves
    # ~1e-17): the new-user / new-item fallback is then exactly "no factor score".
    uf[n_u == 0], vf[n_i == 0] = 0.0, 0.0
  else:
    uf, vf = np.zeros((n_users, 0)), np.zeros((n_items, 0))
  if user_count is None:
    user_count = n_u
  if item_count is None:
    item_count = n_i
  return CFModel(mu, bu, bi, z, rated, item_nb, user_nb, np.ascontiguousarray(uf),
                 np.ascontiguousarray(vf), np.asarray(user_count, np.float64),
                 np.asarray(item_count, np.float64), users=users, items=items, values=r)


def _residual(users, items, r, mu, bu, bi) -> tuple[sp.csr_matrix, sp.csr_matrix]:
  """(z, its 0/1 pattern): the residual matrix of `fit`, rebuilt identically at load."""
  z = _pair_matrix(users, items, r - mu - bu[users] - bi[items], (len(bu), len(bi)))
  rated = z.copy()
  rated.data = np.ones_like(rated.data)
  return z, rated


# ---------------------------------------------------------------------------- scoring
def score(m: CFModel, users, items) -> np.ndarray:
  """Raw FEATURES [n, len(FEATURES)] float64 for (user, item) id pairs under model m.

  Ids outside the fitted range (or with no training rows) fall back to zero biases,
  neighbourhood and factor scores: the baseline is then mu.
  """
  users = np.asarray(users, np.int64)
  items = np.asarray(items, np.int64)
  n_users, n_items = m.residual.shape
  known = (users >= 0) & (users < n_users) & (items >= 0) & (items < n_items)
  u = np.where(known, users, 0)
  i = np.where(known, items, 0)
  kn = known.astype(np.float64)
  bu, bi = m.user_bias[u] * kn, m.item_bias[i] * kn
  out = np.zeros((len(users), len(FEATURES)))
  out[:, 0] = m.mu + bu + bi
  out[:, 1], out[:, 2] = bu, bi
  out[:, 7] = np.einsum("nk,nk->n", m.user_factors[u], m.item_factors[i]) * kn
  ucount = np.where((users >= 0) & (users < len(m.user_count)), users, 0)
  icount = np.where((items >= 0) & (items < len(m.item_count)), items, 0)
  out[:, 8] = np.log1p(m.user_count[ucount] * ((users >= 0) & (users < len(m.user_count))))
  out[:, 9] = np.log1p(m.item_count[icount] * ((items >= 0) & (items < len(m.item_count))))
  # Neighbourhood scores per (user, item) pair from that pair's neighbour lists alone (each
  # row's value is a fixed-order sum over its own <= K neighbours, so it does not depend on
  # which other rows are scored with it: a served row equals the prepared one bit for bit).
  positions, values = m.pair_index()
  q = np.flatnonzero(known)
  k_max = max(int(np.diff(m.item_neighbors.indptr).max(initial=0)),
              int(np.diff(m.user_neighbors.indptr).max(initial=0)), 1)
  step = max(1, _PAIR_ENTRIES // k_max)
  for a in range(0, len(q), step):
    rows = q[a:a + step]
    pu, pi = u[rows], i[rows]
    # item-KNN: sum over i's neighbours j the user rated of s_ij z_uj.
    owner, j, sim = _neighbours(m.item_neighbors, pi)
    out[rows, 3], out[rows, 4] = _knn(positions, values, pu[owner], j, owner, sim, len(rows))
    # user-KNN: sum over u's neighbours v who rated i of s_uv z_vi.
    owner, v, sim = _neighbours(m.user_neighbors, pu)
    out[rows, 5], out[rows, 6] = _knn(positions, values, v, pi[owner], owner, sim, len(rows))
  return out


def _neighbours(nb: sp.csr_matrix, rows: np.ndarray):
  """The stored entries of CSR rows `rows` (repeats allowed), in row then column order:
  (position in `rows` of each entry's row, the entry's column, its value)."""
  starts = nb.indptr[rows]
  counts = nb.indptr[rows + 1] - starts
  owner = np.repeat(np.arange(len(rows)), counts)
  pos = np.arange(int(counts.sum())) + np.repeat(starts - (np.cumsum(counts) - counts), counts)
  return owner, nb.indices[pos].astype(np.int64), nb.data[pos]


def _knn(positions, values, users, items, owner, sim, n):
  """(sum s z / (sum s + 1), log1p support) per pair over its neighbour entries: the
  (users, items) pairs, weighted `sim`, of which the rated ones count."""
  if len(users):
    pos = np.asarray(positions[users, items], np.float64).ravel().astype(np.int64)
  else:
    pos = np.zeros(0, np.int64)
  rated = pos > 0
  z = np.where(rated, values[np.maximum(pos - 1, 0)], 0.0) if len(values) else np.zeros(len(pos))
  num = np.bincount(owner, sim * z, n)
  den = np.bincount(owner, sim * rated, n)
  support = np.bincount(owner, rated, n)
  return num / (den + 1.0), np.log1p(support)


# ---------------------------------------------------------------------------- out of fold
def fold_of(num_train: int, folds: int, seed: int) -> np.ndarray:
  """Balanced random fold per training row (seeded; independent of the split's stream)."""
  perm = np.random.default_rng([int(seed), 0xCF]).permutation(num_train)
  out = np.empty(num_train, np.int64)
  out[perm] = np.arange(num_train) % folds
  return out


def compute(users, items, values, train_rows, n_users: int, n_items: int, cfg,
            seed: int, log=print) -> tuple[np.ndarray, CFModel]:
  """Raw FEATURES for every row: out of fold for `train_rows`, all-training for the rest.

  values: the feedback of every row (only training rows' entries are ever read).
  Returns (features [N, F] float64, the CF model fitted on all training rows).
  """
  folds = int(cfg.folds)
  if folds < 2:
    raise ConfigError(f"data.collaborative.folds={folds}: expected >= 2 (out-of-fold "
                      "features for training rows need at least two folds)")
  users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
  values = np.asarray(values, np.float64)
  train_rows = np.asarray(train_rows, np.int64)
  n = len(users)
  uc = np.bincount(users[train_rows], minlength=n_users).astype(np.float64)
  ic = np.bincount(items[train_rows], minlength=n_items).astype(np.float64)
  out = np.zeros((n, len(FEATURES)))
  fold = fold_of(len(train_rows), folds, seed)
  for f in range(folds):
    fit_rows, held = train_rows[fold != f], train_rows[fold == f]
    m = fit(users[fit_rows], items[fit_rows], values[fit_rows], n_users, n_items, cfg,
            uc, ic, seed)
    out[held] = score(m, users[held], items[held])
    log(f"data: collaborative fold {f + 1}/{folds}: {len(held):,} training rows scored")
  full = fit(users[train_rows], items[train_rows], values[train_rows], n_users, n_items, cfg,
             uc, ic, seed)
  full.meta = {"config": _plain(cfg), "seed": int(seed), "applied": []}
  rest = np.setdiff1d(np.arange(n), train_rows)
  out[rest] = score(full, users[rest], items[rest])
  return out, full


def register(transform, features: np.ndarray, train_rows: np.ndarray, cfg,
             model: CFModel | None = None) -> np.ndarray:
  """Add FEATURES to the transform as dense columns standardised on the training rows.

  Returns the standardised float32 block to append to the prepared `dense` array. At
  predict time `Transform.apply` then expects raw columns named as FEATURES in the input
  (see `columns_for`) and raises a DataError naming the first one missing: a model trained
  with them is never silently fed zeros. A value given as missing (NaN; the server's absent
  field) takes the column's default: the new-user-and-new-item fallback of `model` (mu for
  cf_baseline, 0 elsewhere), i.e. "no collaborative knowledge", not a zero baseline.
  """
  state = transform.state
  clash = [name for name in FEATURES if name in state["dense"]]
  if clash:
    raise ConfigError(f"data.collaborative adds dense columns {list(FEATURES)}; the data "
                      f"config already has features named {clash}")
  train = features[train_rows]
  shift = train.mean(axis=0)
  scale = train.std(axis=0)
  scale = np.where(scale > 0, scale, 1.0)
  fallback = (score(model, np.array([-1]), np.array([-1]))[0] if model is not None
              else np.zeros(len(FEATURES)))
  for j, name in enumerate(FEATURES):
    state["dense"][name] = {"column": name, "shift": float(shift[j]),
                            "scale": float(scale[j]), "default": float(fallback[j]),
                            "indicator": False}
  state["schema"]["dense"] = [*state["schema"]["dense"], *FEATURES]
  state["collaborative"] = {"features": list(FEATURES), "file": STATE_FILE,
                            "config": dict(cfg.to_dict()) if hasattr(cfg, "to_dict")
                            else dict(cfg)}
  return ((features - shift) / scale).astype(np.float32)


def _plain(cfg) -> dict:
  return dict(cfg.to_dict()) if hasattr(cfg, "to_dict") else dict(cfg)


def feedback(table, keep: np.ndarray, label_field: str, labels: np.ndarray) -> np.ndarray:
  """What CF is fitted on for the kept rows: the raw label field (e.g. 1-5 stars) when it is
  numeric (richer than the binary label), else the label."""
  raw = table.columns.get(label_field)
  if raw is not None and np.asarray(raw).dtype.kind in "fiu":
    return np.nan_to_num(np.asarray(raw, np.float64)[keep])
  return np.asarray(labels, np.float64)


def _raw_column(table, field: str) -> np.ndarray:
  col = table.columns.get(field)
  return np.full(table.num_rows, MISSING, dtype=object) if col is None else col


def add_columns(model: CFModel, table, user_field: str, item_field: str) -> None:
  """Set the cf_* columns of a table of raw rows (predict input, a request, update events)
  from `model`, replacing any the table carried: the values data preparation gives a
  validation/test row. Rows without a user (item) field get the new-user (new-item) values."""
  feats = score(model, model.user_ids(_raw_column(table, user_field)),
                model.item_ids(_raw_column(table, item_field)))
  for j, name in enumerate(FEATURES):
    table.columns[name] = feats[:, j]


def refit(model: CFModel, table, keep: np.ndarray, values: np.ndarray, user_field: str,
          item_field: str, tag: str, log=print) -> CFModel:
  """`model` plus the kept rows of `table` (with their feedback `values`), fitted again on
  all interactions with the same settings. Users / items the model has not seen get new CF
  ids. `tag` (the update's fingerprint) is recorded: refitting with it again returns `model`
  unchanged, so a rerun of a killed update never adds its events twice."""
  if tag in model.meta.get("applied", []):
    return model
  if model.users is None or model.user_keys is None or "config" not in model.meta:
    raise MscenarioError(
        "this run's collaborative state has no training interactions (it was prepared "
        f"before they were stored with it, state version {model.meta.get('version', 1)}): "
        "`update` cannot refresh the cf_* features; prepare and train the run again")

  def grow(keys, raw):
    values_ = as_str_column(np.asarray(raw))
    have = set(keys.tolist())
    new = []
    for v in values_.tolist():  # first appearance order: deterministic for the same rows
      if v != MISSING and v not in have:
        have.add(v)
        new.append(v)
    return np.concatenate([keys, np.asarray(new, dtype=str)]) if new else keys

  users_raw = np.asarray(_raw_column(table, user_field))[keep]
  items_raw = np.asarray(_raw_column(table, item_field))[keep]
  grown = dataclasses.replace(model, _cache={})
  grown.user_keys = grow(model.user_keys, users_raw)
  grown.item_keys = grow(model.item_keys, items_raw)
  u = np.concatenate([model.users, grown.user_ids(users_raw)])
  i = np.concatenate([model.items, grown.item_ids(items_raw)])
  r = np.concatenate([model.values, np.asarray(values, np.float64)])
  n_users = max(len(model.user_bias), FIRST_ID + len(grown.user_keys))
  n_items = max(len(model.item_bias), FIRST_ID + len(grown.item_keys))
  new = fit(u, i, r, n_users, n_items, types.SimpleNamespace(**model.meta["config"]),
            seed=int(model.meta.get("seed", 0)))
  new.user_keys, new.item_keys = grown.user_keys, grown.item_keys
  new.meta = {**model.meta, "applied": [*model.meta.get("applied", []), tag]}
  log(f"collaborative: refitted on {len(r):,} interactions ({len(values):,} new; "
      f"{n_users - len(model.user_bias):,} new users, {n_items - len(model.item_bias):,} "
      "new items)")
  return new


def columns_for(model: CFModel, transform, users, items) -> dict[str, np.ndarray]:
  """Raw CF columns for raw user / item ids, from the stored all-training-rows model (see
  add_columns). A state without id keys takes them from the transform's vocabularies."""
  if model.user_keys is None:
    model.set_keys(transform.state["user_vocab"], transform.state["item_vocab"])
  feats = score(model, model.user_ids(users), model.item_ids(items))
  return {name: feats[:, j] for j, name in enumerate(FEATURES)}
