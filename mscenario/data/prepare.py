"""Raw files -> prepared dataset, once: split, fit the transform, write memory-mapped columns.

The cache directory is keyed by a fingerprint of the source files' contents and the data config,
so a second run (or a second process of a multi-host job) reuses it, and any change to the data
or to the feature config builds a new one. Columns are plain `.npy` files opened with
`mmap_mode='r'`: a batch is a fancy-index gather, millions of rows/s on one core, which keeps
the input pipeline far ahead of the train step (see BENCHMARKS.md for the array_record
comparison).

Length: the one place that orders preparation (split, fit, the optional history, CF and
text stages, the atomic publish of the cache); each stage is a short function here and the
heavy work lives in transform, history, collaborative and text.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np

from mscenario.config import default_cache_dir
from mscenario.data import collaborative
from mscenario.data.history import build_history
from mscenario.data import sources
from mscenario.data.sources import resolve_root
from mscenario.data.sources.tabular import table_paths
from mscenario.data.sources.tfds import source_files as tfds_files
from mscenario.data.table import RawTable
from mscenario.data.transform import Transform, as_float_column, as_str_column
from mscenario.errors import ConfigError, DataError

PREP_VERSION = 3  # 2: histories carry hist_value and hist_count; 3: hist_item_key
SPLITS = ("train", "valid", "test")
ARRAY_NAMES = ("sparse", "multi", "dense", "scenario", "label", "user", "item", "truth",
               "hist_item", "hist_scenario", "hist_feedback", "hist_gap", "hist_value",
               "hist_count", "hist_item_key", "feedback")


@dataclasses.dataclass
class PreparedData:
  path: str
  arrays: dict[str, np.ndarray]
  splits: dict[str, np.ndarray]
  transform: Transform
  meta: dict

  @property
  def schema(self):
    return self.transform.schema

  @property
  def fingerprint(self) -> str:
    return self.meta["fingerprint"]

  def split_arrays(self, split: str) -> dict[str, np.ndarray]:
    idx = self.splits[split]
    return {k: v[idx] for k, v in self.arrays.items()}


# ---------------------------------------------------------------------------- fingerprint
def source_files(data_cfg) -> list[str]:
  """Files a source reads, resolved exactly as the reader resolves them (the synthetic
  source has none; tfds: the array_record shards of the configured splits and the dataset's
  dataset_info.json / features.json, so a rebuilt dataset invalidates the cache)."""
  if data_cfg.source == "synthetic":
    return []
  if data_cfg.source == "table":
    return [p for _, p in table_paths(data_cfg)]
  if data_cfg.source == "tfds":  # the shards of the splits read + dataset_info.json
    return tfds_files(data_cfg)
  root = resolve_root(data_cfg)
  if not os.path.isdir(root):
    raise DataError(f"data directory {root} does not exist. Get the data with "
                    f"`mscenario data get movielens-{data_cfg.name.removeprefix('ml-')}` or "
                    "point --config.data.root at the directory holding the files")
  return sorted(os.path.join(root, f) for f in os.listdir(root)
                if os.path.isfile(os.path.join(root, f)) and not f.startswith("."))


def _file_digest(path: str) -> str:
  h = hashlib.blake2b(digest_size=16)
  try:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 23), b""):
        h.update(block)
  except OSError as e:
    raise DataError(f"cannot read: {e.strerror}", file=path,
                    expected="an existing, readable data file") from None
  return h.hexdigest()


def fingerprint(data_cfg, seed: int | None = None, feedback: bool = False) -> str:
  """Content of the source files + every data setting that changes the prepared arrays.

  `seed` is the resolved split seed (`data.split.seed`, or `config.seed` when that is -1): a
  random split depends on it, so it must key the cache too.
  """
  cfg = data_cfg.to_dict()
  # Where the files live and how batches reach the devices do not change the arrays.
  for k in ("root", "cache_dir", "on_device", "device_budget_mb", "allow_changed_data"):
    cfg.pop(k, None)
  if isinstance(cfg.get("tfds"), dict):  # its files' contents are hashed below, not its path
    cfg["tfds"].pop("data_dir", None)
  for k, off in (("cold_items", 0.0), ("holdout_scenario", ""),
                 ("reserve_fraction", 0.0)):  # off: caches stay valid
    if cfg.get(k, off) == off:
      cfg.pop(k, None)
  if not cfg.get("collaborative", {}).get("enabled", False):  # off: caches stay valid
    cfg.pop("collaborative", None)
  else:  # the cached CF state's format (2: with the interactions `update` refits on)
    cfg["collaborative"]["state_version"] = collaborative.STATE_VERSION
  cfg.get("table", {}).pop("train", None), cfg.get("table", {}).pop("valid", None)
  cfg.get("table", {}).pop("test", None)
  h = hashlib.blake2b(digest_size=16)
  key = {"version": PREP_VERSION, "config": cfg}
  if feedback:  # the raw label column is kept (wants_feedback); off: caches stay valid
    key["feedback"] = 2  # 2: its training levels are in transform.json
  if seed is not None and data_cfg.split.kind == "random":
    key["split_seed"] = int(seed)
  h.update(json.dumps(key, sort_keys=True, default=str).encode())
  for path in source_files(data_cfg):
    h.update(os.path.basename(path).encode())
    h.update(_file_digest(path).encode())
  return h.hexdigest()


# ---------------------------------------------------------------------------- splits
def split_rows(table: RawTable, data_cfg, seed: int) -> dict[str, np.ndarray]:
  """Row indices per split, then the cold-item / unseen-scenario holdouts moved to test."""
  return _apply_holdouts(table, data_cfg, seed, _split_rows(table, data_cfg, seed))


def cold_item_values(table: RawTable, data_cfg, seed: int) -> np.ndarray:
  """The raw item ids held out entirely (`data.cold_items` of the distinct items, seeded)."""
  frac = float(data_cfg.get("cold_items", 0.0) or 0.0)
  if frac <= 0:
    return np.asarray([], dtype=str)
  if frac >= 1:
    raise ConfigError(f"data.cold_items={frac}: expected a fraction in [0, 1)")
  field = data_cfg.item_field
  if field not in table.columns:
    raise ConfigError(f"data.cold_items needs the item field '{field}' in the data")
  items = np.unique(as_str_column(table.columns[field]))
  k = int(round(frac * len(items)))
  rng = np.random.default_rng([int(seed), 0xC01D])  # independent of the row split's stream
  return np.sort(rng.choice(items, size=k, replace=False)) if k else items[:0]


def _holdout_rows(table: RawTable, data_cfg, seed: int) -> np.ndarray:
  """Mask of rows that may only be in test (cold items, the held-out scenario)."""
  mask = np.zeros(table.num_rows, bool)
  cold = cold_item_values(table, data_cfg, seed)
  if len(cold):
    mask |= np.isin(as_str_column(table.columns[data_cfg.item_field]), cold)
  name = data_cfg.get("holdout_scenario", "") or ""
  if name:
    groups = data_cfg.scenario.groups
    field = data_cfg.scenario.field
    if field not in table.columns:
      raise ConfigError(f"data.holdout_scenario needs the scenario field '{field}'")
    values = as_str_column(table.columns[field])
    if groups:
      if name not in groups:
        raise ConfigError(f"data.holdout_scenario={name!r}: not a scenario (scenarios: "
                          f"{sorted(groups.keys())})")
      mask |= np.isin(values, [str(v) for v in groups[name]])
    else:
      if not (values == name).any():
        raise ConfigError(f"data.holdout_scenario={name!r}: no rows have {field} == {name!r}")
      mask |= values == name
  return mask


def _apply_holdouts(table, data_cfg, seed, splits) -> dict[str, np.ndarray]:
  mask = _holdout_rows(table, data_cfg, seed)
  if not mask.any():
    return splits
  held = np.flatnonzero(mask)
  return {"train": splits["train"][~mask[splits["train"]]],
          "valid": splits["valid"][~mask[splits["valid"]]],
          "test": np.union1d(splits["test"], held)}


def _split_rows(table: RawTable, data_cfg, seed: int) -> dict[str, np.ndarray]:
  n = table.num_rows
  if "__split__" in table.columns:  # the source came pre-split (separate files)
    col = as_str_column(table.columns["__split__"])
    return {s: np.flatnonzero(col == s) for s in SPLITS}
  kind = data_cfg.split.kind
  ratios = np.asarray(data_cfg.split.ratios, np.float64)
  if len(ratios) != 3 or (ratios < 0).any() or abs(ratios.sum() - 1) > 1e-6:
    raise ConfigError(f"data.split.ratios={tuple(ratios)}: expected three fractions summing "
                      "to 1 (train, valid, test)")
  cuts = (np.cumsum(ratios)[:2] * n).astype(np.int64)
  if kind == "random":
    order = np.random.default_rng(seed).permutation(n)
  elif kind == "temporal":
    order = np.argsort(_time_column(table, data_cfg), kind="stable")
  elif kind == "leave_last_out":
    return _leave_last_out(table, data_cfg)
  else:
    raise ConfigError(f"data.split.kind={kind!r}: expected random, temporal or "
                      "leave_last_out")
  parts = np.split(order, cuts)
  return {s: np.sort(p) for s, p in zip(SPLITS, parts)}


def _time_column(table: RawTable, data_cfg) -> np.ndarray:
  field = data_cfg.time_field
  if field not in table.columns:
    raise DataError(f"split kind '{data_cfg.split.kind}' needs the time field '{field}', "
                    "which the data does not have", file=table.files[0], field=field)
  # Text times (ISO dates) are an error naming the line, not a numpy ValueError traceback.
  t, _ = as_float_column(table, field, "raise",
                         expected="a number (e.g. Unix seconds; convert dates first)")
  if np.isnan(t).any():
    i = int(np.flatnonzero(np.isnan(t))[0])
    f, line = table.where(i)
    raise DataError("missing timestamp", file=f, line=line, field=field, expected="a number")
  return t


def _leave_last_out(table: RawTable, data_cfg) -> dict[str, np.ndarray]:
  """Per user: the latest row -> test, the one before -> valid, the rest -> train."""
  t = _time_column(table, data_cfg)
  users = np.unique(as_str_column(table.columns[data_cfg.user_field]), return_inverse=True)[1]
  order = np.lexsort((np.arange(len(t)), t, users))
  u_sorted = users[order]
  last = np.r_[u_sorted[1:] != u_sorted[:-1], True]
  second = np.r_[last[1:], False] & ~last
  # Users with fewer than three rows keep them all in train.
  counts = np.bincount(u_sorted)
  enough = counts[u_sorted] >= 3
  test = order[last & enough]
  valid = order[second & enough]
  train = order[~((last | second) & enough)]
  return {"train": np.sort(train), "valid": np.sort(valid), "test": np.sort(test)}


# ---------------------------------------------------------------------------- build / load
def scenario_names(table: RawTable, data_cfg) -> list[str]:
  groups = data_cfg.scenario.groups
  order = list(data_cfg.scenario.get("order", ()) or ())
  if groups:
    # ConfigDict iterates keys sorted; `order` keeps a protocol's scenario numbering.
    if order:
      if sorted(order) != sorted(groups.keys()):
        raise ConfigError(f"data.scenario.order={order} must list exactly the scenario groups "
                          f"{sorted(groups.keys())}")
      return order
    return list(groups.keys())
  field = data_cfg.scenario.field
  if field not in table.columns:
    raise DataError(f"scenario field '{field}' is not a column of the data (columns: "
                    f"{sorted(table.columns)})", file=table.files[0], field=field)
  values = np.unique(as_str_column(table.columns[field]))
  return [v for v in values.tolist() if v != "\x00missing"]


def prepare(config, *, log=print, force: bool = False) -> PreparedData:
  """Load the prepared dataset for `config.data`, building and caching it if needed."""
  data_cfg = config.data
  seed = data_cfg.split.seed if data_cfg.split.seed >= 0 else config.seed
  keep_feedback = wants_feedback(config)
  fp = fingerprint(data_cfg, seed, keep_feedback)
  cache_root = data_cfg.cache_dir or default_cache_dir()
  path = os.path.join(cache_root, "prepared", f"{data_cfg.name}-{fp}")
  if os.path.isfile(os.path.join(path, "meta.json")) and not force:
    data = _load_published(path)
    log(f"data: reusing prepared {data_cfg.name} at {path} "
        f"({data.meta['num_rows']:,} rows)")
    return data
  t0 = time.time()
  log(f"data: preparing {data_cfg.name} from {data_cfg.source} source …")
  table = sources.load_source(data_cfg)  # via the module: tests replace it
  table.validate()
  if table.num_rows == 0:
    raise DataError("the data has no rows", file=table.files[0] if table.files else None)
  splits = split_rows(table, data_cfg, seed)
  names = scenario_names(table, data_cfg)
  fit_rows = splits["train"] if data_cfg.fit_on == "train" else np.arange(table.num_rows)
  if data_cfg.fit_on not in ("train", "all"):
    raise ConfigError(f"data.fit_on={data_cfg.fit_on!r}: expected train or all")
  transform = Transform.fit(table, data_cfg, fit_rows, names)
  arrays, keep, skipped = transform.apply(table, on_error=data_cfg.on_error)
  history_length = int(data_cfg.get("history", {}).get("length", 0) or 0)
  if history_length > 0:
    _add_history(arrays, table, keep, transform, data_cfg, history_length)
  if keep_feedback:
    arrays["feedback"] = raw_feedback(table, keep, data_cfg.label.field)
  new_index = np.cumsum(keep) - 1
  splits = {s: new_index[idx[keep[idx]]] for s, idx in splits.items()}
  for s in SPLITS:
    if len(splits[s]) == 0:
      raise DataError(f"split '{s}' is empty after preparation (split kind "
                      f"'{data_cfg.split.kind}', ratios {tuple(data_cfg.split.ratios)}, "
                      f"{int(keep.sum())} rows)")
  if keep_feedback:  # what the aux head's shape needs where rows carry no stars (predict)
    transform.state["feedback_levels"] = np.unique(
        arrays["feedback"][splits["train"]]).astype(float).tolist()
  extras = {}
  cf_cfg = data_cfg.get("collaborative", None)
  if cf_cfg is not None and cf_cfg.get("enabled", False):
    extras = _add_collaborative(arrays, table, keep, transform, data_cfg, splits["train"],
                                seed, log)
  merged = dict(table.skipped)
  for k, v in skipped.items():
    merged[k] = merged.get(k, 0) + v
  skipped = merged
  meta = _summary(arrays, splits, transform, skipped, fp, data_cfg, table)
  cold = cold_item_values(table, data_cfg, seed)
  if len(cold):  # item vocabulary ids of the held-out items, for the cold_items report
    is_cold = np.isin(as_str_column(table.columns[data_cfg.item_field])[keep], cold)
    meta["cold_items"] = np.unique(arrays["item"][is_cold]).astype(int).tolist()
  texts = _item_texts(table, keep, arrays["item"], data_cfg)
  meta.update(extras.pop("meta", {}))
  won = _write(path, arrays, splits, transform, meta, texts, extras=extras, replace=force)
  log(f"data: prepared {meta['num_rows']:,} rows in {time.time() - t0:.1f}s -> {path}"
      + ("" if won else " (another process finished the same data first; using its copy)"))
  if skipped:
    log(f"data: skipped rows (data.on_error='skip'): {skipped}")
  return _load_published(path)


def wants_feedback(config) -> bool:
  """Does training read the raw label values (train.aux_rating on)?"""
  aux = config.get("train", {}).get("aux_rating", None)
  return bool(aux is not None and float(aux.get("weight", 0.0)) > 0)


def raw_feedback(table, keep: np.ndarray, label_field: str,
                 need_levels: bool = True) -> np.ndarray:
  """The label field's raw values (e.g. 1-5 stars) of the kept rows, float32: what
  train.aux_rating predicts. A binary or text label field has nothing finer to offer
  (`need_levels=False` for a few new events, e.g. an update's, that may happen to hold only
  two of the levels the training rows had)."""
  raw = table.columns.get(label_field)
  if raw is None or np.asarray(raw).dtype.kind not in "fiu":
    raise ConfigError(f"train.aux_rating needs numeric raw feedback in the label field "
                      f"data.label.field='{label_field}' (e.g. MovieLens stars); this data's "
                      "column is " + ("missing" if raw is None else "not numeric")
                      + ". Set --config.train.aux_rating.weight=0")
  values = np.asarray(raw, np.float64)[keep]
  if not np.isfinite(values).all():
    raise DataError(f"train.aux_rating: the label field '{label_field}' has "
                    f"{int((~np.isfinite(values)).sum())} missing or non-finite values")
  if need_levels and np.unique(values).size < 3:
    raise ConfigError(f"train.aux_rating: the label field '{label_field}' holds only "
                      f"{np.unique(values).tolist()}: no finer signal than the binary label. "
                      "Set --config.train.aux_rating.weight=0")
  return values.astype(np.float32)


def _load_published(path: str, tries: int = 20) -> PreparedData:
  """load_prepared, waiting out the instant in which a forced rebuild swaps the copy."""
  for i in range(tries):
    try:
      return load_prepared(path)
    except FileNotFoundError:
      if i == tries - 1:
        raise
      time.sleep(0.05)


def _add_history(arrays, table, keep, transform, data_cfg, length: int) -> None:
  """Each row's previous `length` events of the same user (data/history.py), over all rows
  of every split: a test row's history may hold earlier training events, never its own or
  later ones."""
  schema = transform.schema
  by_column = {spec.get("column", name): name for name, spec in data_cfg.features.items()
               if spec.get("kind") == "sparse"}
  item_name = by_column.get(data_cfg.item_field, data_cfg.item_field)
  names = [f.name for f in schema.sparse]
  if item_name not in names:
    raise ConfigError(f"data.history needs a sparse feature on the item field "
                      f"'{data_cfg.item_field}' (sparse features: {names})")
  index = names.index(item_name)
  times = _time_column(table, data_cfg)[keep]
  values = None  # the raw label field (e.g. 1-5 stars) when numeric: richer than the label
  raw = table.columns.get(data_cfg.label.field)
  if raw is not None and np.asarray(raw).dtype.kind in "fiu":
    values = np.nan_to_num(np.asarray(raw, np.float64)[keep])
  arrays.update(build_history(arrays["user"], times, arrays["sparse"][:, index],
                              arrays["scenario"], arrays["label"], length, values,
                              keys=arrays["item"]))
  transform.state["schema"]["history_length"] = length
  transform.state["schema"]["history_item_index"] = index


def _add_collaborative(arrays, table, keep, transform, data_cfg, train_rows, seed,
                       log) -> dict:
  """Append the data.collaborative features (data/collaborative.py) to arrays['dense'];
  returns the files to cache with them (the all-training-rows CF model) and their meta."""
  t0 = time.time()
  cfg = data_cfg.collaborative
  values = collaborative.feedback(table, keep, data_cfg.label.field, arrays["label"])
  schema = transform.schema
  feats, full = collaborative.compute(arrays["user"], arrays["item"], values, train_rows,
                                      max(schema.user_vocab_size, 1),
                                      max(schema.item_vocab_size, 1), cfg, seed, log=log)
  # The CF ids are the transform's user / item ids: the state maps raw ids the same way.
  full.set_keys(transform.state["user_vocab"], transform.state["item_vocab"])
  block = collaborative.register(transform, feats, train_rows, cfg, full)
  arrays["dense"] = np.concatenate([arrays["dense"], block], axis=1)
  seconds = time.time() - t0
  log(f"data: collaborative features {list(collaborative.FEATURES)} in {seconds:.1f}s")
  return {collaborative.STATE_FILE: full.to_bytes(),
          "meta": {"collaborative": {"features": list(collaborative.FEATURES),
                                     "folds": int(cfg.folds), "seconds": round(seconds, 1)}}}


def _summary(arrays, splits, transform, skipped, fp, data_cfg, table) -> dict:
  names = transform.schema.scenario_names
  per = {}
  for s, idx in splits.items():
    sc, lb = arrays["scenario"][idx], arrays["label"][idx]
    per[s] = {"rows": int(len(idx)), "positive_rate": float(lb.mean()) if len(idx) else 0.0,
              "scenarios": {n: {"rows": int((sc == i).sum()),
                                "positive_rate": float(lb[sc == i].mean())
                                if (sc == i).any() else 0.0}
                            for i, n in enumerate(names)}}
  return {"fingerprint": fp, "prep_version": PREP_VERSION, "name": data_cfg.name,
          "source": data_cfg.source, "files": table.files,
          "num_rows": int(len(arrays["label"])), "skipped": skipped, "splits": per,
          "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _item_texts(table, keep, item_ids, data_cfg) -> dict[str, dict[str, str]]:
  """First text seen per item id for each text feature (input to the language model)."""
  out = {}
  for name, spec in data_cfg.features.items():
    if spec.get("kind") != "text" or spec.get("column", name) not in table.columns:
      continue
    col = table.columns[spec.get("column", name)][keep]
    _, first = np.unique(item_ids, return_index=True)
    out[name] = {str(int(item_ids[i])): ("" if col[i] is None else str(col[i])) for i in first}
  return out


def _write(path, arrays, splits, transform, meta, texts, replace=False, extras=None) -> bool:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(path))
  for name, blob in (extras or {}).items():  # e.g. the collaborative model
    with open(os.path.join(tmp, name), "wb") as f:
      f.write(blob)
  for k, v in arrays.items():
    np.save(os.path.join(tmp, f"{k}.npy"), np.ascontiguousarray(v))
  for k, v in splits.items():
    np.save(os.path.join(tmp, f"split_{k}.npy"), v.astype(np.int64))
  with open(os.path.join(tmp, "transform.json"), "w") as f:
    json.dump(transform.state, f)
  with open(os.path.join(tmp, "texts.json"), "w") as f:
    json.dump(texts, f)
  with open(os.path.join(tmp, "meta.json"), "w") as f:  # written last: marks completeness
    json.dump(meta, f, indent=2)
  return _publish(tmp, path, replace=replace)


def _publish(tmp: str, path: str, *, replace: bool) -> bool:
  """Move the finished `tmp` dir to `path` atomically; True if ours is the copy now there.

  Never deletes a complete copy another process may be reading: when one is already there
  (another process preparing the same data won the race) ours is discarded and theirs
  reused, both being built from the same fingerprint. `replace` (prepare(force=True)) swaps
  an existing copy out with two renames, so readers see either the old or the new copy.
  """
  aside = None
  if os.path.isdir(path) and (replace or not os.path.isfile(os.path.join(path, "meta.json"))):
    aside = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(path))
    try:
      os.rename(path, os.path.join(aside, "x"))  # incomplete (or forced out): move aside
    except OSError:
      pass  # another process moved it first
  try:
    os.rename(tmp, path)  # fails when `path` exists (non-empty): someone else's copy
    won = True
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)
    won = False
  if aside is not None:
    shutil.rmtree(aside, ignore_errors=True)
  return won


def load_prepared(path: str) -> PreparedData:
  with open(os.path.join(path, "meta.json")) as f:
    meta = json.load(f)
  with open(os.path.join(path, "transform.json")) as f:
    transform = Transform(json.load(f))
  arrays = {}
  for k in ARRAY_NAMES:
    p = os.path.join(path, f"{k}.npy")
    if os.path.exists(p):
      arrays[k] = np.load(p, mmap_mode="r")
  splits = {s: np.load(os.path.join(path, f"split_{s}.npy")) for s in SPLITS}
  return PreparedData(path, arrays, splits, transform, meta)
