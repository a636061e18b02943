"""Property-based fuzzing of every input reader (issue 10 §2), shared by the short run in
tests/test_fuzz_inputs.py and the long one in benchmarks/fuzz_inputs.py.

Each `check_*` takes a Hypothesis-generated case, writes it to a file (or applies it as an
override) and returns the outcome: 'loaded', 'skipped' (loaded under on_error=skip with rows
dropped and counted) or 'user-error'. The property: a file either loads with the documented
semantics -- compared value by value with an independent reference reader written here -- or
raises the project's user error naming file, line and field; any other exception fails.
"""
from __future__ import annotations

import math
import os
import re
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import strategies as st
from ml_collections import ConfigDict

from mscenario import config as config_lib
from mscenario.data.sources.movielens import load_movielens
from mscenario.data.sources.recbole import load_recbole
from mscenario.data.sources.tabular import load_table
from mscenario.errors import ConfigError, DataError

MISSING = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "None")
NUMBER = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)",
                    re.IGNORECASE | re.ASCII)

# ------------------------------------------------------------------ generated text
# Cells mix plain values with the characters and spellings that broke readers before.
NASTY = ["1_000", "３", "٣", "1e", "0x10", " 7 ", "inf", "-nan", "NA", "", " ", "\x00", "\x1f",
         "::", ":", "\t", "|", ",", '"', '""', "'", "\r", "\\", "\u2028", "\ufeff", "é", "😀",
         "1.5 abc", "1 2 3", "2024-01-02T03:04", "1e400", "-0", ".5", "5."]
cell = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet="abcxyz019 .-_", max_size=6),
    st.sampled_from(NASTY),
    st.text(max_size=8),
)


@st.composite
def table_rows(draw, n_fields, max_rows=12):
  rows = draw(st.lists(st.lists(cell, min_size=n_fields, max_size=n_fields), max_size=max_rows))
  # sometimes a row with a field too many or too few
  if rows and draw(st.booleans()):
    i = draw(st.integers(0, len(rows) - 1))
    rows[i] = rows[i][:-1] if draw(st.booleans()) else rows[i] + ["x"]
  return rows


@st.composite
def byte_mutation(draw, raw: bytes) -> bytes:
  """Optionally corrupt the file at the byte level (random bytes, a cut, a lost newline)."""
  kind = draw(st.sampled_from(["none", "none", "insert", "replace_line", "truncate", "crlf",
                               "join_lines", "bom"]))
  if kind == "insert" and raw:
    pos = draw(st.integers(0, len(raw)))
    return raw[:pos] + draw(st.binary(min_size=1, max_size=40)) + raw[pos:]
  if kind == "replace_line":
    lines = raw.split(b"\n")
    i = draw(st.integers(0, len(lines) - 1))
    lines[i] = draw(st.binary(max_size=40))
    return b"\n".join(lines)
  if kind == "truncate" and raw:
    return raw[:draw(st.integers(0, len(raw)))]
  if kind == "crlf":
    return raw.replace(b"\n", b"\r\n")
  if kind == "join_lines" and b"\n" in raw:
    i = raw.index(b"\n", draw(st.integers(0, max(raw.rfind(b"\n"), 0))))
    return raw[:i] + raw[i + 1:]
  if kind == "bom":
    return b"\xef\xbb\xbf" + raw
  return raw


# ------------------------------------------------------------------ the reference reader
def trim(text: str) -> str:
  return pc.utf8_trim_whitespace(pa.array([text]))[0].as_py()


def ref_number(text):
  """(ok, value) of a numeric field as documented: missing markers -> NaN, else a plain
  decimal number (what pyarrow's cast reads)."""
  if text is None:
    return True, math.nan
  t = trim(text)
  if t in MISSING:
    return True, math.nan
  if NUMBER.fullmatch(t):
    return True, float(t)
  return False, None


def ref_lines(raw: bytes, multi: bool):
  """[(line number, text or None when unreadable)] of the non-blank lines."""
  if raw.startswith(b"\xef\xbb\xbf"):
    raw = raw[3:]
  parts = raw.split(b"\n")
  if parts and parts[-1] == b"":
    parts.pop()
  out = []
  for i, b in enumerate(parts, 1):
    if b.endswith(b"\r"):
      b = b[:-1]
    try:
      text = b.decode("utf-8")
    except UnicodeDecodeError:
      out.append((i, None))
      continue
    if "\r" in text or (multi and "\x1f" in text):
      out.append((i, None))
      continue
    if text:
      out.append((i, text))
  return out


