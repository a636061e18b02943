"""`data.source='tfds'`: a TensorFlow Datasets dataset prepared in `array_record` format.

Read through TFDS's random-access data source (`builder.as_data_source`, which is what
`tfds.data_source` returns): array_record files, no TensorFlow at read time. Records are
fetched in blocks as raw bytes and decoded here, field by field, straight from the
`tf.train.Example` protos: TFDS's own per-record `ds[i]` is ~1.5k records/s on one core and its
batched decode ~22k/s, this path ~70k/s (BENCHMARKS.md, "TFDS source read rate"). A wrong-typed
sequence feature reads as empty on this fast path; wrong-typed or missing scalars are caught.

Columns: every top-level feature whose stored form is its value (Text, scalars, ClassLabel as its
integer, 1-D Tensors / Sequences of those); others (images, encoded tensors, nested dicts) are
left out, and naming one in the config is an error. `data.tfds.columns` renames features to the
canonical names exactly as `data.table.columns` does for a table; types then follow the config as
for the table source: ids, the scenario field and sparse / text features str, dense features
float64, multi-valued features tuples of str; other numeric features float64, text str.

Provenance: one pseudo-file per split ('<dataset dir> [split 'train']'), line = record index + 1
within that (possibly sliced) split, so later errors point at the record.

Length: the fast block decoder and the slow TFDS-decoding fallback that names a bad record
must read the same features the same way.
"""
from __future__ import annotations

import os

import numpy as np
from tqdm.auto import tqdm

from mscenario.data.sources import _io
from mscenario.data.sources.tabular import SPLIT_COLUMN, column_roles
from mscenario.data.table import RawTable
from mscenario.errors import ConfigError, DataError

BLOCK = 1 << 14          # records fetched and decoded per block
PROGRESS_FROM = 200_000  # show a progress bar for splits at least this long (on a terminal)
SPLIT_SLOTS = ("train", "valid", "test")


def _get(obj, key, default=None):
  try:
    return obj.get(key, default)
  except AttributeError:
    return getattr(obj, key, default)


def _settings(data_cfg):
  spec = _get(data_cfg, "tfds")
  if spec is None:
    raise ConfigError("data.source='tfds' needs a data.tfds section (name, data_dir, splits)")
  return spec


def data_dir(data_cfg) -> str | None:
  """`data.tfds.data_dir` made absolute (`~` expanded), or None for TFDS's default
  ($TFDS_DATA_DIR, else ~/tensorflow_datasets)."""
  d = _get(_settings(data_cfg), "data_dir", "") or ""
  return os.path.abspath(os.path.expanduser(d)) if d else None


def split_plan(data_cfg) -> list[tuple[str, str]]:
  """[(our split or '', tfds split)]: one TFDS split -> [('', s)] (divided later by
  `data.split`); three -> train / valid / test as given ('' = none)."""
  splits = _get(_settings(data_cfg), "splits", ("train",))
  if isinstance(splits, str):
    splits = (splits,)
  splits = tuple(str(s or "").strip() for s in splits)
  if len(splits) == 1 and splits[0]:
    return [("", splits[0])]
  if len(splits) == 3 and splits[0]:
    return [(ours, s) for ours, s in zip(SPLIT_SLOTS, splits) if s]
  raise ConfigError(f"data.tfds.splits={splits}: expected one TFDS split (divided by "
                    "data.split, e.g. ('train',)) or three for train, valid, test (e.g. "
                    "('train', 'validation', 'test'); '' for none; slices like 'train[:90%]' "
                    "work)")


