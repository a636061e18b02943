"""Data sources: each reads one kind of raw input into a RawTable (joined, typed, with the
file and line every row came from). `load_source(c.data)` picks the reader.
"""
from __future__ import annotations

import importlib
import os

from mscenario.data.table import RawTable
from mscenario.errors import ConfigError

SOURCES = ("movielens", "recbole", "table", "tfds", "synthetic")


def resolve_root(data_cfg) -> str:
  """Absolute `data.root` (`~` expanded, relative to the current directory), or
  `<default_data_dir()>/<name>` when it is empty (where `data get` puts it).

  The one resolver: the readers and the cache fingerprint (prepare.source_files) must hash
  exactly the files that are read.
  """
  root = data_cfg.get("root", "") or ""
  if not root:
    from mscenario.config import default_data_dir
    root = os.path.join(default_data_dir(), data_cfg.name)
  return os.path.abspath(os.path.expanduser(root))


def resolve_path(path: str, data_cfg) -> str:
  """A table file path: absolute after `~` expansion, else under `data.root` when one is set,
  else under the current directory."""
  path = os.path.expanduser(path)
  if not os.path.isabs(path) and (data_cfg.get("root", "") or ""):
    path = os.path.join(resolve_root(data_cfg), path)
  return os.path.abspath(path)


def load_source(data_cfg) -> RawTable:
  """RawTable for `data_cfg` (the `c.data` section), dispatching on `data_cfg.source`."""
  source = data_cfg.source
  on_error = data_cfg.get("on_error", "raise")
  if source == "movielens":
    from mscenario.data.sources.movielens import load_movielens
    return load_movielens(resolve_root(data_cfg), data_cfg.name,
                          layout=data_cfg.get("layout", "auto"), on_error=on_error)
  if source == "recbole":
    from mscenario.data.sources.recbole import load_recbole
    return load_recbole(resolve_root(data_cfg), data_cfg.name, on_error=on_error)
  if source == "table":
    from mscenario.data.sources.tabular import load_table
    return load_table(data_cfg)
  if source == "tfds":
    from mscenario.data.sources.tfds import load_tfds  # imports tensorflow_datasets
    return load_tfds(data_cfg)
  if source == "synthetic":
    synthetic = importlib.import_module("mscenario.data.synthetic")  # imported only when used
    return synthetic.load_raw(data_cfg)
  raise ConfigError(f"data.source={source!r}: expected one of {', '.join(SOURCES)}")