def ref_delimited(raw: bytes, delimiter: str, names, kinds_of, rename=lambda n: n):
  """Reference parse of an unquoted delimited file.

  Returns (header_error, rows, bad): rows = {line: {field: value}} of good rows, bad = {line:
  set of fields at fault ('*' = the whole line)}. `names` None = read the header line;
  `kinds_of(names)` gives each field's kind (str, float, seq, floatseq) or raises ValueError
  for a bad header.
  """
  lines = ref_lines(raw, len(delimiter) > 1)
  rows, bad = {}, {}
  if names is None:
    if not lines or lines[0][0] != 1 or lines[0][1] is None or not lines[0][1].strip():
      return "header", rows, bad
    names = [n.strip() for n in lines[0][1].split(delimiter)]
    lines = lines[1:]
    try:
      kinds = kinds_of(names)
    except ValueError:
      return "header", rows, bad
  else:
    kinds = kinds_of(names)
  names = [rename(n) for n in names]
  for line, text in lines:
    if text is None:
      bad[line] = {"*"}
      continue
    fields = text.split(delimiter)
    if len(fields) != len(names):
      bad[line] = {"*"}
      continue
    row, faults = {}, set()
    for name, kind, value in zip(names, kinds, fields):
      if kind == "float":
        ok, v = ref_number(value if value != "" else None)
        if not ok:
          faults.add(name)
        row[name] = v
      elif kind == "floatseq":
        tokens = value.split()
        if any(not NUMBER.fullmatch(t) for t in tokens):
          faults.add(name)
        else:
          row[name] = tuple(float(t) for t in tokens)
      elif kind == "seq":
        row[name] = tuple(t.strip() for t in value.split() if t.strip())
      else:
        row[name] = value if value != "" else None
    if faults:
      bad[line] = faults
    else:
      rows[line] = row
  return None, rows, bad


def same(a, b) -> bool:
  if isinstance(a, float) or isinstance(b, float):
    if a is None or b is None:
      return False
    return (math.isnan(a) and math.isnan(b)) or a == b
  if isinstance(a, tuple) and isinstance(b, tuple):
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
  return a == b


def compare(table, rows: dict, columns: dict, label: str):
  """The loaded RawTable holds exactly `rows` (by line), with `columns` {output: ref field}."""
  lines = table.row_line.tolist()
  assert sorted(lines) == sorted(rows), f"{label}: rows at lines {lines}, expected {sorted(rows)}"
  for out, field in columns.items():
    got = table.columns[out]
    for k, line in enumerate(lines):
      want = rows[line][field]
      g = got[k]
      g = float(g) if isinstance(g, (np.floating, float)) else g
      assert same(g, want), f"{label}: line {line} field {field}: read {g!r}, file says {want!r}"


def expect_outcome(load, path, header_error, rows, bad, columns, label, on_error,
                   has_header=True):
  """Run `load` and check it against the reference parse."""
  try:
    table = load()
  except DataError as e:
    assert e.file is not None and os.path.abspath(e.file) in (path, os.path.dirname(path)), e
    if header_error:
      return "user-error"
    assert e.line is not None, f"{label}: no line in {e}"
    if has_header and e.line == 1 and not bad.get(1):
      return "user-error"  # the header
    assert e.line in bad, f"{label}: error at line {e.line}, but the bad lines are {sorted(bad)}: {e}"
    assert e.field is not None, f"{label}: no field in {e}"
    assert "*" in bad[e.line] or e.field in bad[e.line], f"{label}: field {e.field}: {e}"
    assert on_error == "raise" or "*" in bad[e.line] or e.line == 1, \
        f"{label}: on_error=skip raised for a skippable row: {e}"
    return "user-error"
  assert not header_error, f"{label}: a bad header loaded"
  if on_error == "raise":
    assert not bad, f"{label}: loaded although lines {sorted(bad)} are bad"
  else:
    assert sum(table.skipped.values()) == len(bad), \
        f"{label}: skipped {table.skipped}, expected {len(bad)} rows (lines {sorted(bad)})"
  compare(table, rows, columns, label)
  return "skipped" if bad else "loaded"


# ------------------------------------------------------------------ RecBole atomic files
RECBOLE_TYPES = {"token": "str", "token_seq": "seq", "float": "float", "float_seq": "floatseq"}


