"""Where a data source's files are: the one resolver of `data.root` and table paths, used by
the readers and by the cache fingerprint (which must hash exactly the files that are read)."""
from __future__ import annotations

import os

from mscenario.config import default_data_dir


def resolve_root(data_cfg) -> str:
  """Absolute `data.root` (`~` expanded, relative to the current directory), or
  `<default_data_dir()>/<name>` when it is empty (where `data get` puts it).

  The one resolver: the readers and the cache fingerprint (prepare.source_files) must hash
  exactly the files that are read.
  """
  root = data_cfg.get("root", "") or ""
  if not root:
    root = os.path.join(default_data_dir(), data_cfg.name)
  return os.path.abspath(os.path.expanduser(root))


def resolve_path(path: str, data_cfg) -> str:
  """A table file path: absolute after `~` expansion, else under `data.root` when one is set,
  else under the current directory."""
  path = os.path.expanduser(path)
  if not os.path.isabs(path) and (data_cfg.get("root", "") or ""):
    path = os.path.join(resolve_root(data_cfg), path)
  return os.path.abspath(path)