def open_builder(data_cfg):
  """The prepared dataset's builder, read from its files (nothing is downloaded or built)."""
  import tensorflow_datasets as tfds
  spec = _settings(data_cfg)
  name = (_get(spec, "name", "") or "").strip()
  where = data_dir(data_cfg)
  try:
    if name:
      builder = tfds.builder(name, data_dir=where)
    elif where:
      builder = tfds.builder_from_directory(where)
    else:
      raise ConfigError("data.source='tfds' needs data.tfds.name (e.g. 'my_dataset' or "
                        "'my_dataset/config:1.0.0'), or data.tfds.data_dir pointing at the "
                        "prepared version directory (the one holding dataset_info.json)")
  except (ValueError, OSError, KeyError) as e:  # DatasetNotFoundError is a ValueError
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f"cannot open TFDS dataset {name or where!r}: {first}",
                    file=where or "$TFDS_DATA_DIR / ~/tensorflow_datasets",
                    expected="a dataset prepared under data.tfds.data_dir (<data_dir>/<name>/"
                             "<version>/dataset_info.json)") from None
  if not builder.is_prepared():
    raise DataError(f"TFDS dataset {builder.name!r} is not prepared", file=str(builder.data_dir),
                    expected="a prepared dataset: build it where TensorFlow is available with "
                             "`tfds build --file_format=array_record`, then point "
                             "data.tfds.data_dir at the output")
  return builder


def _data_source(builder, split: str):
  from tensorflow_datasets.core import decode
  try:
    return builder.as_data_source(split=split,
                                  deserialize_method=decode.DeserializeMethod.RAW_BYTES)
  except (ValueError, NotImplementedError) as e:
    if "split" in str(e).lower():
      raise ConfigError(_split_message(e, builder)) from None
    raise DataError(f"cannot read {builder.name!r} with random access: "
                    f"{str(e).splitlines()[0]}", file=str(builder.data_dir),
                    expected="a dataset prepared in array_record format (`tfds build "
                             "--file_format=array_record`, or `tfds convert_format` an "
                             "existing tfrecord one)") from None


def _split_message(error: Exception, builder) -> str:
  first = str(error).strip().splitlines()[0]
  known = "" if "one of" in first else f" ({builder.name} has {list(builder.info.splits)})"
  return f"data.tfds.splits: {first}{known}"


def source_files(data_cfg) -> list[str]:
  """The array_record shards the configured splits read, plus dataset_info.json and
  features.json (for the prepared-data cache fingerprint)."""
  from tensorflow_datasets.core.data_sources import base
  builder = open_builder(data_cfg)
  files = set()
  for _, split in split_plan(data_cfg):
    try:
      files.update(os.fspath(f.filename) for f in base.file_instructions(builder.info, split))
    except (ValueError, KeyError) as e:
      raise ConfigError(_split_message(e, builder)) from None
  for meta in ("dataset_info.json", "features.json"):
    path = os.path.join(os.fspath(builder.data_dir), meta)
    if os.path.isfile(path):
      files.add(path)
  return sorted(files)


# ---------------------------------------------------------------------------- features
def readable_features(features) -> dict[str, tuple[str, bool]]:
  """{feature: (proto kind 'bytes' | 'int' | 'float', is a list)} for the features stored as
  their values (rank 0 or 1), in the dataset's feature order."""
  from tensorflow_datasets.core.utils import dtype_utils
  out = {}
  for name in features.keys():
    f = features[name]
    try:
      stored, value = f.get_serialized_info(), f.get_tensor_info()
    except (AttributeError, NotImplementedError):
      continue
    if isinstance(stored, dict) or isinstance(value, dict):
      continue  # nested FeaturesDict
    shape = tuple(stored.shape)
    if (shape != tuple(value.shape) or stored.np_dtype != value.np_dtype or len(shape) > 1
        or getattr(stored, "sequence_rank", 0) not in (0, 1)):
      continue  # decoded on read (images, encoded tensors...) or multi-dimensional
    dtype = stored.np_dtype
    if dtype_utils.is_string(dtype):
      kind = "bytes"
    elif dtype_utils.is_integer(dtype) or dtype_utils.is_bool(dtype):
      kind = "int"
    elif dtype_utils.is_floating(dtype):
      kind = "float"
    else:
      continue
    out[name] = (kind, len(shape) == 1)
  return out


_LIST = {"bytes": "bytes_list", "int": "int64_list", "float": "float_list"}


def _block_values(feats, name, kind, is_list, as_text):
  """One column of a block of parsed `Features` maps (fast path: any problem raises)."""
  attr = _LIST[kind]
  if is_list:
    if kind == "bytes":
      return [tuple(v.decode("utf-8") for v in getattr(f[name], attr).value) for f in feats]
    return [tuple(getattr(f[name], attr).value) for f in feats]
  vals = [getattr(f[name], attr).value[0] for f in feats]
  if kind == "bytes" and as_text:
    return [v.decode("utf-8") for v in vals]
  return vals