def recbole_kinds(names):
  kinds = []
  for head in names:
    typ = head.partition(":")[2]
    if typ not in RECBOLE_TYPES:
      raise ValueError(head)
    kinds.append(RECBOLE_TYPES[typ])
  bases = [h.partition(":")[0] for h in names]
  if len(set(bases)) != len(bases):
    raise ValueError("duplicate")
  return kinds


@st.composite
def recbole_case(draw):
  types = draw(st.lists(st.sampled_from(list(RECBOLE_TYPES)), min_size=1, max_size=5))
  names = ["user_id", "item_id", "a", "b", "c"][:len(types)]
  header = "\t".join(f"{n}:{t}" for n, t in zip(names, types))
  rows = draw(table_rows(len(types)))
  raw = ("\n".join([header] + ["\t".join(r) for r in rows]) + "\n").encode("utf-8",
                                                                          "surrogatepass")
  return draw(byte_mutation(raw)), draw(st.sampled_from(["raise", "skip"]))


def check_recbole(case) -> str:
  raw, on_error = case
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "f.inter")
    with open(path, "wb") as f:
      f.write(raw)
    base = lambda h: h.partition(":")[0]  # noqa: E731
    header_error, rows, bad = ref_delimited(raw, "\t", None, recbole_kinds, base)
    columns = {}
    if not header_error:
      first = ref_lines(raw, False)[0][1]
      columns = {base(h.strip()): base(h.strip()) for h in first.split("\t")}
    return expect_outcome(lambda: load_recbole(d, "f", on_error=on_error), path, header_error,
                          rows, bad, columns, "recbole", on_error)


# ------------------------------------------------------------------ GroupLens layouts
GROUPLENS = {"ml-100k": ("u.data", "\t"), "ml-1m": ("ratings.dat", "::")}
RATING_FIELDS = ["user_id", "item_id", "rating", "timestamp"]
RATING_KINDS = ["str", "str", "float", "float"]


@st.composite
def grouplens_case(draw, name):
  delimiter = GROUPLENS[name][1]
  rows = draw(table_rows(4))
  raw = ("\n".join(delimiter.join(r) for r in rows) + "\n").encode("utf-8", "surrogatepass")
  return draw(byte_mutation(raw)), draw(st.sampled_from(["raise", "skip"]))


def check_grouplens(case, name) -> str:
  raw, on_error = case
  file, delimiter = GROUPLENS[name]
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, file)
    with open(path, "wb") as f:
      f.write(raw)
    _, rows, bad = ref_delimited(raw, delimiter, RATING_FIELDS, lambda n: RATING_KINDS)
    return expect_outcome(
        lambda: load_movielens(d, name, layout="grouplens", on_error=on_error), path, None,
        rows, bad, {f: f for f in RATING_FIELDS}, name, on_error, has_header=False)


# ------------------------------------------------------------------ table source: CSV
CSV_COLUMNS = ["user_id", "price", "tags", "note", "n"]


def table_cfg(path, on_error):
  c = config_lib.base_config().data
  c.source, c.name, c.on_error = "table", "fuzz", on_error
  c.table.train = path
  c.features = ConfigDict({"user_id": {"kind": "sparse", "column": "user_id"},
                           "price": {"kind": "dense", "column": "price"},
                           "tags": {"kind": "multi", "column": "tags", "sep": "|"}})
  return c


def _csv_field(value: str, quote: bool) -> str:
  if quote or any(c in value for c in ',"\r\n'):
    return '"' + value.replace('"', '""') + '"'
  return value


@st.composite
def csv_case(draw):
  """Rows written as RFC 4180 CSV (some fields quoted without need), the line each record
  starts at (counting '\\n' only), then maybe corrupted at the byte level."""
  rows = draw(st.lists(st.lists(cell, min_size=5, max_size=5), max_size=12))
  quoted = [[draw(st.booleans()) for _ in r] for r in rows]
  text, starts, line = ",".join(CSV_COLUMNS) + "\n", [], 2
  for r, q in zip(rows, quoted):
    record = ",".join(_csv_field(v, qq) for v, qq in zip(r, q)) + "\n"
    starts.append(line)
    line += record.count("\n")
    text += record
  # what each value means: an unquoted empty field is missing, a quoted one is ''
  values = [[None if v == "" and not (qq or any(c in v for c in ',"\r\n')) else v
             for v, qq in zip(r, q)] for r, q in zip(rows, quoted)]
  raw = text.encode("utf-8", "surrogatepass")
  mutated = draw(byte_mutation(raw))
  return values, starts, raw, mutated, draw(st.sampled_from(["raise", "skip"]))


