"""RawTable: what every data source returns and what preprocessing consumes.

Sources (RecBole atomic files, GroupLens layouts, CSV/Parquet, synthetic) differ only in how
they parse; once parsed, every interaction row is one entry of equally long column arrays,
already joined with its user and item side tables.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class RawTable:
  """Joined interaction rows, one numpy array per column, all of length `num_rows`.

  Column conventions:
    * categorical / text columns: dtype object holding `str` (None = missing), or an integer dtype;
    * numeric columns: float64 with NaN = missing;
    * multi-valued categorical columns: dtype object holding tuples of str (empty tuple = missing).
  `row_file` / `row_line` say where each row came from, so later validation errors can name the
  file and 1-based line. `skipped` counts rows dropped by the source because the config said
  `data.on_error='skip'` (reason -> count); nothing is dropped silently.
  """

  columns: dict[str, np.ndarray]
  row_file: np.ndarray  # int32 index into `files` per row
  row_line: np.ndarray  # int64, 1-based line number in that file
  files: list[str]
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def num_rows(self) -> int:
    return int(self.row_line.shape[0])

  def where(self, row: int) -> tuple[str, int]:
    """(file, line) of row `row`, for error messages."""
    return self.files[int(self.row_file[row])], int(self.row_line[row])

  def take(self, index: np.ndarray) -> "RawTable":
    """Rows `index` (a boolean mask or integer indices), keeping provenance."""
    return RawTable(
        columns={k: v[index] for k, v in self.columns.items()},
        row_file=self.row_file[index],
        row_line=self.row_line[index],
        files=list(self.files),
        skipped=dict(self.skipped),
    )

  def validate(self) -> None:
    n = self.num_rows
    if self.row_file.shape[0] != n:
      raise ValueError("row_file length differs from row_line")
    for name, col in self.columns.items():
      if col.shape[0] != n:
        raise ValueError(f"column {name!r} has {col.shape[0]} rows, expected {n}")
