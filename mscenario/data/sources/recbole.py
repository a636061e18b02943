"""RecBole atomic files: `<name>.inter` (+ optional `.user`, `.item`), tab-separated, with a
`field:type` header, type in token | token_seq | float | float_seq.
"""
from __future__ import annotations

import os

import numpy as np

from mscenario.data.sources import _io
from mscenario.data.table import RawTable
from mscenario.errors import DataError

_KINDS = {"token": "str", "token_seq": "seq", "float": "float", "float_seq": "floatseq"}


def read_atomic(path: str, policy: _io.Policy, *, as_text: bool = False) -> _io.Frame:
  """One atomic file; columns lose their `:type` suffix.

  `as_text` keeps every field as raw text (for callers that convert fields themselves).
  """
  frame = _io.read_delimited(path, policy, delimiter="\t",
                             rename=lambda head: head.partition(":")[0])
  kinds = {}
  for name, head in zip(frame.table.column_names, frame.header):
    typ = head.partition(":")[2]
    if typ not in _KINDS:
      raise DataError(f"header '{head}' has an unknown type", file=path, line=1, field=name,
                      expected="field:type with type token, token_seq, float or float_seq")
    kinds[name] = _KINDS[typ]
  if as_text:
    return frame
  for name, kind in kinds.items():
    if kind == "float":
      frame = _io.cast_float(frame, name, policy)
    elif kind == "floatseq":
      frame = _io.check_float_seq(frame, name, policy)
      frame.kinds[name] = kind
    elif kind == "seq":
      frame.kinds[name] = kind
  return frame


def read_atomic_set(root: str, name: str, policy: _io.Policy, *, as_text: bool = False,
                    prepare=None) -> tuple[_io.Frame, list[str]]:
  """`<name>.inter` joined with `.user` on user_id and `.item` on item_id when present.

  `prepare(suffix, frame) -> frame` may convert each file's fields before the join, so that
  a bad value is reported at its own file and line.
  """
  prepare = prepare or (lambda suffix, frame: frame)
  inter_path = os.path.join(root, f"{name}.inter")
  if not os.path.isfile(inter_path):
    raise DataError(f"no RecBole interaction file {name}.inter in {root}", file=inter_path,
                    expected="a RecBole atomic data set (see `mscenario data get`)")
  frame = prepare("inter", read_atomic(inter_path, policy, as_text=as_text))
  files = [inter_path]
  for suffix, key in (("user", "user_id"), ("item", "item_id")):
    side_path = os.path.join(root, f"{name}.{suffix}")
    if os.path.isfile(side_path):
      side = prepare(suffix, read_atomic(side_path, policy, as_text=as_text))
      if key not in side.table.column_names:
        raise DataError(f"no '{key}' field to join on", file=side_path, line=1, field=key)
      _io.left_join(frame, side, key, prefix=f"{suffix}_")
      files.append(side_path)
  return frame, files


def load_recbole(root: str, name: str, on_error: str = "raise") -> RawTable:
  """RawTable of a RecBole atomic data set, side tables joined into each interaction."""
  policy = _io.Policy(on_error)
  frame, files = read_atomic_set(root, name, policy)
  n = frame.num_rows
  return RawTable(columns=_io.frame_numpy(frame), row_file=np.zeros(n, dtype=np.int32),
                  row_line=frame.lines.astype(np.int64), files=files, skipped=policy.skipped)
