"""`data.source='table'`: one CSV / Parquet file, or pre-split train / valid / test files.

Column types follow the config, not the file's guess: ids, the scenario field and sparse /
text features become str (so '3' and 3 are the same category), dense features float64,
multi-valued features tuples of str. Other columns are float64 when every value in every
file is numeric, else str.
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mscenario.data.sources import _io
from mscenario.data.sources.paths import resolve_path
from mscenario.data.table import RawTable
from mscenario.errors import ConfigError, DataError

SPLIT_COLUMN = "__split__"


def _get(obj, key, default=None):
  """`obj[key]` for a ConfigDict or dict spec, `default` when absent."""
  try:
    return obj.get(key, default)
  except AttributeError:
    return getattr(obj, key, default)


def column_roles(data_cfg) -> tuple[set, set, dict]:
  """(str columns, float columns, {multi column: separator}) the config asks for."""
  as_str = {_get(data_cfg, "user_field", "user_id"), _get(data_cfg, "item_field", "item_id")}
  scenario = _get(data_cfg, "scenario")
  if scenario is not None and _get(scenario, "field"):
    as_str.add(_get(scenario, "field"))
  as_float, multi = set(), {}
  for name, spec in (_get(data_cfg, "features") or {}).items():
    column, kind = _get(spec, "column", name) or name, _get(spec, "kind", "sparse")
    if kind == "dense":
      as_float.add(column)
    elif kind == "multi":
      multi[column] = _get(spec, "sep", "|")
    else:  # sparse, text
      as_str.add(column)
  return as_str - set(multi), as_float - as_str - set(multi), multi


def table_paths(data_cfg) -> list[tuple[str, str]]:
  """[(split, path)]: the train file alone, or train plus the given valid / test files."""
  table = data_cfg.table
  if not _get(table, "train"):
    raise ConfigError("data.source='table' needs data.table.train (a .csv or .parquet path)")
  return [(split, resolve_path(_get(table, split), data_cfg))
          for split in ("train", "valid", "test") if _get(table, split, "")]


def load_table(data_cfg) -> RawTable:
  """RawTable from CSV / Parquet file(s); pre-split files add a `__split__` column."""
  policy = _io.Policy(_get(data_cfg, "on_error", "raise"))
  paths = table_paths(data_cfg)
  mapping = dict(_get(data_cfg.table, "columns", {}) or {})
  delimiter = _get(data_cfg.table, "delimiter", ",") or ","
  frames = [_rename(_read(path, delimiter, policy), mapping) for _, path in paths]
  roles = column_roles(data_cfg)
  frames = _convert(frames, roles, policy)
  sizes = [f.num_rows for f in frames]
  columns = _concat([_io.frame_numpy(f) for f in frames], sizes, multi=set(roles[2]))
  if len(paths) > 1:
    columns[SPLIT_COLUMN] = np.repeat(np.array([s for s, _ in paths], dtype=object), sizes)
  return RawTable(
      columns=columns,
      row_file=np.repeat(np.arange(len(frames), dtype=np.int32), sizes),
      row_line=np.concatenate([f.lines for f in frames]).astype(np.int64),
      files=[p for _, p in paths], skipped=policy.skipped)


def _read(path: str, delimiter: str, policy: _io.Policy) -> _io.Frame:
  """CSV (every column as text) or Parquet (arrow types); Parquet 'lines' are row numbers."""
  if not os.path.isfile(path):
    raise DataError("file not found", file=path, expected="an existing .csv or .parquet file")
  if path.lower().endswith((".parquet", ".pq")):
    try:
      table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
      raise DataError(f"cannot read Parquet: {e}", file=path) from None
    table = _plain_columns(table, path)
    kinds = {n: _arrow_kind(table.schema.field(n).type) for n in table.column_names}
    return _io.Frame(table, np.arange(1, table.num_rows + 1, dtype=np.int64), path, kinds)
  if delimiter in ("\\t", "tab"):
    delimiter = "\t"
  return _io.read_delimited(path, policy, delimiter=delimiter, quoting=True)


def _scalar(typ: pa.DataType) -> bool:
  return not (pa.types.is_nested(typ) or pa.types.is_dictionary(typ))


def _plain_columns(table: pa.Table, path: str) -> pa.Table:
  """Parquet columns as numbers, text or lists of scalars: dictionaries are decoded, binary
  must be UTF-8 text; anything else (structs, maps, lists of lists) is a DataError naming the
  column, rather than a pyarrow traceback later."""
  for i, name in enumerate(table.column_names):
    col = table.column(i)
    typ = col.type
    if pa.types.is_dictionary(typ):
      col, typ = col.cast(typ.value_type), typ.value_type
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_fixed_size_binary(
        typ):
      for row, value in enumerate(col.to_pylist()):
        try:
          value is None or value.decode("utf-8")
        except UnicodeDecodeError:
          raise DataError("binary value is not UTF-8 text", file=path, line=row + 1,
                          field=name, expected="UTF-8 text") from None
      col, typ = pc.cast(col, pa.string()), pa.string()
    if pa.types.is_null(typ):
      col, typ = pc.cast(col, pa.string()), pa.string()
    listy = pa.types.is_list(typ) or pa.types.is_large_list(typ)
    if (listy and not _scalar(typ.value_type)) or (not listy and not _scalar(typ)):
      raise DataError(f"column type {typ} is not supported", file=path, field=name,
                      expected="numbers, text, or lists of numbers or text")
    if col is not table.column(i):
      table = table.set_column(i, name, col)
  return table


def _arrow_kind(typ: pa.DataType) -> str:
  if pa.types.is_list(typ) or pa.types.is_large_list(typ):
    return "list"
  if pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ):
    return "float"
  return "str"


def _rename(frame: _io.Frame, mapping: dict) -> _io.Frame:
  """File column names -> canonical names per `data.table.columns`."""
  names = frame.table.column_names
  inverse = {}
  for canonical, column in mapping.items():
    if column not in names:
      raise DataError(f"no column '{column}' (data.table.columns.{canonical})", file=frame.path,
                      line=None if frame.path.lower().endswith((".parquet", ".pq")) else 1,
                      field=column, expected=f"one of {names}")
    inverse[column] = canonical
  renamed = [inverse.get(n, n) for n in names]
  frame.table = frame.table.rename_columns(renamed)
  frame.kinds = {inverse.get(n, n): k for n, k in frame.kinds.items()}
  return frame


def _convert(frames: list[_io.Frame], roles, policy: _io.Policy) -> list[_io.Frame]:
  """Settle each column's type across all files, then convert (bad numbers -> policy)."""
  as_str, as_float, multi = roles
  names = dict.fromkeys(n for f in frames for n in f.table.column_names)
  # Inferred over every row, before any bad row elsewhere is dropped (else a column's type
  # would depend on the other columns' errors and on the column order).
  numeric = {name: all(_numeric(f, name) for f in frames if name in f.table.column_names)
             for name in names if name not in as_str | as_float | set(multi)}
  out = list(frames)
  for name in names:
    having = [i for i, f in enumerate(out) if name in f.table.column_names]
    lists = [i for i in having if out[i].kinds[name] == "list"]
    if lists and name not in multi:  # a Parquet list column where one value is expected
      if name in as_str or name in as_float:
        raise DataError("holds lists", file=out[lists[0]].path, field=name,
                        expected="one value per row (or a feature of kind 'multi')")
      for i in having:  # a column the config does not use: keep lists as tuples
        if out[i].kinds[name] != "list":
          out[i].kinds[name], out[i].seps[name] = "seq", " "
      continue
    if name in multi:
      for i in having:
        kind = "list" if out[i].kinds[name] == "list" else "seq"
        col = out[i].column(name)
        if kind == "seq" and not pa.types.is_string(col.type):  # one number: one value
          out[i].set_column(name, pc.cast(col, pa.string()), kind)
        out[i].kinds[name], out[i].seps[name] = kind, multi[name]
    elif name in as_str:
      for i in having:
        out[i].kinds[name] = "str"
    elif name in as_float or numeric[name]:
      for i in having:
        out[i] = _io.cast_float(out[i], name, policy)
    else:
      for i in having:
        out[i].kinds[name] = "str"
  return out


