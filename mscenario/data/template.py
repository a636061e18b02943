"""Raw fields -> text through a `str.format` template ("{title} ({year}). Genres: {genres}").

Shared by the text tables (training) and the serving side, which builds the text of an item
new to the model from the request's raw fields exactly as training built known items' texts.
"""
from __future__ import annotations

import math
import re
import string
from typing import Mapping

import numpy as np


def template_fields(template: str) -> list[str]:
  """Field names a `str.format` template refers to, in order."""
  return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _as_text(value) -> str:
  """Raw value -> text: lists joined with ', ', whole floats without '.0', missing -> ''."""
  if value is None:
    return ""
  if isinstance(value, (tuple, list, np.ndarray)):
    return ", ".join(t for t in (_as_text(v) for v in value) if t)
  if isinstance(value, (float, np.floating)):
    if math.isnan(value):
      return ""
    return str(int(value)) if float(value).is_integer() else str(value)
  if isinstance(value, np.generic):
    value = value.item()
  return str(value)


def format_text(template: str, fields: Mapping[str, object]) -> str:
  """Fill `template` from `fields`; parts left empty by missing values are tidied away."""
  text = template.format(**{k: _as_text(fields.get(k)) for k in template_fields(template)})
  text = re.sub(r"\(\s*\)|\[\s*\]", "", text)  # "Title ()" when the year is missing
  text = re.sub(r"\s+([.,;:!?])", r"\1", text)
  return re.sub(r"\s+", " ", text).strip().lstrip(".,;: ")