def check_csv(case) -> str:
  rows, data_lines, raw, mutated, on_error = case
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "t.csv")
    with open(path, "wb") as f:
      f.write(mutated)
    load = lambda: load_table(table_cfg(path, on_error))  # noqa: E731
    exact = mutated == raw and not any("\ud800" <= ch <= "\udfff" for r in rows for v in r
                                       if v for ch in v)
    if not exact:  # corrupted: any parse is allowed, but only a user error may escape
      try:
        load()
        return "loaded"
      except DataError as e:
        assert e.file == path and e.line is not None and 1 <= e.line <= mutated.count(
            b"\n") + 1, e
        return "user-error"
    # Written as CSV: every value must come back exactly, at the line it starts on.
    good, bad, numeric = {}, {}, {}
    for name, k in (("note", 3), ("n", 4)):  # no role in the config: numeric if all are
      vals = [r[k] for r in rows if r[k] is not None]
      numeric[name] = bool(vals) and all(ref_number(v)[0] for v in vals) and not all(
          trim(v) in MISSING for v in vals)

    def other(name, v):
      return ref_number(v)[1] if numeric[name] else v
    for i, r in enumerate(rows):
      ok, price = ref_number(r[1])
      if not ok:
        bad[data_lines[i]] = {"price"}
        continue
      good[data_lines[i]] = {
          "user_id": r[0], "price": price,
          "tags": tuple(t.strip() for t in (r[2] or "").split("|") if t.strip()),
          "note": other("note", r[3]), "n": other("n", r[4])}
    return expect_outcome(load, path, None, good, bad,
                          {c: c for c in CSV_COLUMNS}, "csv", on_error)


# ------------------------------------------------------------------ table source: Parquet
PARQUET_TYPES = {
    "string": (pa.string(), st.one_of(st.none(), st.text(max_size=6))),
    "large_string": (pa.large_string(), st.one_of(st.none(), st.text(max_size=6))),
    "int64": (pa.int64(), st.one_of(st.none(), st.integers(-2**63, 2**63 - 1))),
    "uint8": (pa.uint8(), st.one_of(st.none(), st.integers(0, 255))),
    "float32": (pa.float32(), st.one_of(st.none(), st.floats(width=32))),
    "float64": (pa.float64(), st.one_of(st.none(), st.floats())),
    "bool": (pa.bool_(), st.one_of(st.none(), st.booleans())),
    "list_str": (pa.list_(pa.string()), st.one_of(st.none(), st.lists(st.one_of(
        st.none(), st.text(max_size=4)), max_size=3))),
    "list_int": (pa.list_(pa.int32()), st.one_of(st.none(), st.lists(st.integers(-9, 9),
                                                                      max_size=3))),
    "binary": (pa.binary(), st.one_of(st.none(), st.binary(max_size=6))),
    "timestamp": (pa.timestamp("s"), st.one_of(st.none(), st.integers(0, 2**31))),
    "date": (pa.date32(), st.one_of(st.none(), st.integers(0, 20000))),
    "decimal": (pa.decimal128(9, 2), st.one_of(st.none(), st.decimals(
        min_value=-10**6, max_value=10**6, places=2, allow_nan=False))),
    "struct": (pa.struct([("a", pa.int32())]), st.one_of(st.none(), st.fixed_dictionaries(
        {"a": st.integers(-9, 9)}))),
    "dict": (pa.dictionary(pa.int32(), pa.string()), st.one_of(st.none(), st.text(max_size=4))),
    "null": (pa.null(), st.none()),
}


@st.composite
def parquet_case(draw):
  n = draw(st.integers(0, 8))
  cols = {}
  for name in ("user_id", "price", "tags", "x"):
    kind = draw(st.sampled_from(sorted(PARQUET_TYPES)))
    values = PARQUET_TYPES[kind][1]
    cols[name] = (kind, draw(st.lists(values, min_size=n, max_size=n)))
  corrupt = draw(st.sampled_from([None, None, None, "truncate", "garbage"]))
  return cols, corrupt, draw(st.sampled_from(["raise", "skip"])), draw(st.binary(max_size=64))