def _numeric(frame: _io.Frame, name: str) -> bool:
  """Whether every value of a column reads as a number (missing markers allowed)."""
  col = frame.column(name)
  if frame.kinds[name] == "float":
    return True
  if not pa.types.is_string(col.type):
    return False
  col = pc.utf8_trim_whitespace(col)
  col = pc.if_else(pc.is_in(col, value_set=pa.array(_io.NUMERIC_MISSING)),
                   pa.scalar(None, pa.string()), col)
  if col.null_count == len(col):
    return False  # an all-empty column says nothing; keep it as text
  try:
    pc.cast(col, pa.float64())
  except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
    return False
  return True


def _concat(parts: list[dict], sizes: list[int], multi: set) -> dict[str, np.ndarray]:
  """Column-wise concatenation; a column absent from a file is missing in its rows."""
  names = dict.fromkeys(n for p in parts for n in p)
  out = {}
  for name in names:
    arrays = [p.get(name) for p in parts]
    numeric = all(a is None or a.dtype == np.float64 for a in arrays)
    filled = []
    for a, n in zip(arrays, sizes):
      if a is None and numeric:
        a = np.full(n, np.nan)
      elif a is None:
        a = np.empty(n, dtype=object)
        a[:] = [()] * n if name in multi else None
      elif not numeric and a.dtype == np.float64:
        a = _io.str_numpy(pa.array(a))
      filled.append(a)
    out[name] = np.concatenate(filled) if filled else np.empty(0)
  return out
