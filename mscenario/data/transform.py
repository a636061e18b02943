"""Feature transform: fitted on training rows, applied to any rows (training, eval, predict).

The fitted state (vocabularies, normalisers, scenario map, label rule) is plain JSON so that a
prediction run or an exported model can turn raw rows into ids without the original data.

Length: one class whose fit, apply and grow (for update) must stay symmetric: a value
encoded at training time is encoded the same way at predict, export and update.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import zlib
from typing import Any

import numpy as np

from mscenario.data import schema as schema_lib
from mscenario.data.sources._io import NUMERIC_MISSING, parse_number
from mscenario.data.table import RawTable
from mscenario.errors import ConfigError, DataError

MISSING = "\x00missing"
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
        "==": operator.eq}


# ---------------------------------------------------------------------------- helpers
def as_str_column(col: np.ndarray) -> np.ndarray:
  """Categorical values as a str array (missing -> MISSING) so np.unique can sort them."""
  if col.dtype.kind in "iu":
    return col.astype(str)
  if col.dtype.kind == "f":
    nan = np.isnan(col)
    integral = ~nan & (col == np.round(col))
    out = col.astype(str).astype(object)
    out[integral] = col[integral].astype(np.int64).astype(str)
    out[nan] = MISSING
    return out.astype(str)
  if col.dtype.kind in "US":
    return col.astype(str)
  # object: str, None, or tuples (multi-valued column used as single-valued: first value).
  def norm(v):
    if v is None:
      return MISSING
    if isinstance(v, tuple):
      return str(v[0]) if v else MISSING
    if isinstance(v, float) and np.isnan(v):
      return MISSING
    return str(v)
  return np.array([norm(v) for v in col.tolist()], dtype=str) if len(col) else np.array(
      [], dtype=str)


def as_float_column(table: RawTable, name: str, on_error: str,
                    expected: str = "a number") -> tuple[np.ndarray, np.ndarray]:
  """Numeric values (NaN = missing) plus a mask of rows with unparsable values.

  Text is read with the sources' strict grammar (sources/_io.parse_number): Python's float()
  would also take '1_000' or full-width digits, silently changing what the file says.
  """
  col = table.columns[name]
  if col.dtype.kind in "fiub":
    return col.astype(np.float64), np.zeros(len(col), bool)
  out = np.full(len(col), np.nan)
  bad = np.zeros(len(col), bool)
  missing = set(NUMERIC_MISSING)
  for i, v in enumerate(col.tolist()):
    if v is None:
      continue
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      out[i] = float(v)
      continue
    text = v.strip() if isinstance(v, str) else None
    if text in missing:
      continue
    number = parse_number(text)
    if number is None:
      if on_error != "skip":
        f, line = table.where(i)
        raise DataError(f"value {v!r} is not a number", file=f, line=line, field=name,
                        expected=expected) from None
      bad[i] = True
    else:
      out[i] = number
  return out, bad


def stable_hash(values: np.ndarray, buckets: int) -> np.ndarray:
  """Process-independent hash (Python's hash() is salted per process)."""
  return np.array([zlib.crc32(v.encode("utf-8")) % buckets for v in values.tolist()],
                  dtype=np.int64)


def parse_label_rule(rule: str):
  rule = rule.strip()
  if rule == "binary":
    return None
  for op in (">=", "<=", "==", ">", "<"):
    if rule.startswith(op):
      try:
        return op, float(rule[len(op):])
      except ValueError:
        break
  raise ConfigError(f"data.label.rule={rule!r}: expected 'binary' or an operator and number "
                    "such as '> 3', '>= 4', '== 1'")


# ---------------------------------------------------------------------------- fitted state
@dataclasses.dataclass
class Transform:
  """Fitted feature transform. `state` is JSON-serialisable."""
  state: dict[str, Any]

  @property
  def schema(self) -> schema_lib.FeatureSchema:
    return schema_lib.FeatureSchema.from_dict(self.state["schema"])

  # -- fit ---------------------------------------------------------------------------
  @classmethod
  def fit(cls, table: RawTable, data_cfg, fit_rows: np.ndarray,
          scenario_names: list[str]) -> "Transform":
    features = data_cfg.features
    reserve_fraction = float(data_cfg.get("reserve_fraction", 0.0) or 0.0)
    if not 0.0 <= reserve_fraction <= 10.0:
      raise ConfigError(f"data.reserve_fraction={reserve_fraction}: expected a fraction >= 0 "
                        "(e.g. 0.1 reserves 10% extra rows per vocabulary for `update`)")
    sparse, multi, dense_cols, vocabs, dense_state = [], [], [], {}, {}
    for name, spec in features.items():
      kind = spec.get("kind")
      column = spec.get("column", name)
      if kind in ("sparse", "multi") and column not in table.columns:
        raise DataError(f"feature '{name}' needs column '{column}', which the data does not "
                        f"have (columns: {sorted(table.columns)})", file=table.files[0],
                        field=column)
      if kind == "sparse":
        buckets = int(spec.get("hash_buckets", 0) or 0)
        if buckets > 0:
          vocabs[name] = {"hash_buckets": buckets}
          size = buckets + schema_lib.FIRST_ID
        else:
          values = as_str_column(table.columns[column][fit_rows])
          vocab = _fit_vocab(values, int(spec.get("min_count", 1)))
          vocabs[name] = {"values": vocab}
          # Rows kept free for values first seen by `mscenario update`: the table's shape
          # (and so every checkpoint) stays the same as the vocabulary grows.
          reserve = int(math.ceil(reserve_fraction * len(vocab)))
          if reserve:
            vocabs[name].update(reserve=reserve, added=[])
          size = len(vocab) + schema_lib.FIRST_ID + reserve
        sparse.append(schema_lib.SparseFeature(name, size))
      elif kind == "multi":
        col = table.columns[column][fit_rows]
        flat = np.array([str(t) for row in col.tolist() if row for t in row], dtype=str)
        vocab = _fit_vocab(flat, int(spec.get("min_count", 1)))
        vocabs[name] = {"values": vocab}
        reserve = int(math.ceil(reserve_fraction * len(vocab)))
        if reserve:
          vocabs[name].update(reserve=reserve, added=[])
        max_len = int(spec.get("max_len", 0) or 0) or max(
            [len(r) for r in col.tolist() if r] or [1])
        multi.append(schema_lib.MultiFeature(name, len(vocab) + schema_lib.FIRST_ID + reserve,
                                             max_len))
      elif kind == "dense":
        if column not in table.columns:
          raise DataError(f"dense feature '{name}' needs column '{column}', which the data "
                          f"does not have", file=table.files[0], field=column)
        values, _ = as_float_column(table, column, "skip")
        fit = values[fit_rows]
        finite = fit[np.isfinite(fit)]
        norm = spec.get("normalize", "standard")
        if norm == "standard":
          shift, scale = (float(finite.mean()), float(finite.std()) or 1.0) if len(
              finite) else (0.0, 1.0)
        elif norm == "minmax":
          shift, scale = (float(finite.min()), float(np.ptp(finite)) or 1.0) if len(
              finite) else (0.0, 1.0)
        elif norm == "none":
          shift, scale = 0.0, 1.0
        else:
          raise ConfigError(f"data.features.{name}.normalize={norm!r}: expected standard, "
                            "minmax or none")
        has_missing = bool(np.isnan(fit).any())
        dense_state[name] = {"column": column, "shift": shift, "scale": scale,
                             "default": float(spec.get("default", 0.0)),
                             "indicator": has_missing}
        dense_cols.append(name)
        if has_missing:
          dense_cols.append(f"{name}__missing")
      elif kind == "text":
        continue
      else:
        raise ConfigError(f"data.features.{name}.kind={kind!r}: expected sparse, dense, multi "
                          "or text")
    user_vocab = _fit_vocab(as_str_column(table.columns[data_cfg.user_field]), 1) if (
        data_cfg.user_field in table.columns) else []
    item_vocab = _fit_vocab(as_str_column(table.columns[data_cfg.item_field]), 1) if (
        data_cfg.item_field in table.columns) else []
    schema = schema_lib.FeatureSchema(
        sparse=tuple(sparse), multi=tuple(multi), dense=tuple(dense_cols),
        scenario_names=tuple(scenario_names),
        user_vocab_size=len(user_vocab) + schema_lib.FIRST_ID,
        item_vocab_size=len(item_vocab) + schema_lib.FIRST_ID)
    state = {
        "schema": schema.to_dict(), "vocabs": vocabs, "dense": dense_state,
        "features": {k: dict(v) for k, v in features.items()},
        "scenario": {"field": data_cfg.scenario.field, "names": list(scenario_names),
                     "groups": {k: [str(x) for x in v]
                                for k, v in data_cfg.scenario.groups.items()}},
        "label": {"field": data_cfg.label.field, "rule": data_cfg.label.rule},
        "user_field": data_cfg.user_field, "item_field": data_cfg.item_field,
        "user_vocab": user_vocab, "item_vocab": item_vocab,
    }
    return cls(state)

  # -- apply -------------------------------------------------------------------------
  def apply(self, table: RawTable, on_error: str = "raise",
            require_label: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """Raw rows -> batch-contract arrays. Returns (arrays, kept_row_mask, skipped_counts).

    Rows with an unknown scenario value, an underivable label or a non-finite number raise
    DataError (naming file, line, field) or, with on_error='skip', are dropped and counted.
    """
    s = self.state
    schema = self.schema
    n = table.num_rows
    bad = np.zeros(n, bool)
    skipped: dict[str, int] = {}

    def reject(mask, reason, field, expected, values=None):
      nonlocal bad
      mask = mask & ~bad
      if not mask.any():
        return
      if on_error != "skip":
        i = int(np.flatnonzero(mask)[0])
        f, line = table.where(i)
        value = None if values is None else values[i]
        value = value.item() if isinstance(value, np.generic) else value  # not np.str_('x')
        shown = "" if values is None else f" got {value!r}:"
        raise DataError(f"{reason}:{shown} {int(mask.sum())} row(s) affected", file=f,
                        line=line, field=field, expected=expected)
      skipped[reason] = skipped.get(reason, 0) + int(mask.sum())
      bad |= mask

    # scenario
    sfield = s["scenario"]["field"]
    if sfield not in table.columns:
      raise DataError(f"scenario field '{sfield}' is not a column of the data (columns: "
                      f"{sorted(table.columns)})", file=table.files[0], field=sfield)
    raw_s = as_str_column(table.columns[sfield])
    scenario = self._map_scenarios(raw_s)
    reject(scenario < 0, "unknown scenario value", sfield,
           f"one of {self._scenario_values()}", raw_s)

    # label
    label = np.zeros(n, np.float32)
    lfield = s["label"]["field"]
    if lfield in table.columns:
      values, unparsable = as_float_column(table, lfield, "skip")
      rule = parse_label_rule(s["label"]["rule"])
      missing = np.isnan(values)
      reject(unparsable | missing | np.isinf(values), "label value missing or not a number",
             lfield, "a number", table.columns[lfield])
      if rule is None:
        reject(~bad & ~np.isin(values, (0.0, 1.0)) & ~missing,
               "label is not 0/1 (data.label.rule='binary')", lfield, "0 or 1", values)
        label = (values == 1.0).astype(np.float32)
      else:
        op, t = rule
        label = _OPS[op](np.nan_to_num(values), t).astype(np.float32)
    elif require_label:
      raise DataError(f"label field '{lfield}' is not a column of the data (columns: "
                      f"{sorted(table.columns)})", file=table.files[0], field=lfield)

    # sparse
    sparse = np.zeros((n, len(schema.sparse)), np.int32)
    for j, f in enumerate(schema.sparse):
      column = s["features"][f.name].get("column", f.name)
      if column not in table.columns:
        raise DataError(f"feature '{f.name}' needs column '{column}'", file=table.files[0],
                        field=column)
      sparse[:, j] = self._encode(f.name, as_str_column(table.columns[column]))

    # multi
    multi = np.zeros((n, len(schema.multi), max([f.max_len for f in schema.multi] or [0])),
                     np.int32)
    for j, f in enumerate(schema.multi):
      column = s["features"][f.name].get("column", f.name)
      col = table.columns[column].tolist()
      lengths = np.array([min(len(r), f.max_len) if r else 0 for r in col], np.int64)
      flat = np.array([str(t) for r in col if r for t in r[:f.max_len]], dtype=str)
      ids = self._encode(f.name, flat)
      rows = np.repeat(np.arange(n), lengths)
      pos = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
      multi[rows, j, pos] = ids

    # dense
    dense = np.zeros((n, len(schema.dense)), np.float32)
    j = 0
    for name, d in s["dense"].items():
      if d["column"] not in table.columns:
        raise DataError(f"dense feature '{name}' needs column '{d['column']}'",
                        file=table.files[0], field=d["column"])
      values, unparsable = as_float_column(table, d["column"], on_error)
      reject(unparsable, "dense value is not a number", d["column"], "a number")
      reject(np.isinf(values), "dense value is not finite", d["column"], "a finite number",
             values)
      missing = np.isnan(values)
      filled = np.where(missing, d["default"], values)
      dense[:, j] = (filled - d["shift"]) / d["scale"]
      dense[missing, j] = (d["default"] - d["shift"]) / d["scale"]
      j += 1
      if d["indicator"]:
        dense[:, j] = missing
        j += 1

    user = self._lookup_ids(s["user_vocab"], table, s["user_field"])
    item = self._lookup_ids(s["item_vocab"], table, s["item_field"])
    arrays = {"sparse": sparse, "multi": multi, "dense": dense,
              "scenario": np.maximum(scenario, 0).astype(np.int32), "label": label,
              "user": user, "item": item}
    if "truth" in table.columns:
      arrays["truth"] = table.columns["truth"].astype(np.float32)
    keep = ~bad
    if not keep.all():
      arrays = {k: v[keep] for k, v in arrays.items()}
    return arrays, keep, skipped

  # -- growth ------------------------------------------------------------------------
  def grow(self, table: RawTable, update: int) -> list[dict]:
    """Give values first seen in `table` the next reserved rows (data.reserve_fraction).

    New values are taken in order of first appearance (deterministic for the same rows),
    honouring the feature's min_count within `table`; once a feature's reserve is used up
    the rest stay OOV and are counted. Mutates `state` and appends one record per grown
    vocabulary feature to state['vocab_growth']; returns those records.
    """
    records = []
    for name, vocab in self.state["vocabs"].items():
      if "reserve" not in vocab:
        continue  # hashed, or fitted without reserve: nothing can grow
      spec = self.state["features"][name]
      column = spec.get("column", name)
      if column not in table.columns:
        continue  # apply() reports the missing column
      col = table.columns[column]
      if spec.get("kind") == "multi":
        values = np.array([str(t) for row in col.tolist() if row for t in row], dtype=str)
      else:
        values = as_str_column(col)
      if len(values) == 0:
        continue
      uniq, first, counts = np.unique(values, return_index=True, return_counts=True)
      known = _vocab_ids(vocab["values"], uniq) != schema_lib.OOV_ID
      known |= np.isin(uniq, np.asarray(vocab["added"], dtype=str))
      new = ~known & (uniq != MISSING) & (counts >= max(int(spec.get("min_count", 1)), 1))
      order = np.flatnonzero(new)[np.argsort(first[new], kind="stable")]
      left = vocab["reserve"] - len(vocab["added"])
      take, rest = order[:left], order[left:]
      vocab["added"].extend(uniq[take].tolist())
      if len(take) or len(rest):
        records.append({"update": int(update), "feature": name, "added": int(len(take)),
                        "reserve_left": int(left - len(take)),
                        "oov_values": int(len(rest)), "oov_rows": int(counts[rest].sum())})
    self.state.setdefault("vocab_growth", []).extend(records)
    return records

  # -- pieces ------------------------------------------------------------------------
  def _scenario_values(self) -> list[str]:
    groups = self.state["scenario"]["groups"]
    if groups:
      return sorted({v for vs in groups.values() for v in vs})
    return list(self.state["scenario"]["names"])

  def _map_scenarios(self, raw: np.ndarray) -> np.ndarray:
    names = self.state["scenario"]["names"]
    groups = self.state["scenario"]["groups"]
    lookup = ({v: names.index(g) for g, vs in groups.items() for v in vs} if groups
              else {v: i for i, v in enumerate(names)})
    uniq, inv = np.unique(raw, return_inverse=True)
    mapped = np.array([lookup.get(u, -1) for u in uniq.tolist()], np.int32)
    return mapped[inv] if len(raw) else np.zeros(0, np.int32)

  def _encode(self, name: str, values: np.ndarray) -> np.ndarray:
    vocab = self.state["vocabs"][name]
    if len(values) == 0:
      return np.zeros(0, np.int32)
    uniq, inv = np.unique(values, return_inverse=True)
    if "hash_buckets" in vocab:
      ids = schema_lib.FIRST_ID + stable_hash(uniq, vocab["hash_buckets"])
    else:
      ids = _vocab_ids(vocab["values"], uniq)
      if vocab.get("added"):
        ids = _added_ids(vocab, uniq, ids)
    ids = np.where(uniq == MISSING, schema_lib.PAD_ID, ids)
    return ids[inv].astype(np.int32)

  @staticmethod
  def _lookup_ids(vocab: list[str], table: RawTable, field: str) -> np.ndarray:
    if field not in table.columns or not vocab:
      return np.zeros(table.num_rows, np.int32)
    values = as_str_column(table.columns[field])
    uniq, inv = np.unique(values, return_inverse=True)
    return _vocab_ids(vocab, uniq)[inv].astype(np.int32)


def _fit_vocab(values: np.ndarray, min_count: int) -> list[str]:
  """Sorted values seen at least `min_count` times (missing excluded)."""
  if len(values) == 0:
    return []
  uniq, counts = np.unique(values, return_counts=True)
  keep = (counts >= max(min_count, 1)) & (uniq != MISSING)
  return uniq[keep].tolist()


def _added_ids(vocab: dict, uniq: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Values grown by `update` sit after the fitted ones, in the order they were added."""
  added = np.asarray(vocab["added"], dtype=str)
  order = np.argsort(added, kind="stable")
  pos = np.searchsorted(added[order], uniq)
  pos_c = np.minimum(pos, len(added) - 1)
  found = (added[order][pos_c] == uniq) & (ids == schema_lib.OOV_ID)
  grown = schema_lib.FIRST_ID + len(vocab["values"]) + order[pos_c]
  return np.where(found, grown, ids)


def _vocab_ids(vocab: list[str], uniq: np.ndarray) -> np.ndarray:
  """Ids of `uniq` values in sorted `vocab` (OOV when absent)."""
  if not vocab:
    return np.full(len(uniq), schema_lib.OOV_ID, np.int64)
  v = np.asarray(vocab, dtype=str)
  pos = np.searchsorted(v, uniq)
  pos_c = np.minimum(pos, len(v) - 1)
  found = v[pos_c] == uniq
  return np.where(found, pos_c + schema_lib.FIRST_ID, schema_lib.OOV_ID)
