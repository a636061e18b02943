"""A scoring request -> validated raw rows: the schema-driven checks of every field (types,
lengths, bounds, vocabulary of the scenario), with every error collected and named by its
location, so a bad request gets one 422 listing what was wrong and never reaches a model.

Split from predictor.py, which loads a version and scores rows; both are serving-side only.
"""
from __future__ import annotations

import dataclasses
import math

from mscenario.data.transform import Transform


class RequestError(ValueError):
  """Invalid request content; `errors` are [{'loc': [...], 'msg': ...}] (HTTP 422)."""

  def __init__(self, errors: list[dict]):
    self.errors = errors
    super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))


@dataclasses.dataclass(frozen=True)
class InputLimits:
  """Caps checked while validating, before any array exists: the transform turns text columns
  into fixed-width arrays (rows x longest string), so one long string must not get that far."""
  max_string_chars: int = 256   # any string value (ids, categories, text-template fields)
  max_list_len: int = 256       # values in one multi-valued field
  max_errors: int = 50          # per-field messages in one 422 (the rest are counted)


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# A numeric value may sit at most this many training spreads ((x - shift) / scale) away:
# further out the float32 network overflows and answers NaN (a 1e308 once did).
MAX_NORMALISED = 1e12


@dataclasses.dataclass(frozen=True)
class Columns:
  """Which raw fields the transform reads, and as what."""
  categorical: tuple[str, ...]
  numeric: tuple[str, ...]
  multi: tuple[str, ...]

  @classmethod
  def of(cls, transform: Transform) -> "Columns":
    s = transform.state
    schema = transform.schema
    col = lambda name: s["features"][name].get("column", name)  # noqa: E731
    numeric = [d["column"] for d in s["dense"].values()]
    multi = [col(f.name) for f in schema.multi]
    cat = [col(f.name) for f in schema.sparse] + [s["scenario"]["field"]]
    cat += [f for f, v in ((s["user_field"], s["user_vocab"]),
                           (s["item_field"], s["item_vocab"])) if v]
    dedup = lambda xs: tuple(dict.fromkeys(xs))  # noqa: E731
    numeric = dedup(numeric)
    return cls(dedup(c for c in cat if c not in numeric and c not in multi), numeric,
               dedup(multi))


def short(v, n: int = 40) -> str:
  """repr() for an error message, cut short: a 200 kB value must not come back 200 kB."""
  r = repr(v) if not isinstance(v, (dict, list)) else type(v).__name__
  return r if len(r) <= n else f"{r[:n]}... ({len(v) if isinstance(v, str) else len(r)} chars)"


class FieldCheck:
  """Per-value validators sharing the request's limits and error list."""

  def __init__(self, limits: InputLimits, errors: list):
    self.limits = limits
    self.errors = errors

  def error(self, loc, msg):
    self.errors.append({"loc": loc, "msg": msg})

  def string(self, v: str, loc) -> bool:
    if len(v) > self.limits.max_string_chars:
      self.error(loc, f"string of {len(v)} characters; at most {self.limits.max_string_chars}")
      return False
    return True

  def categorical(self, v, loc):
    """JSON value -> the string the training data would have held (ints without '.0')."""
    if v is None:
      return None
    if isinstance(v, str):
      return v if self.string(v, loc) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      self.error(loc, f"expected a string, a number or null, got {json_type(v)}")
      return None
    if isinstance(v, int):
      if not INT64_MIN <= v <= INT64_MAX:
        self.error(loc, "integer out of range: expected a 64-bit integer (or a string)")
        return None
      return str(v)
    if not math.isfinite(v):
      self.error(loc, "expected a finite number")
      return None
    return str(int(v)) if v == int(v) else str(v)

  def numeric(self, v, loc, bounds):
    if v is None or v == "":
      return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
      self.error(loc, f"expected a number or null, got {json_type(v)}")
      return math.nan
    if isinstance(v, str) and not self.string(v, loc):
      return math.nan
    if isinstance(v, int) and not INT64_MIN <= v <= INT64_MAX:
      self.error(loc, "integer out of range: expected a 64-bit integer")
      return math.nan
    try:
      x = float(v)
    except (TypeError, ValueError, OverflowError):
      self.error(loc, f"expected a number or null, got {short(v)}")
      return math.nan
    lo, hi = bounds
    if not lo <= x <= hi:  # also false for NaN
      self.error(loc, f"expected a finite number in [{lo:.6g}, {hi:.6g}], got {short(v)}")
      return math.nan
    return x

  def multi(self, v, loc):
    if v is None:
      return ()
    if not isinstance(v, list):
      self.error(loc, f"expected a list of strings or numbers, got {json_type(v)}")
      return ()
    if len(v) > self.limits.max_list_len:
      self.error(loc, f"list of {len(v)} values; at most {self.limits.max_list_len}")
      return ()
    out = []
    for j, t in enumerate(v):
      c = self.categorical(t, [*loc, j])
      if c is not None:
        out.append(c)
    return tuple(out)

  def text(self, v, loc):
    """A field only the item-text template reads: a string, number, list of those, or null."""
    if isinstance(v, list):
      self.multi(v, loc)
    else:
      self.categorical(v, loc)
    return v


def json_type(v) -> str:
  return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
          type(None): "null"}.get(type(v), "a number")


_ABSENT = object()


def column_values(name, user, items, loc, convert, missing, fast) -> list:
  """One field over a request's items (an item's value wins over the user's)."""
  uv = user.get(name, _ABSENT)
  if uv is not _ABSENT and uv is not None:
    uv = convert(uv, [*loc, "user", name])
  if uv is _ABSENT or uv is None:
    uv = missing
  out = []
  for j, item in enumerate(items):
    v = item.get(name, _ABSENT)
    if v is _ABSENT:
      out.append(uv)
    elif v is None:
      out.append(missing)
    else:
      f = fast(v) if fast is not None else None
      if f is None:
        f = convert(v, [*loc, "items", j, name])
        if f is None:
          f = missing
      out.append(f)
  return out


def fast_str(max_chars: int):
  def fast(v):
    return v if type(v) is str and len(v) <= max_chars else None  # noqa: E721 (bool, int)
  return fast


def fast_float(lo: float, hi: float):
  def fast(v):
    t = type(v)
    return float(v) if (t is float or t is int) and lo <= v <= hi else None
  return fast


def number_key(x: float):
  """A numeric scenario value as the scenario lookup spells it (5.0 -> '5')."""
  if not math.isfinite(x):
    return None
  return str(int(x)) if x == int(x) else str(x)


def capped(errors: list[dict], most: int) -> list[dict]:
  if len(errors) <= most:
    return errors
  return errors[:most] + [{"loc": [], "msg": f"... and {len(errors) - most} more errors"}]


@dataclasses.dataclass(frozen=True)
class Parsed:
  """One validated request: `n` items, raw values per field, resolved scenario."""
  n: int
  columns: dict[str, list]
  scenario: int
  raw_scenario: str
  # Raw request objects, kept (by reference) so that a text-fused model can build the text
  # of an item it does not know; formatting happens only for those rows (encode).
  user: dict | None = None
  items: list | None = None
