"""MovieLens ML-100K / ML-1M in the GroupLens layout (`u.data`, `ratings.dat`, ...) or the
RecBole layout (`ml-1m.inter`, ...), read into one canonical set of columns so that configs
do not depend on where the files came from.

Ids keep their layout's spelling (RecBole's ML-1M uses `1m_17` users and `Title (Year)`
items, GroupLens numbers); everything else has the same values in both layouts.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pyarrow as pa

from mscenario.data.sources import _io, recbole
from mscenario.data.table import RawTable
from mscenario.errors import DataError

NAMES = ("ml-100k", "ml-1m")
LAYOUTS = ("auto", "grouplens", "recbole")
CANONICAL = ("user_id", "item_id", "rating", "timestamp", "age", "age_bucket", "gender",
             "occupation", "zip_code", "title", "year", "genres")
# The 19 ML-100K genre flags, in u.item order (used when u.genre is absent).
GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
               "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
               "Romance", "Sci-Fi", "Thriller", "War", "Western")
# ML-1M age codes: each is the lower edge of its bucket; ML-100K raw ages are bucketed alike.
AGE_CODES = (1, 18, 25, 35, 45, 50, 56)
_GROUPLENS_RATINGS = {"ml-100k": "u.data", "ml-1m": "ratings.dat"}
_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


def detect_layout(root: str, name: str) -> str:
  """'recbole' or 'grouplens', by which files exist in `root`."""
  if os.path.isfile(os.path.join(root, f"{name}.inter")):
    return "recbole"
  if os.path.isfile(os.path.join(root, _GROUPLENS_RATINGS[name])):
    return "grouplens"
  raise DataError(
      f"no MovieLens {name} files in {root}", file=root,
      expected=f"{name}.inter (RecBole layout) or {_GROUPLENS_RATINGS[name]} (GroupLens "
      f"layout); `mscenario data get movielens-{name[3:]}` downloads them")


def load_movielens(root: str, name: str = "ml-1m", *, layout: str = "auto",
                   on_error: str = "raise") -> RawTable:
  """RawTable with the CANONICAL columns for ML-100K or ML-1M found in `root`."""
  if name not in NAMES:
    raise DataError(f"unknown MovieLens data set {name!r}", expected=" or ".join(NAMES))
  if layout not in LAYOUTS:
    raise DataError(f"data.layout={layout!r}", expected=" | ".join(LAYOUTS))
  if layout == "auto":
    layout = detect_layout(root, name)
  policy = _io.Policy(on_error)
  read = _read_recbole if layout == "recbole" else _read_grouplens
  frame, files = read(root, name, policy)
  columns = _io.frame_numpy(frame)
  columns = {k: columns[k] if k in columns else _missing(k, frame.num_rows) for k in CANONICAL}
  return RawTable(columns=columns, row_file=np.zeros(frame.num_rows, dtype=np.int32),
                  row_line=frame.lines.astype(np.int64), files=files, skipped=policy.skipped)


def _missing(name: str, n: int) -> np.ndarray:
  """A column absent from the files (e.g. no user table): all missing, right type."""
  if name in ("rating", "timestamp", "age", "year"):
    return np.full(n, np.nan)
  out = np.empty(n, dtype=object)
  out[:] = [()] * n if name == "genres" else None
  return out


# ---- RecBole layout ------------------------------------------------------------------------

def _read_recbole(root: str, name: str, policy: _io.Policy):
  def prepare(suffix: str, frame: _io.Frame) -> _io.Frame:
    if suffix == "inter":
      return _cast(frame, ("rating", "timestamp"), policy)
    if suffix == "user":
      return _user(_cast(frame, ("age",), policy), name)
    renames = {"movie_title": "title", "release_year": "year", "class": "genres", "genre": "genres"}
    frame.table = frame.table.rename_columns([renames.get(c, c) for c in frame.table.column_names])
    frame.kinds = {renames.get(c, c): k for c, k in frame.kinds.items()}
    return _item(frame, genre_sep=" ")
  return recbole.read_atomic_set(root, name, policy, as_text=True, prepare=prepare)


# ---- GroupLens layout ----------------------------------------------------------------------

def _read_grouplens(root: str, name: str, policy: _io.Policy):
  path = lambda f: os.path.join(root, f)  # noqa: E731
  inter_cols = ["user_id", "item_id", "rating", "timestamp"]
  if name == "ml-100k":
    ratings, users, items = path("u.data"), path("u.user"), path("u.item")
    inter = _io.read_delimited(ratings, policy, delimiter="\t", names=inter_cols)
    user_args = dict(delimiter="|", names=["user_id", "age", "gender", "occupation", "zip_code"])
    genres = _genre_names(path("u.genre"))
    item_args = dict(delimiter="|", encoding="latin-1",
                     names=["item_id", "title", "release_date", "video_date", "url",
                            *[f"__genre{i}" for i in range(len(genres))]])
  else:
    ratings, users, items = path("ratings.dat"), path("users.dat"), path("movies.dat")
    inter = _io.read_delimited(ratings, policy, delimiter="::", names=inter_cols)
    user_args = dict(delimiter="::", names=["user_id", "gender", "age", "occupation", "zip_code"])
    item_args = dict(delimiter="::", encoding="latin-1", names=["item_id", "title", "genres"])
  inter = _cast(inter, ("rating", "timestamp"), policy)
  files = [ratings]
  if os.path.isfile(users):
    user = _user(_cast(_io.read_delimited(users, policy, **user_args), ("age",), policy), name)
    _io.left_join(inter, user, "user_id", prefix="user_")
    files.append(users)
  if os.path.isfile(items):
    item = _io.read_delimited(items, policy, **item_args)
    if name == "ml-100k":
      item = _flags_to_genres(item, genres)
    _io.left_join(inter, _item(item, genre_sep="|"), "item_id", prefix="item_")
    files.append(items)
  return inter, files


def _genre_names(path: str) -> tuple[str, ...]:
  """Genre names from u.genre ('Action|1' lines, ordered by the number)."""
  if not os.path.isfile(path):
    return GENRES_100K
  with open(path, encoding="latin-1") as f:
    pairs = [line.strip().rsplit("|", 1) for line in f if line.strip()]
  try:
    return tuple(n for n, _ in sorted(pairs, key=lambda p: int(p[1])))
  except (ValueError, IndexError):
    raise DataError("cannot read genre list", file=path, expected="lines 'Name|number'") from None


def _flags_to_genres(item: _io.Frame, genres: tuple[str, ...]) -> _io.Frame:
  """19 0/1 genre columns -> one '|'-joined genre list; year from the release date."""
  flags = [item.column(f"__genre{i}").to_pylist() for i in range(len(genres))]
  joined = ["|".join(g for g, f in zip(genres, row) if (f or "").strip() == "1")
            for row in zip(*flags)]
  dates = item.column("release_date").to_pylist()
  years = [d.strip()[-4:] if d and d.strip()[-4:].isdigit() else None for d in dates]
  keep = [c for c in ("item_id", "title") if c in item.table.column_names]
  item.table = item.table.select(keep)
  item.kinds = {c: "str" for c in keep}
  item.set_column("genres", pa.array(joined, pa.string()), "str")
  item.set_column("year", pa.array(years, pa.string()), "str")
  return item


# ---- field conversions shared by both layouts ------------------------------------------------

def _cast(frame: _io.Frame, names, policy: _io.Policy) -> _io.Frame:
  for name in names:
    if name in frame.table.column_names:
      frame = _io.cast_float(frame, name, policy)
  return frame


def _user(frame: _io.Frame, name: str) -> _io.Frame:
  """Adds `age_bucket` (the ML-1M code as str) next to the numeric `age`."""
  if "age" not in frame.table.column_names:
    return frame
  frame.set_column("age_bucket", pa.array(age_bucket(_io.float_numpy(frame.column("age")), name),
                                          pa.string()), "str")
  return frame


def age_bucket(age: np.ndarray, name: str) -> np.ndarray:
  """ML-1M age code per row ('1', '18', ... '56'); ML-100K raw ages are bucketed first."""
  out = np.empty(len(age), dtype=object)
  ok = np.isfinite(age)
  if name == "ml-1m":  # a code as written ('18'), never truncated ('1.5' stays '1.5')
    out[ok] = [str(int(a)) if a.is_integer() else repr(a) for a in age[ok].tolist()]
  else:
    edges = np.asarray(AGE_CODES[1:], dtype=np.float64)
    codes = np.asarray([str(c) for c in AGE_CODES], dtype=object)
    out[ok] = codes[np.searchsorted(edges, age[ok], side="right")]
  return out


def _item(frame: _io.Frame, genre_sep: str) -> _io.Frame:
  """Title without its '(Year)' suffix, numeric year (from the suffix when no year field)."""
  cols = frame.table.column_names
  n = frame.num_rows
  titles = frame.column("title").to_pylist() if "title" in cols else [None] * n
  years = frame.column("year").to_pylist() if "year" in cols else [None] * n
  clean, numeric = [], []
  for title, year in zip(titles, years):
    match = _TITLE_YEAR.match(title) if title else None
    clean.append(match.group(1) if match else title)
    numeric.append(_to_year(year) if _to_year(year) is not None else (
        float(match.group(2)) if match else None))
  frame.set_column("title", pa.array(clean, pa.string()), "str")
  frame.set_column("year", pa.array(numeric, pa.float64()), "float")
  if "genres" in cols:
    frame.kinds["genres"] = "seq"
    frame.seps["genres"] = genre_sep
  return frame


def _to_year(text) -> float | None:
  """A year field as float; RecBole's ML-100K spells one unknown year 'unkonwn' -> None."""
  return _io.parse_number(text.strip()) if isinstance(text, str) else None
