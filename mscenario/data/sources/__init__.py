"""Data sources: each reads one kind of raw input into a RawTable (joined, typed, with the
file and line every row came from). `load_source(c.data)` picks the reader.
"""
from __future__ import annotations

import importlib

from mscenario.data.sources.movielens import load_movielens
from mscenario.data.sources.paths import resolve_path, resolve_root  # noqa: F401  (API)
from mscenario.data.sources.recbole import load_recbole
from mscenario.data.sources.tabular import load_table
from mscenario.data.sources.tfds import load_tfds  # tensorflow_datasets only when it runs
from mscenario.data.table import RawTable
from mscenario.errors import ConfigError

SOURCES = ("movielens", "recbole", "table", "tfds", "synthetic")


def load_source(data_cfg) -> RawTable:
  """RawTable for `data_cfg` (the `c.data` section), dispatching on `data_cfg.source`."""
  source = data_cfg.source
  on_error = data_cfg.get("on_error", "raise")
  if source == "movielens":
    return load_movielens(resolve_root(data_cfg), data_cfg.name,
                          layout=data_cfg.get("layout", "auto"), on_error=on_error)
  if source == "recbole":
    return load_recbole(resolve_root(data_cfg), data_cfg.name, on_error=on_error)
  if source == "table":
    return load_table(data_cfg)
  if source == "tfds":
    return load_tfds(data_cfg)
  if source == "synthetic":
    synthetic = importlib.import_module("mscenario.data.synthetic")  # imported only when used
    return synthetic.load_raw(data_cfg)
  raise ConfigError(f"data.source={source!r}: expected one of {', '.join(SOURCES)}")
