"""mscenario: multi-scenario interest prediction with JAX/Flax.

  import mscenario as ms
  run = ms.train(ms.load_config("configs/ml100k_star.py"), "runs/star")

The API (`load_config`, `train`, `update`, `Run`, and `Explanation`, what `Run.explain` returns; see
mscenario/api.py) is imported on first use, so `import mscenario` (and the CLI's start-up)
stays fast and does not load JAX.
"""
from __future__ import annotations

from importlib import metadata as _metadata

try:
  __version__ = _metadata.version("mscenario")
except _metadata.PackageNotFoundError:  # a source checkout that was never installed
  __version__ = "0+source"

_API = ("load_config", "train", "update", "Run", "Explanation")


def __getattr__(name: str):
  if name in _API:
    from mscenario import api
    return getattr(api, name)
  raise AttributeError(f"module 'mscenario' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_API])