def _check_record(record: bytes, wanted: dict) -> tuple[str | None, str, str]:
  """(field, problem, expected) of a record the fast path rejected."""
  from google.protobuf.message import DecodeError
  from tensorflow_datasets.proto import tf_example_generated_pb2 as example_pb2
  try:
    fmap = example_pb2.Example.FromString(record).features.feature
  except DecodeError as e:
    return None, f"not a tf.train.Example ({e})", "a serialized tf.train.Example"
  for name, (kind, is_list) in wanted.items():
    if name not in fmap:
      return name, "the field is missing", f"a {kind} value"
    feat = fmap[name]
    got = feat.WhichOneof("kind")
    values = getattr(feat, _LIST[kind]).value
    if got is not None and got != _LIST[kind]:
      return name, f"holds a {got}", f"a {_LIST[kind]} as dataset_info says"
    if not is_list and len(values) != 1:
      return name, f"holds {len(values)} values", "exactly one value"
    if kind == "bytes":
      for v in values:
        try:
          v.decode("utf-8")
        except UnicodeDecodeError:
          return name, f"value {v[:40]!r} is not UTF-8 text", "UTF-8 text"
  return None, "cannot be decoded", "a record matching dataset_info.json"


def _read_split(source, label: str, wanted: dict, as_text: set, policy: _io.Policy):
  """(columns as lists, kept record indices) of one split, decoded in blocks."""
  from tensorflow_datasets.proto import tf_example_generated_pb2 as example_pb2
  parse = example_pb2.Example.FromString
  n = len(source)
  cols = {name: [] for name in wanted}
  kept = []
  bar = tqdm(total=n, unit="rec", desc=f"tfds {label}", leave=False,
             disable=True if n < PROGRESS_FROM else None)
  with bar:
    for start in range(0, n, BLOCK):
      index = list(range(start, min(start + BLOCK, n)))
      records = source.__getitems__(index)
      try:
        feats = [parse(r).features.feature for r in records]
        block = {name: _block_values(feats, name, kind, is_list, name in as_text)
                 for name, (kind, is_list) in wanted.items()}
        keep = index
      except Exception:  # noqa: BLE001 - any failure: redo the block record by record
        block, keep = _slow_block(records, index, label, wanted, as_text, policy)
      for name in wanted:
        cols[name].extend(block[name])
      kept.extend(keep)
      bar.update(len(index))
  return cols, np.asarray(kept, dtype=np.int64)


def _slow_block(records, index, label, wanted, as_text, policy):
  """A block with a bad record: find it, name it (split, record, field), raise or skip."""
  from tensorflow_datasets.proto import tf_example_generated_pb2 as example_pb2
  block, keep = {name: [] for name in wanted}, []
  for i, record in zip(index, records):
    try:
      feats = [example_pb2.Example.FromString(record).features.feature]
      one = {name: _block_values(feats, name, kind, is_list, name in as_text)
             for name, (kind, is_list) in wanted.items()}
    except Exception:  # noqa: BLE001 - diagnosed below
      field, problem, expected = _check_record(record, wanted)
      policy.bad(f"{label}: {problem if field is None else f'bad {field!r}'}", 1,
                 message=f"record {i}: {problem}", file=label, line=i + 1, field=field,
                 expected=expected)
      continue
    for name in wanted:
      block[name].extend(one[name])
    keep.append(i)
  return block, keep


def _column(values: list, kind: str, is_list: bool, role: str, sep: str = "|") -> np.ndarray:
  """A RawTable column: role 'str' | 'float' | 'multi' | '' (the value's own type)."""
  if role == "multi" or is_list:
    out = np.empty(len(values), dtype=object)
    if role == "multi" and not is_list:  # one text per record: 'a|b' -> ('a', 'b')
      out[:] = [tuple(t for t in (_num_str(v) if kind != "bytes" else v).split(sep) if t)
                for v in values]
    elif role == "multi" and kind != "bytes":
      out[:] = [tuple(_num_str(x) for x in v) for v in values]
    else:
      out[:] = values
    return out
  if role == "str" or (kind == "bytes" and role != "float"):
    if kind == "bytes":
      return np.asarray(values, dtype=object)
    if kind == "float":
      return np.asarray([_num_str(v) for v in values], dtype=object)
    return np.asarray(values, dtype=np.int64).astype(str).astype(object)
  if kind == "bytes":  # text where the config wants a number
    return np.asarray(values, dtype=object)  # converted (with errors) below
  return np.asarray(values, dtype=np.float64)


