"""User-facing errors: the CLI prints them as one paragraph (no traceback) and exits 2."""
from __future__ import annotations


class MscenarioError(Exception):
  """A mistake the user can fix (bad config, bad input file, missing data)."""


class DataError(MscenarioError):
  """Bad input data; names the file, the line (1-based, as an editor shows it) and the field."""

  def __init__(self, message: str, *, file=None, line=None, field=None, expected=None):
    self.file, self.line, self.field, self.expected = file, line, field, expected
    where = []
    if file is not None:
      where.append(f"file {file}")
    if line is not None:
      where.append(f"line {line}")
    if field is not None:
      where.append(f"field '{field}'")
    text = message
    if where:
      text = f"{', '.join(where)}: {message}"
    if expected is not None:
      text += f" (expected {expected})"
    super().__init__(text)


class ConfigError(MscenarioError):
  """An invalid or inconsistent configuration value."""
