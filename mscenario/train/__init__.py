"""The trainer: state and shardings (loop.build), the one loop (fit), evaluation, checkpoints,
the work dir, incremental updates.

`import mscenario as ms; ms.train(config, workdir)` is the API's train function, but Python
binds the attribute `mscenario.train` to this subpackage as soon as anything imports it. So
the subpackage is callable and forwards to `mscenario.api.train`: both spellings mean the same.
"""
from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
  def __call__(self, config, workdir: str, **kwargs):
    from mscenario.api import train
    return train(config, workdir, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