def _num_str(v) -> str:
  return repr(float(v)) if isinstance(v, float) and not float(v).is_integer() else str(
      int(v) if isinstance(v, float) else v)


def load_tfds(data_cfg) -> RawTable:
  """RawTable from the configured TFDS splits; several splits add a `__split__` column."""
  policy = _io.Policy(_get(data_cfg, "on_error", "raise"))
  builder = open_builder(data_cfg)
  plan = split_plan(data_cfg)
  spec = _settings(data_cfg)
  mapping = dict(_get(spec, "columns", {}) or {})
  available = readable_features(builder.info.features)
  all_names = list(builder.info.features.keys())
  for canonical, feature in mapping.items():
    if feature not in available:
      why = ("is not a flat value feature (images, encoded tensors and nested dicts are not "
             "read)") if feature in all_names else "does not exist"
      raise ConfigError(f"data.tfds.columns.{canonical}={feature!r}: the feature {why} in "
                        f"{builder.name} (readable: {sorted(available)})")
  inverse = {f: c for c, f in mapping.items()}
  as_str, as_float, multi = column_roles(data_cfg)
  canonical_of = {f: inverse.get(f, f) for f in available}
  for name in as_str | as_float | set(multi):
    if name in all_names and name not in available and name not in inverse.values():
      raise ConfigError(f"feature {name!r} of {builder.name} is not a flat value feature "
                        "(images, encoded tensors and nested dicts are not read)")
  as_text = {f for f in available if available[f][0] == "bytes"}
  base_dir = os.fspath(builder.data_dir)
  files, parts, sizes = [], [], []
  for ours, split in plan:
    label = f"{base_dir} [split {split!r}]"
    cols, kept = _read_split(_data_source(builder, split), label, available, as_text, policy)
    files.append(label)
    parts.append((cols, kept))
    sizes.append(len(kept))
  columns, keep = {}, np.ones(sum(sizes), bool)
  for feature, (kind, is_list) in available.items():
    name = canonical_of[feature]
    role = ("multi" if name in multi else "str" if name in as_str else
            "float" if name in as_float else "")
    values = [v for cols, _ in parts for v in cols[feature]]
    col = _column(values, kind, is_list, role, multi.get(name, "|"))
    if role == "float" and col.dtype == object:
      col, bad = _text_to_float(col, name, files, parts, policy)
      keep &= ~bad
    columns[name] = col
  if len(plan) > 1 or plan[0][0]:
    columns[SPLIT_COLUMN] = np.repeat(np.array([o for o, _ in plan], dtype=object), sizes)
  table = RawTable(
      columns=columns,
      row_file=np.repeat(np.arange(len(files), dtype=np.int32), sizes),
      row_line=np.concatenate([k for _, k in parts]) + 1 if parts else np.zeros(0, np.int64),
      files=files, skipped=policy.skipped)
  return table if keep.all() else table.take(keep)


def _text_to_float(col, name, files, parts, policy):
  """A text feature the config uses as a dense number: (float64 column, mask of bad values);
  the first bad value raises unless data.on_error='skip' (then those rows are dropped)."""
  out = np.full(len(col), np.nan)
  bad = np.zeros(len(col), bool)
  for i, v in enumerate(col):
    text = (v or "").strip()
    if text in _io.NUMERIC_MISSING:
      continue
    try:
      out[i] = float(text)
    except ValueError:
      bad[i] = True
  if bad.any():
    first = int(np.flatnonzero(bad)[0])
    offsets = np.cumsum([0] + [len(k) for _, k in parts])
    split = int(np.searchsorted(offsets, first, side="right") - 1)
    record = int(parts[split][1][first - offsets[split]])
    policy.bad(f"non-numeric {name!r}", int(bad.sum()),
               message=f"record {record}: {col[first]!r} is not a number",
               file=files[split], line=record + 1, field=name, expected="a number")
  return out, bad
