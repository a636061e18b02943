"""Delimited-text reading shared by every source: pyarrow speed, but bad input still names
the file, the 1-based line (as an editor shows it) and the field.

Files are parsed with every column as a string; numbers are cast afterwards, so that a bad
value is found per field (with its line) instead of failing the whole parse.

Length: one contract, shared by every source: delimited text -> typed columns where every
bad value names its file, line and field. Reading, screening and casting each rely on the
line map the others build, so they stay together.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from mscenario.errors import ConfigError, DataError

# Text a numeric field may hold to mean "missing" (NaN), besides the empty string.
NUMERIC_MISSING = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "None")
_SEP = "\x1f"  # stands in for multi-character delimiters such as MovieLens' '::'


class Policy:
  """`data.on_error`: raise a DataError at the first bad row, or drop and count bad rows."""

  def __init__(self, on_error: str = "raise", skipped: dict[str, int] | None = None):
    if on_error not in ("raise", "skip"):
      raise ConfigError(f"data.on_error={on_error!r}: expected 'raise' or 'skip'")
    self.on_error = on_error
    self.skipped = {} if skipped is None else skipped

  def bad(self, reason: str, count: int, *, message: str, file: str, line: int,
          field: str | None = None, expected: str | None = None) -> None:
    """Report `count` bad rows; the first one is at `line`."""
    if count <= 0:
      return
    if self.on_error == "raise":
      raise DataError(message, file=file, line=line, field=field, expected=expected)
    self.skipped[reason] = self.skipped.get(reason, 0) + int(count)


@dataclasses.dataclass
class Frame:
  """One parsed file: string / float64 pyarrow columns and the 1-based line of each row.

  `kinds` says how a column becomes numpy: 'str', 'float', 'seq' (space-separated tokens ->
  tuple of str), 'floatseq' (-> tuple of float), or 'list' (an arrow list -> tuple).
  """

  table: pa.Table
  lines: np.ndarray
  path: str
  kinds: dict[str, str]
  seps: dict[str, str] = dataclasses.field(default_factory=dict)
  header: list[str] = dataclasses.field(default_factory=list)  # as written in the file

  @property
  def num_rows(self) -> int:
    return self.table.num_rows

  def filter(self, keep: np.ndarray) -> "Frame":
    if keep.all():
      return self
    return dataclasses.replace(self, table=self.table.filter(pa.array(keep)),
                               lines=self.lines[keep])

  def column(self, name: str) -> pa.ChunkedArray:
    return self.table.column(name)

  def set_column(self, name: str, values, kind: str) -> None:
    values = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    if name in self.table.column_names:
      i = self.table.column_names.index(name)
      self.table = self.table.set_column(i, name, values)
    else:
      self.table = self.table.append_column(name, values)
    self.kinds[name] = kind


def _nonblank_lines(raw: bytes) -> np.ndarray:
  """1-based numbers of the non-empty lines: pyarrow skips empty lines, editors count them."""
  buf = np.frombuffer(raw, dtype=np.uint8)
  ends = np.flatnonzero(buf == 10)
  if len(buf) and buf[-1] != 10:
    ends = np.append(ends, len(buf))
  starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
  lengths = ends - starts
  cr = np.zeros(len(ends), dtype=bool)
  has = lengths > 0
  cr[has] = buf[ends[has] - 1] == 13
  lengths = lengths - cr
  return (np.flatnonzero(lengths > 0) + 1).astype(np.int64)


def read_bytes(path: str, encoding: str = "utf-8", delimiter: str = ",",
               policy: "Policy | None" = None, *, header: bool = True,
               quoting: bool = False, rename=None,
               names: list[str] | None = None) -> tuple[bytes, str]:
  """File content as UTF-8 bytes, with a multi-character delimiter replaced by one char.

  Lines that cannot be parsed faithfully (invalid UTF-8, a lone carriage return, which the
  parser would take for a line end, or the stand-in separator itself) are reported through
  `policy` with their line and field; under 'skip' they are blanked, which keeps every other
  line's number.
  """
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"cannot read: {e.strerror}", file=path) from None
  if raw.startswith(b"\xef\xbb\xbf"):
    raw = raw[3:]
  if encoding.lower().replace("-", "").replace("_", "") not in ("utf8", "ascii"):
    try:
      raw = raw.decode(encoding).encode("utf-8")
    except (UnicodeDecodeError, LookupError) as e:
      raise DataError(f"cannot decode as {encoding}: {e}", file=path) from None
  raw = _screen(raw, path, policy or Policy(), delimiter, header, quoting, rename, names)
  if len(delimiter) > 1:
    raw = raw.replace(delimiter.encode("utf-8"), _SEP.encode())
    delimiter = _SEP
  return raw, delimiter


def _line_span(raw: bytes, pos: int) -> tuple[int, int, int]:
  """(1-based line, start, end) of the line holding byte `pos` (end excludes the newline)."""
  start = raw.rfind(b"\n", 0, pos) + 1
  end = raw.find(b"\n", pos)
  return raw.count(b"\n", 0, start) + 1, start, len(raw) if end < 0 else end


def _field_at(raw: bytes, start: int, pos: int, delimiter: str, header: list[str]) -> str | None:
  """Name (or 1-based number) of the field holding byte `pos` of the line starting at `start`."""
  i = raw.count(delimiter.encode("utf-8"), start, pos)
  return header[i] if i < len(header) else f"#{i + 1}"


def _screen(raw: bytes, path: str, policy: "Policy", delimiter: str, header: bool,
            quoting: bool, rename=None, names: list[str] | None = None) -> bytes:
  problems = {}  # line -> (start, end, pos, reason, expected)
  try:  # invalid UTF-8: the parser would fail the whole file without saying where.
    raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line, start, _ = _line_span(raw, e.start)
    for k, text in enumerate(raw[start:].split(b"\n")):  # error path: line by line
      try:
        text.decode("utf-8")
      except UnicodeDecodeError as err:
        problems[line + k] = (start, start + len(text), start + err.start, "invalid UTF-8",
                              "UTF-8 text")
      start += len(text) + 1
  if b"\r" in raw:  # a CR not followed by LF ends a row for the parser but not for editors
    buf = np.frombuffer(raw, dtype=np.uint8)
    cr = np.flatnonzero(buf == 13)
    lone = cr[(cr + 1 >= len(buf)) | (buf[np.minimum(cr + 1, len(buf) - 1)] != 10)]
    lone = lone[lone + 1 < len(buf)]  # a CR at the very end ends the last line: harmless
    if quoting:  # inside a quoted value a CR is just a character
      quotes = np.cumsum(buf == 34)
      lone = lone[quotes[lone] % 2 == 0]
    for p in lone.tolist():
      line, start, end = _line_span(raw, p)
      problems.setdefault(line, (start, end, p, "carriage return inside a line",
                                 "lines ending in \\n or \\r\\n"))
  if len(delimiter) > 1 and _SEP.encode() in raw:
    for m in re.finditer(re.escape(_SEP.encode()), raw):
      line, start, end = _line_span(raw, m.start())
      problems.setdefault(line, (start, end, m.start(), "control character \\x1f",
                                 f"fields separated by {delimiter!r}"))
  if not problems:
    return raw
  names = list(names or [])
  if header:
    first = raw[: raw.find(b"\n") if b"\n" in raw else len(raw)]
    names = [n.strip() for n in first.decode("utf-8", "replace").rstrip("\r").split(delimiter)]
    names = [rename(n) for n in names] if rename else names
  quotes = np.cumsum(np.frombuffer(raw, dtype=np.uint8) == 34) if quoting else None
  keep, cut = [], 0
  for line in sorted(problems):
    start, end, pos, reason, expected = problems[line]
    field = _field_at(raw, start, pos, delimiter, names) if names else None
    # A line may be dropped only when it is a whole row: not the header, and (quoted CSV) not
    # part of a quoted multi-line value.
    whole = not (header and line == 1) and (
        quotes is None or ((quotes[start - 1] if start else 0) % 2 == 0
                           and quotes[end - 1] == (quotes[start - 1] if start else 0)))
    if policy.on_error == "raise" or not whole:
      raise DataError(reason, file=path, line=line, field=field, expected=expected)
    policy.bad(f"{os.path.basename(path)}: {reason}", 1, message=reason, file=path, line=line,
               field=field, expected=expected)
    keep.append(raw[cut:start])
    cut = end
  keep.append(raw[cut:])
  return b"".join(keep)


def _header(raw: bytes, delimiter: str, quoting: bool, path: str) -> list[str]:
  end = raw.find(b"\n")
  first = raw[: end if end >= 0 else len(raw)].decode("utf-8", errors="replace").rstrip("\r")
  if not first.strip():
    raise DataError("empty header", file=path, line=1, expected="a header line of field names")
  if quoting:
    return next(csv.reader([first], delimiter=delimiter))
  return first.split(delimiter)


def _parse(raw: bytes, names: list[str], skip_rows: int, delimiter: str, quoting: bool,
           threads: bool, path: str = "") -> tuple[pa.Table, list]:
  invalid = []
  body = raw[raw.find(b"\n") + 1:] if skip_rows and b"\n" in raw else b"" if skip_rows else raw
  if not body.strip(b"\r\n"):  # header only, or nothing: pyarrow would call it an error
    return pa.table({n: pa.array([], pa.string()) for n in names}), invalid

  def handler(row):
    invalid.append(row)
    return "skip"

  try:
    return _read_csv(raw, names, skip_rows, delimiter, quoting, threads, handler), invalid
  except (pa.ArrowInvalid, UnicodeDecodeError) as e:  # the lines were screened: not expected
    raise DataError(f"cannot parse: {e}", file=path, line=1 + skip_rows,
                    expected="delimited text") from None


def _read_csv(raw, names, skip_rows, delimiter, quoting, threads, handler) -> pa.Table:
  return pacsv.read_csv(
      io.BytesIO(raw),
      read_options=pacsv.ReadOptions(column_names=names, skip_rows=skip_rows,
                                     use_threads=threads, block_size=1 << 24),
      parse_options=pacsv.ParseOptions(delimiter=delimiter,
                                       quote_char='"' if quoting else False,
                                       ignore_empty_lines=True, invalid_row_handler=handler),
      convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                           strings_can_be_null=True, null_values=[""],
                                           quoted_strings_can_be_null=False))


def read_delimited(path: str, policy: Policy, *, delimiter: str, names: list[str] | None = None,
                   encoding: str = "utf-8", quoting: bool = False, rename=None) -> Frame:
  """Parse a delimited file (header line unless `names` is given) into string columns.

  `rename` maps header names to column names (e.g. drops RecBole's ':type'). Rows with the
  wrong number of fields are reported through `policy` with their line.
  """
  raw, delim = read_bytes(path, encoding, delimiter, policy, header=names is None,
                          quoting=quoting, rename=rename, names=names)
  header = names is None
  written = []
  if header:
    written = [n.strip() for n in _header(raw, delim, quoting, path)]
    names = [rename(n) for n in written] if rename else written
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
      raise DataError(f"duplicate column name '{dup[0]}'", file=path, line=1, field=dup[0])
  table, invalid = _parse(raw, names, int(header), delim, quoting, threads=True, path=path)
  records = _nonblank_lines(raw)
  if invalid:  # Multi-threaded parsing does not number rows; redo this file in one thread.
    table, invalid = _parse(raw, names, int(header), delim, quoting, threads=False,
                            path=path)
  if len(records) != table.num_rows + len(invalid) + int(header):
    records = _record_lines(raw, delim, len(records))  # quoted newlines: rows are not lines
  if invalid:
    bad = np.array([r.number for r in invalid], dtype=np.int64)
    first = invalid[0]
    line = int(records[first.number - 1])
    # the first field missing, or the first one too many
    missing = (names[first.actual_columns] if first.actual_columns < len(names)
               else f"#{len(names) + 1}")
    policy.bad(f"{os.path.basename(path)}: wrong number of fields", len(invalid),
               message=f"found {first.actual_columns} fields", file=path, line=line,
               field=missing, expected=f"{len(names)} fields separated by {delimiter!r}")
    keep = np.ones(len(records), dtype=bool)
    keep[bad - 1] = False
    lines = records[keep]
  else:
    lines = records
  lines = lines[int(header):]
  if len(lines) != table.num_rows:  # the parser and the line scan disagree: number rows
    lines = np.arange(1 + int(header), table.num_rows + 1 + int(header), dtype=np.int64)
  return Frame(table, lines, path, {n: "str" for n in names}, header=written)


def _record_lines(raw: bytes, delimiter: str, fallback: int) -> np.ndarray:
  """1-based first line (counting '\\n' only, as for unquoted files) of each non-blank
  record of a quoted CSV, where a quoted value may span lines. Quotes as pyarrow reads them:
  a quote opens a value only at its start, '""' inside is one quote, and text after the
  closing quote belongs to the value."""
  text = raw.decode("utf-8")
  d = re.escape(delimiter)
  field = re.compile(rf'"(?:[^"]|"")*(?:"|\Z)[^{d}\n]*|[^{d}\n]*')
  starts, pos, line, n = [], 0, 1, len(text)
  while pos < n:
    if text[pos] == "\n" or text.startswith("\r\n", pos):  # a blank line
      pos += 1 if text[pos] == "\n" else 2
      line += 1
      continue
    starts.append(line)
    while True:
      m = field.match(text, pos)
      line += m.group().count("\n")
      pos = m.end()
      if pos < n and text.startswith(delimiter, pos):
        pos += len(delimiter)
        continue
      if pos < n:  # the record's newline
        pos += 1
        line += 1
      break
  return np.asarray(starts, dtype=np.int64) if starts else np.arange(1, fallback + 1)


def cast_float(frame: Frame, name: str, policy: Policy) -> Frame:
  """Column `name` as float64 (missing markers -> NaN); unparsable rows go to `policy`."""
  col = frame.column(name)
  if pa.types.is_floating(col.type) or pa.types.is_integer(col.type) or pa.types.is_boolean(
      col.type):  # integers beyond 2**53 round to the nearest float64, as documented
    frame.set_column(name, pc.cast(col, pa.float64(), safe=False), "float")
    return frame
  if not pa.types.is_string(col.type):  # decimal, large_string, dates (Parquet): as text
    try:
      frame.set_column(name, pc.cast(col, pa.float64()), "float")
      return frame
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
      col = pc.cast(col, pa.string())
  col = pc.utf8_trim_whitespace(col)
  col = pc.if_else(pc.is_in(col, value_set=pa.array(NUMERIC_MISSING)),
                   pa.scalar(None, pa.string()), col)
  try:
    values = pc.cast(col, pa.float64())
  except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
    values, bad = _parse_floats_slowly(col)
    if not bad.any():  # the grammar above and pyarrow disagree: trust pyarrow, value by value
      bad = np.array([_arrow_rejects(v) for v in col.to_pylist()], dtype=bool)
    first = int(np.flatnonzero(bad)[0])
    policy.bad(f"{os.path.basename(frame.path)}: non-numeric '{name}'", int(bad.sum()),
               message=f"cannot read {col[first].as_py()!r} as a number", file=frame.path,
               line=int(frame.lines[first]), field=name, expected="a number")
    frame.set_column(name, values, "float")
    return frame.filter(~bad)
  frame.set_column(name, values, "float")
  return frame


# The numbers pyarrow's cast accepts, and nothing more: Python's float() also takes '1_000',
# full-width or other Unicode digits and inner spaces, which must not slip through as values.
_NUMBER = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)",
                     re.IGNORECASE | re.ASCII)


def parse_number(text) -> float | None:
  """`text` (already trimmed) as a float, or None when it is not a plain decimal number."""
  if not isinstance(text, str) or not _NUMBER.fullmatch(text):
    return None
  return float(text)


def _parse_floats_slowly(col: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
  """Error path only: parse each distinct value in Python to find which rows are bad."""
  enc = pc.dictionary_encode(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
  uniq = enc.dictionary.to_pylist()
  vals = np.full(len(uniq) + 1, np.nan)
  ok = np.ones(len(uniq) + 1, dtype=bool)
  for i, u in enumerate(uniq):
    v = parse_number(u)
    if v is None:
      ok[i] = False
    else:
      vals[i] = v
  codes = enc.indices.fill_null(len(uniq)).to_numpy(zero_copy_only=False)
  return pa.array(vals[codes]), ~ok[codes]


def _arrow_rejects(text) -> bool:
  try:
    pc.cast(pa.array([text], pa.string()), pa.float64())
  except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
    return True
  return False


def check_float_seq(frame: Frame, name: str, policy: Policy) -> Frame:
  """A float_seq column: every whitespace-separated token must be a number (else `policy`)."""
  col = frame.column(name)
  enc = pc.dictionary_encode(col.combine_chunks())
  uniq = enc.dictionary.to_pylist()
  ok = np.ones(len(uniq) + 1, dtype=bool)
  first_bad = {}
  for i, text in enumerate(uniq):
    for token in split_seq(text):
      if parse_number(token) is None:
        ok[i] = False
        first_bad[i] = token
        break
  if ok.all():
    return frame
  codes = enc.indices.fill_null(len(uniq)).to_numpy(zero_copy_only=False)
  bad = ~ok[codes]
  row = int(np.flatnonzero(bad)[0])
  policy.bad(f"{os.path.basename(frame.path)}: non-numeric '{name}'", int(bad.sum()),
             message=f"cannot read {first_bad[int(codes[row])]!r} as a number",
             file=frame.path, line=int(frame.lines[row]), field=name,
             expected="numbers separated by spaces")
  return frame.filter(~bad)


def split_seq(text, sep: str | None = None) -> tuple:
  """'a b c' -> ('a', 'b', 'c'); sep None or ' ' splits on runs of whitespace."""
  if text is None:
    return ()
  parts = text.split() if sep in (None, " ") else text.split(sep)
  return tuple(p.strip() for p in parts if p.strip())


def str_numpy(col) -> np.ndarray:
  """Arrow strings (or numbers) -> object array of str / None, sharing one str per value."""
  if isinstance(col, pa.ChunkedArray):
    col = col.combine_chunks()
  if pa.types.is_dictionary(col.type):
    col = col.cast(col.type.value_type)
  if pa.types.is_floating(col.type):
    col = _float_text(col)
  elif not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
    col = pc.cast(col, pa.string())
  enc = pc.dictionary_encode(col)
  uniq = np.empty(len(enc.dictionary) + 1, dtype=object)
  uniq[:-1] = enc.dictionary.to_pylist()
  codes = enc.indices.fill_null(len(enc.dictionary)).to_numpy(zero_copy_only=False)
  return uniq[codes]


def _float_text(col: pa.Array) -> pa.Array:
  """Whole floats print without '.0' (an occupation code 10.0 is the category '10')."""
  vals = col.to_numpy(zero_copy_only=False)
  uniq, inverse = np.unique(vals, return_inverse=True)
  text = np.array([None if u != u else str(int(u)) if u.is_integer() else repr(u)
                   for u in uniq.tolist()] + [None], dtype=object)
  return pa.array(text[inverse.reshape(-1)], type=pa.string())


def seq_numpy(col, sep: str | None = None, as_float: bool = False) -> np.ndarray:
  """Delimited text -> object array of tuples; each distinct value is split once."""
  if isinstance(col, pa.ChunkedArray):
    col = col.combine_chunks()
  enc = pc.dictionary_encode(col)
  uniq = np.empty(len(enc.dictionary) + 1, dtype=object)
  for i, text in enumerate(enc.dictionary.to_pylist()):
    parts = split_seq(text, sep)
    uniq[i] = tuple(parse_number(p) for p in parts) if as_float else parts
  uniq[-1] = ()
  codes = enc.indices.fill_null(len(enc.dictionary)).to_numpy(zero_copy_only=False)
  return uniq[codes]


def list_numpy(col) -> np.ndarray:
  """Arrow list<...> -> object array of tuples of str (empty tuple = missing)."""
  out = np.empty(len(col), dtype=object)
  out[:] = [tuple("" if v is None else str(v) for v in x) if x is not None else ()
            for x in col.to_pylist()]
  return out


def float_numpy(col) -> np.ndarray:
  """Arrow numbers -> float64 with NaN for missing."""
  if isinstance(col, pa.ChunkedArray):
    col = col.combine_chunks()
  return pc.cast(col, pa.float64(), safe=False).fill_null(np.nan).to_numpy(
      zero_copy_only=False)


def frame_numpy(frame: Frame) -> dict[str, np.ndarray]:
  """Every column of `frame` converted to numpy according to its kind."""
  out = {}
  for name in frame.table.column_names:
    kind, col = frame.kinds[name], frame.column(name)
    if kind == "float":
      out[name] = float_numpy(col)
    elif kind in ("seq", "floatseq"):
      out[name] = seq_numpy(col, frame.seps.get(name), kind == "floatseq")
    elif kind == "list":
      out[name] = list_numpy(col)
    else:
      out[name] = str_numpy(col)
  return out


def left_join(frame: Frame, side: Frame, key: str, prefix: str) -> None:
  """Add `side`'s columns to `frame` by matching `key` (hash lookup, no per-row Python).

  Rows whose key is absent from `side` get missing values; a side column whose name is
  already taken is added as `prefix + name`.
  """
  if key not in frame.table.column_names or key not in side.table.column_names:
    return
  keys = side.column(key).combine_chunks()
  index = pc.index_in(frame.column(key), value_set=keys)
  for name in side.table.column_names:
    if name == key:
      continue
    target = prefix + name if name in frame.table.column_names else name
    frame.set_column(target, pc.take(side.column(name), index), side.kinds[name])
    if name in side.seps:
      frame.seps[target] = side.seps[name]