def check_parquet(case) -> str:
  import pyarrow.parquet as pq
  cols, corrupt, on_error, junk = case
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "t.parquet")
    arrays = {}
    for name, (kind, values) in cols.items():
      typ = PARQUET_TYPES[kind][0]
      if kind == "dict":
        arrays[name] = pa.array(values, pa.string()).dictionary_encode()
      else:
        arrays[name] = pa.array(values, typ)
    pq.write_table(pa.table(arrays), path)
    if corrupt == "truncate":
      data = open(path, "rb").read()
      open(path, "wb").write(data[:len(data) // 2])
    elif corrupt == "garbage":
      open(path, "wb").write(junk)
    try:
      table = load_table(table_cfg(path, on_error))
    except DataError as e:
      assert e.file == path and (e.field is not None or corrupt), e
      return "user-error"
    assert not corrupt, "a corrupt Parquet file loaded"
    n = len(next(iter(cols.values()))[1])
    assert table.num_rows + sum(table.skipped.values()) == n
    assert table.row_line.tolist() == [i + 1 for i in range(n)] or table.skipped
    # Documented: dense -> float64, sparse -> str, multi -> tuple of str, others typed.
    assert table.columns["price"].dtype == np.float64
    assert all(v is None or isinstance(v, str) for v in table.columns["user_id"].tolist())
    assert all(isinstance(v, tuple) for v in table.columns["tags"].tolist())
    kind, values = cols["price"]
    if kind in ("int64", "uint8", "float32", "float64", "bool") and not table.skipped:
      want = [math.nan if v is None else float(np.float32(v)) if kind == "float32"
              else float(v) for v in values]
      assert all(same(float(a), b) for a, b in zip(table.columns["price"].tolist(), want))
    return "skipped" if table.skipped else "loaded"


# ------------------------------------------------------------------ --config.x=y overrides
def _leaves(c: ConfigDict, prefix=""):
  for k, v in c.items():
    if isinstance(v, ConfigDict) and len(v):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


LEAVES = list(_leaves(config_lib.base_config()))
literal = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                            st.dictionaries(st.text(max_size=3), inner, max_size=2)),
    max_leaves=6).map(repr)


@st.composite
def override_case(draw):
  key = draw(st.one_of(
      st.sampled_from([k for k, _ in LEAVES]),
      st.sampled_from(["data.table.columns", "data.scenario.groups",
                       "data.scenario.descriptions"]).flatmap(
          lambda s: st.text(max_size=5).map(lambda t: f"{s}.{t}")),
      st.text(max_size=12),
      st.sampled_from([k for k, _ in LEAVES]).flatmap(
          lambda k: st.text(max_size=4).map(lambda t: f"{k}.{t}"))))
  value = draw(st.one_of(literal, st.text(max_size=12), st.sampled_from(
      ["", "true", "off", "1e999", "nan", "(", "[1,", "((((((((((", "{[]: 1}", "(1,)", "()"])))
  resumed = draw(st.booleans())  # on a config read back from config.json (lists, not tuples)
  sep = draw(st.sampled_from(["=", "=", ""]))
  prefix = draw(st.sampled_from(["--config.", "--config.", ""]))
  return f"{prefix}{key}{sep}{value}", resumed


def check_override(case) -> str:
  text, resumed = case
  config = config_lib.base_config()
  if resumed:
    config = config_lib.from_json(config_lib.to_json(config))
  try:
    config_lib.apply_overrides(config, [text])
  except ConfigError as e:
    assert str(e), "empty message"
    return "user-error"
  body = text[len("--config."):] if text.startswith("--config.") else text
  key, raw = body.split("=", 1)
  node = config
  for p in key.split("."):
    node = node[p]
  before = dict(LEAVES).get(key, None)
  # Documented semantics: the value has the setting's type (sequences either spelling).
  if isinstance(before, bool):
    assert node is (raw.strip().lower() in ("1", "true", "yes", "on"))
  elif isinstance(before, str):
    assert node == raw
  elif isinstance(before, float):
    assert isinstance(node, float) and not isinstance(node, bool)
  elif isinstance(before, int):
    assert isinstance(node, int) and not isinstance(node, bool)
  elif isinstance(before, tuple):
    assert isinstance(node, (tuple, list))
  return "loaded"


READERS = {
    "recbole": (recbole_case(), check_recbole),
    "grouplens-ml-100k": (grouplens_case("ml-100k"), lambda c: check_grouplens(c, "ml-100k")),
    "grouplens-ml-1m": (grouplens_case("ml-1m"), lambda c: check_grouplens(c, "ml-1m")),
    "table-csv": (csv_case(), check_csv),
    "table-parquet": (parquet_case(), check_parquet),
    "config-override": (override_case(), check_override),
}
